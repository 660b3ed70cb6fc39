"""Fixtures for decoding and for timm's evaluation transform.

`generate(out_dir, photos)` writes into `out_dir`:

* `files/*`: the same photos stored the ways ImageNet-style folders contain
  them: baseline and progressive JPEG, grayscale JPEG, CMYK JPEG (Adobe,
  inverted, as Pillow writes it), RGBA PNG, palette PNG, 16-bit grayscale PNG;
  `files/*.rgb.npy` holds Pillow's `Image.open(f).convert('RGB')` of each, the
  way timm's dataset reads images (except 16-bit PNGs, see below);
* `eval_*`: timm's `transforms_imagenet_eval(img_size, crop_pct, 'bicubic',
  use_prefetcher=True)` applied to a Pillow-decoded photo (`eval_*_in.npy`),
  output `eval_*_out.npy` (uint8 HWC), with the parameters in `manifest.json`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def generate(out: Path, photos: list[Path]) -> None:
    files = out / "files"
    files.mkdir(parents=True, exist_ok=True)
    manifest = {"files": [], "eval": []}
    sources = [p for p in photos if p.name in ("china.jpg", "grace_hopper.jpg")]
    for src in sources:
        img = Image.open(src).convert("RGB")
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC)
        stem = src.stem
        variants = {
            f"{stem}_baseline.jpg": lambda p: img.save(p, quality=90),
            f"{stem}_progressive.jpg": lambda p: img.save(p, quality=90, progressive=True),
            f"{stem}_gray.jpg": lambda p: img.convert("L").save(p, quality=90),
            f"{stem}_cmyk.jpg": lambda p: img.convert("CMYK").save(p, quality=95),
            f"{stem}_rgba.png": lambda p: img.convert("RGBA").save(p),
            f"{stem}_palette.png": lambda p: img.convert("P").save(p),
            f"{stem}_gray16.png": lambda p: Image.fromarray(
                (np.asarray(img.convert("L"), dtype=np.uint16) * 257)).save(p),
        }
        for name, write in variants.items():
            path = files / name
            write(path)
            if name.endswith("_gray16.png"):
                # Pillow clips 16-bit values to 255 when converting to RGB (a
                # Pillow quirk, not a decoding); we scale to 8 bits instead, so
                # the expectation is the 8-bit image the file was made from.
                decoded = np.asarray(img.convert("L").convert("RGB"))
                expect = "scaled_16_bit"
            else:
                decoded = np.asarray(Image.open(path).convert("RGB"))
                expect = "pillow"
            np.save(files / f"{name}.rgb.npy", decoded)
            manifest["files"].append({"file": name, "mode": Image.open(path).mode, "expect": expect})
    from timm.data.transforms_factory import transforms_imagenet_eval

    k = 0
    for src in photos[:3]:
        img = Image.open(src).convert("RGB")
        for size, crop_pct in [(224, 0.95), (160, 0.95), (32, 0.95), (224, 0.875)]:
            t = transforms_imagenet_eval(img_size=size, crop_pct=crop_pct, interpolation="bicubic",
                                         use_prefetcher=True)
            result = t(img)  # uint8 CHW tensor
            np.save(out / f"eval_{k}_in.npy", np.asarray(img))
            np.save(out / f"eval_{k}_out.npy", result.numpy().transpose(1, 2, 0))
            manifest["eval"].append({"prefix": f"eval_{k}", "size": size, "crop_pct": repr(crop_pct),
                                     "photo": src.name})
            k += 1
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
