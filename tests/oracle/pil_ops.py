"""Pillow 13 / timm 1.0.31 fixtures for the PIL-exact image operations.

`generate(out_dir, photos)` writes into `out_dir`:

* `manifest.json`: the inputs and the cases (kind, parameters, file names);
* `in_*.npy`: the inputs, uint8 HWC RGB: real photos reduced with PIL to small
  sizes (odd, non-square and square ones, plus a few tiny crops);
* `out_*.npy`: what Pillow / torchvision / timm produced for each case.

Case kinds (parameters in the manifest):

* `resize`        `img.resize((width, height), filter)`;
* `resized_crop`  torchvision `F.resized_crop(img, top, left, crop_height,
                  crop_width, [height, width], filter)` (PIL backend);
* `op`            one `ImageOps` / `ImageEnhance` / timm helper call with fixed
                  arguments (`op`, `args`);
* `affine`        `img.transform(img.size, AFFINE, coeffs, filter, fillcolor=fill)`;
* `rotate`        `img.rotate(degrees, filter, fillcolor=fill)`;
* `timm_op`       timm's own `AugmentOp(name, prob=1, magnitude=m)` with fixed
                  interpolation and fill; the random negation it drew is
                  recorded (`negate`), as are the arguments timm's
                  `LEVEL_TO_ARG` produced (`level_args`), so that the Rust side
                  checks its level->argument mapping against timm itself.

Run alone:  .venv/bin/python tests/oracle/pil_ops.py --out target/fixtures/pil_ops
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

FILL = (124, 116, 104)
BILINEAR = Image.Resampling.BILINEAR
BICUBIC = Image.Resampling.BICUBIC
NEAREST = Image.Resampling.NEAREST
FILTER_NAMES = {NEAREST: "nearest", BILINEAR: "bilinear", BICUBIC: "bicubic"}


def _num(x):
    """JSON form of a number: ints as they are, floats as their shortest repr
    string (JSON float parsers need not round correctly; `str::parse` does)."""
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        return x
    return repr(float(x))


class _Writer:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.inputs: dict[str, str] = {}
        self.images: dict[str, Image.Image] = {}
        self.cases: list[dict] = []

    def add_input(self, name: str, img: Image.Image) -> None:
        assert img.mode == "RGB"
        file = f"in_{name}.npy"
        np.save(self.out / file, np.asarray(img, dtype=np.uint8))
        self.inputs[name] = file
        self.images[name] = img

    def add_case(self, kind: str, input_name: str, out_img: Image.Image, **params) -> None:
        assert out_img.mode == "RGB"
        file = f"out_{len(self.cases):04d}.npy"
        np.save(self.out / file, np.asarray(out_img, dtype=np.uint8))
        case = {"id": f"{kind}/{input_name}/{len(self.cases)}", "kind": kind, "input": input_name}
        case.update(params)
        case["output"] = file
        self.cases.append(case)


def _inputs(w: _Writer, photos: list[Path]) -> None:
    by_name = {p.stem: p for p in photos}
    wanted = ["china", "flower", "grace_hopper", "rocket", "hubble_deep_field", "retina"]
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise FileNotFoundError(f"photos missing: {missing} (have {sorted(by_name)})")

    def load(name: str) -> Image.Image:
        with Image.open(by_name[name]) as im:
            return im.convert("RGB")

    china, flower, hopper = load("china"), load("flower"), load("grace_hopper")
    rocket, hubble, retina = load("rocket"), load("hubble_deep_field"), load("retina")
    w.add_input("china_160x107", china.resize((160, 107), BICUBIC))
    w.add_input("flower_97x65", flower.resize((97, 65), BILINEAR))
    w.add_input("hopper_75x88", hopper.resize((75, 88), BICUBIC))
    w.add_input("rocket_64x64", rocket.crop((100, 0, 527, 427)).resize((64, 64), BICUBIC))
    w.add_input("hubble_121x106", hubble.resize((121, 106), BICUBIC))
    w.add_input("retina_33x33", retina.resize((33, 33), BILINEAR))
    # Tiny crops: borders, 1-pixel and 2-pixel edge cases.
    small = china.resize((40, 27), BICUBIC)
    w.add_input("tiny_1x1", small.crop((20, 13, 21, 14)))
    w.add_input("tiny_2x3", small.crop((5, 5, 7, 8)))
    w.add_input("tiny_7x1", small.crop((3, 20, 10, 21)))
    w.add_input("tiny_3x3", small.crop((30, 2, 33, 5)))
    # For randomised cases: small, so that many cases stay cheap.
    w.add_input("hopper_23x19", hopper.resize((23, 19), BICUBIC))
    # Realistic scale for the RandomResizedCrop path.
    w.add_input("china_320x214", china.resize((320, 214), BICUBIC))


def _resize_cases(w: _Writer) -> None:
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    targets = {
        "china_160x107": [(57, 41), (224, 150), (160, 37), (161, 107), (160, 50), (37, 89), (1, 1),
                          (171, 115), (159, 106), (13, 100)],
        "flower_97x65": [(64, 64), (97, 13), (200, 31), (31, 200), (48, 32)],
        "hopper_75x88": [(90, 100), (50, 59), (75, 20), (7, 9)],
        "hubble_121x106": [(60, 53), (121, 40), (130, 120)],
        "tiny_1x1": [(5, 3)],
        "tiny_2x3": [(9, 1), (1, 9), (5, 7)],
        "tiny_7x1": [(3, 4)],
    }
    for name, sizes in targets.items():
        img = w.images[name]
        for width, height in sizes:
            for f in (BILINEAR, BICUBIC, NEAREST):
                w.add_case("resize", name, img.resize((width, height), f),
                           width=width, height=height, filter=FILTER_NAMES[f])
    modes = {BILINEAR: InterpolationMode.BILINEAR, BICUBIC: InterpolationMode.BICUBIC}
    crops = [
        ("china_160x107", (10, 20, 80, 97), (64, 64)),
        ("china_160x107", (0, 0, 107, 160), (96, 96)),
        ("hubble_121x106", (33, 5, 41, 77), (48, 48)),
        ("hopper_75x88", (50, 60, 38, 15), (56, 56)),
        ("flower_97x65", (1, 2, 3, 4), (32, 32)),
        ("rocket_64x64", (8, 8, 48, 48), (48, 48)),
    ]
    crops += [
        ("china_320x214", (13, 27, 200, 290), (224, 224)),
        ("china_320x214", (0, 0, 214, 320), (160, 160)),
    ]
    for name, (top, left, ch, cw), (height, width) in crops:
        for f, mode in modes.items():
            out = TF.resized_crop(w.images[name], top, left, ch, cw, [height, width], mode)
            w.add_case("resized_crop", name, out, top=top, left=left, crop_height=ch,
                       crop_width=cw, height=height, width=width, filter=FILTER_NAMES[f])


def _random_cases(w: _Writer) -> None:
    """Many small cases with random parameters, to cover coefficient layouts,
    sampling positions and blend factors beyond the hand-picked ones."""
    rng = random.Random(7)
    name = "hopper_23x19"
    img = w.images[name]
    filters = (BILINEAR, BICUBIC, NEAREST)
    for _ in range(60):
        width, height = rng.randint(1, 60), rng.randint(1, 60)
        f = rng.choice(filters)
        w.add_case("resize", name, img.resize((width, height), f), width=width, height=height,
                   filter=FILTER_NAMES[f])
    for _ in range(60):
        f = rng.choice(filters)
        coeffs = [rng.uniform(0.5, 1.5), rng.uniform(-0.5, 0.5), rng.uniform(-8, 8),
                  rng.uniform(-0.5, 0.5), rng.uniform(0.5, 1.5), rng.uniform(-8, 8)]
        out = img.transform(img.size, Image.Transform.AFFINE, coeffs, f, fillcolor=FILL)
        w.add_case("affine", name, out, coeffs=[_num(c) for c in coeffs], filter=FILTER_NAMES[f],
                   fill=list(FILL))
    for _ in range(40):
        f = rng.choice(filters)
        deg = rng.uniform(-45, 45)
        out = img.rotate(deg, f, fillcolor=FILL)
        w.add_case("rotate", name, out, degrees=_num(deg), filter=FILTER_NAMES[f], fill=list(FILL))
    enhancers = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
                 "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}
    for _ in range(40):
        op = rng.choice(sorted(enhancers))
        factor = rng.uniform(-0.5, 2.5)
        w.add_case("op", name, enhancers[op](img).enhance(factor), op=op, args=[_num(factor)])


def _solarize_add(img: Image.Image, add: int, thresh: int) -> Image.Image:
    from timm.data.auto_augment import solarize_add
    return solarize_add(img, add, thresh)


def _op_cases(w: _Writer) -> None:
    op_inputs = ["flower_97x65", "hopper_75x88", "retina_33x33", "tiny_2x3", "tiny_3x3"]
    factors = [0.0, 0.1, 0.37, 0.5, 1.0, 1.36, 1.63, 1.9, 2.5, -0.3]
    for name in op_inputs:
        img = w.images[name]
        w.add_case("op", name, ImageOps.autocontrast(img), op="autocontrast", args=[])
        w.add_case("op", name, ImageOps.equalize(img), op="equalize", args=[])
        w.add_case("op", name, ImageOps.invert(img), op="invert", args=[])
        w.add_case("op", name, img.filter(ImageFilter.SMOOTH), op="smooth", args=[])
        for bits in (1, 2, 4, 7, 8):
            w.add_case("op", name, ImageOps.posterize(img, bits), op="posterize", args=[bits])
        for t in (0, 77, 128, 179, 256):
            w.add_case("op", name, ImageOps.solarize(img, t), op="solarize", args=[t])
        for add in (0, 40, 77, 110):
            w.add_case("op", name, _solarize_add(img, add, 128), op="solarize_add", args=[add, 128])
        for f in factors:
            w.add_case("op", name, ImageEnhance.Color(img).enhance(f), op="color", args=[_num(f)])
            w.add_case("op", name, ImageEnhance.Contrast(img).enhance(f), op="contrast", args=[_num(f)])
            w.add_case("op", name, ImageEnhance.Brightness(img).enhance(f), op="brightness", args=[_num(f)])
            w.add_case("op", name, ImageEnhance.Sharpness(img).enhance(f), op="sharpness", args=[_num(f)])
    # Low-contrast and flat images exercise the autocontrast / equalize / contrast corners.
    hopper = w.images["hopper_75x88"]
    dull = Image.blend(Image.new("RGB", hopper.size, (90, 140, 30)), hopper, 0.05)
    w.add_input("dull_75x88", dull)
    flat = Image.new("RGB", (9, 5), (10, 200, 33))
    w.add_input("flat_9x5", flat)
    for name in ("dull_75x88", "flat_9x5"):
        img = w.images[name]
        w.add_case("op", name, ImageOps.autocontrast(img), op="autocontrast", args=[])
        w.add_case("op", name, ImageOps.equalize(img), op="equalize", args=[])
        for f in (0.1, 1.9):
            w.add_case("op", name, ImageEnhance.Contrast(img).enhance(f), op="contrast", args=[_num(f)])


def _geometry_cases(w: _Writer) -> None:
    filters = (BILINEAR, BICUBIC, NEAREST)
    geo_inputs = ["flower_97x65", "rocket_64x64", "hopper_75x88", "tiny_2x3", "tiny_1x1"]
    coeff_sets = [
        (1, 0.21, 0, 0, 1, 0), (1, -0.3, 0, 0, 1, 0), (1, 0, 0, 0.219, 1, 0), (1, 0, 0, -0.1, 1, 0),
        (1, 0, 0.315 * 97, 0, 1, 0), (1, 0, -17.3, 0, 1, 0), (1, 0, 0, 0, 1, 0.27 * 65),
        (1, 0, 0, 0, 1, -40.5), (0.9, 0.2, 3.3, -0.15, 1.1, -2.0), (1.7, 0, -5, 0, 0.6, 9),
        (1, 0, 0, 0, 1, 0), (1, 0.5, -1e5, 0, 1, 0),
    ]
    degrees = [21.0, -21.0, 30.0, -7.3, 0.5, 90.0, -90.0, 180.0, 270.0, 375.0, 0.0, -1e-9]
    for name in geo_inputs:
        img = w.images[name]
        for f in filters:
            for coeffs in coeff_sets:
                out = img.transform(img.size, Image.Transform.AFFINE, coeffs, f, fillcolor=FILL)
                w.add_case("affine", name, out, coeffs=[_num(float(c)) for c in coeffs],
                           filter=FILTER_NAMES[f], fill=list(FILL))
            for deg in degrees:
                out = img.rotate(deg, f, fillcolor=FILL)
                w.add_case("rotate", name, out, degrees=_num(deg), filter=FILTER_NAMES[f], fill=list(FILL))


def _timm_op_cases(w: _Writer) -> None:
    from timm.data.auto_augment import (
        LEVEL_TO_ARG,
        _RAND_INCREASING_TRANSFORMS,
        _RAND_TRANSFORMS,
        AugmentOp,
    )

    names = list(dict.fromkeys(_RAND_TRANSFORMS + _RAND_INCREASING_TRANSFORMS))
    geometric = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
    rng = random.Random(1234)
    random.seed(20240531)
    inputs = ["flower_97x65", "rocket_64x64", "hopper_75x88"]
    # (magnitude, magnitude_max): clipping to 10 by default, to mmax when set.
    magnitudes = [(0, None), (3.7, None), (7, None), (9.5, None), (10, None), (12.5, None), (13, 15)]
    for op_name in names:
        for magnitude, mmax in magnitudes:
            interps = (BILINEAR, BICUBIC) if op_name in geometric else (BICUBIC,)
            for interp in interps:
                input_name = rng.choice(inputs)
                img = w.images[input_name]
                hparams = {"translate_const": 100, "img_mean": FILL, "interpolation": interp}
                if mmax is not None:
                    hparams["magnitude_max"] = mmax
                op = AugmentOp(op_name, prob=1.0, magnitude=magnitude, hparams=hparams)
                clipped = max(0.0, min(magnitude, mmax or 10.0))
                # The level function's negation is the first random draw of the call.
                state = random.getstate()
                negate = random.random() > 0.5
                random.setstate(state)
                level_fn = LEVEL_TO_ARG[op_name]
                level_args = list(level_fn(clipped, op.hparams)) if level_fn else []
                random.setstate(state)
                try:
                    out = op(img)
                except ValueError as e:
                    # Pillow 13 rejects posterize to 0 bits (PosterizeIncreasing at m=10).
                    assert "bits" in str(e), e
                    continue
                w.add_case("timm_op", input_name, out, name=op_name, magnitude=_num(magnitude),
                           magnitude_max=mmax, negate=negate, level_args=[_num(a) for a in level_args],
                           filter=FILTER_NAMES[interp], fill=list(FILL))
                # Vary the sign: advance the stream so the next draw may differ.
                random.random()


def generate(out_dir: Path, photos: list[Path]) -> None:
    """Writes the fixtures (manifest.json and .npy files) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.npy"):
        old.unlink()
    import timm

    w = _Writer(out_dir)
    _inputs(w, photos)
    _resize_cases(w)
    _op_cases(w)
    _geometry_cases(w)
    _timm_op_cases(w)
    _random_cases(w)
    manifest = {
        "pillow": PIL.__version__,
        "timm": timm.__version__,
        "inputs": w.inputs,
        "cases": w.cases,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"pil_ops: {len(w.inputs)} inputs, {len(w.cases)} cases in {out_dir}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import assets

    generate(args.out, assets.photos())
    return 0


if __name__ == "__main__":
    sys.exit(main())
