"""Input-pipeline throughput: our loader (`worker bench data`) against timm's
own loader on the same photos, transform and number of cores.

The transform is RSB A2's: RandomResizedCrop 224 (scale 0.08-1, ratio 3/4-4/3,
interpolation `random`), horizontal flip 0.5, RandAugment `rand-m7-mstd0.5-inc1`,
then ToTensor + Normalize into float NCHW batches. timm runs
`timm.data.create_loader(..., use_prefetcher=False, num_workers=W)` (PIL, W
worker processes, each with one torch thread); ours runs W loader threads and
normalises in them too. Both are timed from their first batch to their last
(worker start-up excluded), over the same number of images, in alternating
rounds; the medians are reported, and the ratio is the median of the
per-round ratios (robust to other load on a shared machine).

    .venv/bin/python bench/data_loader.py                      # builds .cache/bench-photos if missing
    .venv/bin/python bench/data_loader.py --workers 2 --images 2048 --rounds 3

The photos are made by bench/make_photo_folder.py: real photos re-encoded
at about 500x375, JPEG quality 90 (ImageNet's typical size and quality).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timm_round(root: Path, workers: int, batch: int, images: int) -> dict:
    import torch
    from timm.data import create_dataset, create_loader
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    torch.set_num_threads(1)
    ds = create_dataset("", root=str(root), is_training=True)
    loader = create_loader(
        ds, input_size=(3, 224, 224), batch_size=batch, is_training=True, use_prefetcher=False,
        no_aug=False, re_prob=0.0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0,
        color_jitter=0.4, auto_augment="rand-m7-mstd0.5-inc1", interpolation="random",
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, num_workers=workers,
        distributed=False, pin_memory=False, persistent_workers=True,
    )
    timed_batches = -(-images // batch)
    done, first, n = 0, None, 0
    while done <= timed_batches:
        for x, _ in loader:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 224, 224)
            if first is None:
                first = time.perf_counter()
            else:
                n += x.shape[0]
            done += 1
            if done > timed_batches:
                break
    secs = time.perf_counter() - first
    del loader
    return {"pipeline": "timm", "images": n, "seconds": secs, "images_per_sec": n / secs}


def ours_round(root: Path, workers: int, batch: int, images: int, extra: list[str]) -> dict:
    exe = Path(os.environ.get("RSB_WORKER", REPO / "target" / "release" / "worker"))
    cmd = [str(exe), "bench", "data", "--data", str(root), "--threads", str(workers),
           "--batch", str(batch), "--images", str(images),
           "--recipe", str(REPO / "recipes" / "resnet50_a2.yaml"), *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / ".cache" / "bench-photos" / "train")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for our side, e.g. data.scaled_decode=false")
    a = p.parse_args()
    if not a.data.is_dir():
        out = a.data.parent
        print(f"building {out} with bench/make_photo_folder.py", file=sys.stderr)
        per_class = -(-(a.images + 2 * a.batch) // 8)
        subprocess.run([sys.executable, str(REPO / "bench" / "make_photo_folder.py"), "--out", str(out),
                        "--classes", "8", "--train-per-class", str(per_class), "--val-per-class", "1"],
                       check=True)
    extra = [x for kv in a.ours_set for x in ("--set", kv)]
    ours, timm = [], []
    for r in range(a.rounds):
        ours.append(ours_round(a.data, a.workers, a.batch, a.images, extra))
        timm.append(timm_round(a.data, a.workers, a.batch, a.images))
        print(f"round {r}: ours {ours[-1]['images_per_sec']:.1f} img/s, "
              f"timm {timm[-1]['images_per_sec']:.1f} img/s", file=sys.stderr)
    o = statistics.median(x["images_per_sec"] for x in ours)
    t = statistics.median(x["images_per_sec"] for x in timm)
    result = {
        "workers": a.workers, "cores": os.cpu_count(), "batch": a.batch, "images": a.images,
        "rounds": a.rounds, "ours_images_per_sec": o, "timm_images_per_sec": t,
        "ours_per_core": o / a.workers, "timm_per_core": t / a.workers,
        "ratio": statistics.median(x["images_per_sec"] / y["images_per_sec"] for x, y in zip(ours, timm)),
        "ours_rounds": [x["images_per_sec"] for x in ours],
        "timm_rounds": [x["images_per_sec"] for x in timm],
        "ours_scaled_decode": ours[0].get("scaled_decode"),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
