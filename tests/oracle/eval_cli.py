"""Fixture for `worker eval` end to end (`tests/tests/eval_cli.rs`): a small
ImageNet-layout validation folder, the same images in ImageNet-V2's layout, a
ReaL labels file and resnet18 weights, with timm 1.0.31's scores of them.

`generate(out_dir)` writes into `out_dir`:

* `weights.safetensors`: timm's resnet18 (1000 classes), randomised as in
  `models.py`, with a head whose classes 0..7 read the part of the features
  that varies between images and sit above the others, so every image's top 8
  predictions are classes 0..7 (hits and misses both occur); and
  `weights_8.safetensors`, the same network with the head's first 8 rows (an
  ImageNet-layout folder has as many classes as class folders);
* `imagenet/val/n0000000K/ILSVRC2012_val_XXXXXXXX.JPEG` (K = 0..7) and
  `v2/K/<same file>`: `N` JPEGs made with Pillow, each placed in a class chosen
  from timm's own ranking of its logits so that top-1 hits, top-5-only hits and
  misses all occur;
* `real.json`: 50,000 label lists (ImageNet validation order), empty except
  for the images above, whose lists again mix hits, top-5-only hits, misses
  and empty lists (excluded from the ReaL score);
* `manifest.json`: the transform (`input_size`, `crop_pct`, bicubic, ImageNet
  mean/std), and for each layout (`imagenet`, `v2`) its weights and classes
  and what timm reports on timm's logits: `timm.utils.accuracy` top-1/top-5,
  the mean cross-entropy, and `timm.data.RealLabelsImagenet` top-1/top-5 with
  the number of images it scored and left out. Every top-k boundary has a logit margin of at least `MIN_MARGIN`, so
  tiny float differences cannot flip a prediction.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

N = 30
CLASSES = 8
INPUT_SIZE = 64
CROP_PCT = 0.875
MIN_MARGIN = 1e-3
REAL_LEN = 50_000


def _image(rng: np.random.Generator):
    from PIL import Image

    w, h = int(rng.integers(72, 121)), int(rng.integers(64, 111))
    coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
    noise = rng.normal(0.0, 12.0, size=(h, w, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def generate(out: Path) -> None:
    import timm
    from PIL import Image
    from safetensors.torch import save_file
    from timm.data import RealLabelsImagenet, create_transform
    from timm.data.readers.reader_image_folder import find_images_and_targets
    from timm.utils import accuracy

    import models

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    models.randomise(model)
    model.eval()

    rng = np.random.default_rng(0)
    picker = random.Random(0)
    ids = sorted(picker.sample(range(1, REAL_LEN + 1), N))
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in ids]
    staging = out / "staging"
    staging.mkdir()
    for name in names:
        _image(rng).save(staging / name, quality=90)

    transform = create_transform(INPUT_SIZE, is_training=False, crop_pct=CROP_PCT,
                                 interpolation="bicubic")
    batch = torch.stack([transform(Image.open(staging / n).convert("RGB")) for n in names])
    with torch.no_grad():
        # Randomised features share a large common part; heads 0..7 read the
        # part that varies between images, and sit above the other classes.
        features = model.forward_head(model.forward_features(batch), pre_logits=True)
        model.fc.weight[:CLASSES] *= 10.0
        model.fc.bias[:CLASSES] = 50.0 - model.fc.weight[:CLASSES] @ features.mean(0)
        logits = model(batch)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "weights.safetensors"))
    ranked = logits.argsort(dim=1, descending=True)
    ordered = logits.sort(dim=1, descending=True).values
    assert set(ranked[:, :CLASSES].flatten().tolist()) <= set(range(CLASSES)), "head bias too small"
    # The top-1, top-5 and top-8 boundaries.
    margins = ordered[:, [0, 4, CLASSES - 1]] - ordered[:, [1, 5, CLASSES]]
    assert float(margins.min()) >= MIN_MARGIN, f"margin {float(margins.min())} below {MIN_MARGIN}"
    assert len(set(ranked[:, 0].tolist())) >= 3, "every image predicts the same class"

    def place(pattern: list[int], counts: list[int]) -> list[int]:
        """Class of each image: the prediction of rank pattern[i % len]
        (0 = top-1), or for a miss (rank >= 5) the least-used class among
        ranks 5..7, so that every class folder gets images."""
        classes = []
        for i in range(N):
            rank = pattern[i % len(pattern)]
            if rank >= 5:
                options = [int(c) for c in ranked[i, 5:CLASSES]]
                c = min(options, key=lambda o: counts[o])
            else:
                c = int(ranked[i, rank])
            counts[c] += 1
            classes.append(c)
        assert all(counts), f"an empty class folder: {counts}"
        return classes

    real = [[] for _ in range(REAL_LEN)]
    for i, image_id in enumerate(ids):
        r = [int(c) for c in ranked[i]]
        real[image_id - 1] = [[r[0], r[6]], [r[3]], [r[5], r[7]], []][i % 4]
    (out / "real.json").write_text(json.dumps(real))
    # timm wants every validation name; only the N images are scored.
    rest = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, REAL_LEN + 1) if i not in set(ids)]

    # An ImageNet-layout folder has as many classes as class folders (8): its
    # model is the same network with the head's first 8 rows. V2 keeps 1000.
    small = timm.create_model("resnet18", pretrained=False, num_classes=CLASSES)
    state = model.state_dict()
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][:CLASSES], state["fc.bias"][:CLASSES]
    small.load_state_dict(state)
    small.eval()
    with torch.no_grad():
        small_logits = small(batch)
    assert torch.equal(small_logits.argsort(dim=1, descending=True), ranked[:, :CLASSES])
    save_file({k: v.contiguous() for k, v in small.state_dict().items()},
              str(out / "weights_8.safetensors"))

    layouts = {
        "imagenet": (place([0, 2, 6], [0] * CLASSES), small_logits, "weights_8.safetensors"),
        "v2": (place([1, 0, 5, 3], [0] * CLASSES), logits, "weights.safetensors"),
    }
    manifest = {"model": "resnet18", "input_size": INPUT_SIZE, "crop_pct": CROP_PCT,
                "interpolation": "bicubic", "images": N}
    for layout, (classes, layout_logits, weights) in layouts.items():
        root = out / "imagenet" / "val" if layout == "imagenet" else out / "v2"
        folder = (lambda c: f"n{c:08d}") if layout == "imagenet" else str
        for name, c in zip(names, classes):
            (root / folder(c)).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(staging / name, root / folder(c) / name)
        # timm's folder reader decides the targets of the images.
        samples, _ = find_images_and_targets(os.fspath(root))
        by_name = {os.path.basename(path): t for path, t in samples}
        target = torch.tensor([by_name[n] for n in names])
        assert target.tolist() == classes, f"{layout}: timm's class order differs"
        top1, top5 = accuracy(layout_logits, target, topk=(1, 5))
        loss = torch.nn.functional.cross_entropy(layout_logits, target)
        scorer = RealLabelsImagenet(names + rest, real_json=str(out / "real.json"))
        scorer.add_result(layout_logits)
        scored = len(scorer.is_correct[1])
        manifest[layout] = {
            "weights": weights, "num_classes": int(layout_logits.shape[1]),
            "top1": float(top1), "top5": float(top5), "loss": float(loss),
            "real": {"top1": scorer.get_accuracy(1), "top5": scorer.get_accuracy(5),
                     "scored": scored, "excluded": N - scored},
        }
    shutil.rmtree(staging)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
