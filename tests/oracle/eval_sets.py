"""Fixtures for the evaluation sets: ImageNet-ReaL and plain top-k scoring
computed by timm 1.0.31, and timm's class order of ImageNet-V2's folders.

`generate(out_dir)` writes into `out_dir`:

* `real.json`: the ReaL labels shipped in the timm wheel
  (`timm/data/_info/imagenet_real_labels.json`);
* `logits.npy` (float32 `[N, 1000]`) and `manifest.json`: `N` validation
  file names in a shuffled order (loader order must not matter), scored by
  `timm.data.RealLabelsImagenet` (`real_top1`, `real_top5`, the per-image
  `real_correct_1/5` lists) and, against random `targets`, by
  `timm.utils.accuracy` (`plain_top1`, `plain_top5`). The logits are random
  with a boost on one valid label for most images, so hits and misses both occur;
* `v2/`: ImageNet-V2's layout, class folders `0`..`999` with one tiny PNG each,
  and in the manifest timm's `class_to_idx` for it (`find_images_and_targets`).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

N = 2000


def generate(out: Path) -> None:
    import timm
    from PIL import Image
    from timm.data import RealLabelsImagenet
    from timm.data.readers.reader_image_folder import find_images_and_targets
    from timm.utils import accuracy

    out.mkdir(parents=True, exist_ok=True)
    src = Path(timm.__file__).parent / "data" / "_info" / "imagenet_real_labels.json"
    shutil.copyfile(src, out / "real.json")
    real = json.loads(src.read_text())
    names = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(len(real))]

    rng = random.Random(0)
    order = names[:]
    rng.shuffle(order)  # timm looks images up by name: the order must not matter
    picked = order[:N]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(N, 1000, generator=gen)
    for i, name in enumerate(picked):
        labels = real[int(name[15:23]) - 1]
        if labels and rng.random() < 0.7:
            logits[i, rng.choice(labels)] += rng.choice([2.0, 3.5, 6.0])
    targets = torch.randint(0, 1000, (N,), generator=gen)
    for i in range(N):
        if rng.random() < 0.5:
            logits[i, targets[i]] += 3.0

    scorer = RealLabelsImagenet(order, real_json=str(out / "real.json"))
    for start in range(0, N, 256):
        scorer.add_result(logits[start:start + 256])
    top1, top5 = accuracy(logits, targets, topk=(1, 5))

    v2 = out / "v2"
    if v2.exists():
        shutil.rmtree(v2)
    pixel = Image.new("RGB", (1, 1), (1, 2, 3))
    for c in range(1000):
        (v2 / str(c)).mkdir(parents=True)
        pixel.save(v2 / str(c) / f"{c:04x}.png")
    _, class_to_idx = find_images_and_targets(os.fspath(v2))

    np.save(out / "logits.npy", logits.numpy().astype(np.float32))
    manifest = {
        "files": picked,
        "real_top1": scorer.get_accuracy(1),
        "real_top5": scorer.get_accuracy(5),
        "real_correct_1": [bool(x) for x in scorer.is_correct[1]],
        "real_correct_5": [bool(x) for x in scorer.is_correct[5]],
        "targets": targets.tolist(),
        "plain_top1": float(top1),
        "plain_top5": float(top5),
        "v2_class_to_idx": class_to_idx,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))

