"""Builds an ImageNet-layout folder of real photos at ImageNet's typical size.

The photos are the real JPEGs shipped in the scikit-image, scikit-learn and
matplotlib wheels (tests/oracle/assets.py fetches them; `--photos DIR` reads
them from a folder instead, as on a host without the network, where
`bench/gpu.sh --pack` carried them). Each output image is a random crop of one
of them, resized to about 500x375 (ImageNet's median size) and re-encoded as
baseline JPEG quality 90, the way ImageNet's files are; class `cNNN` takes its
crops from one photo, so the classes are learnable. Every class is made by its
own process (`--jobs`), from its own seeded generator, so the folder is the
same whatever the number of processes.

    .venv/bin/python bench/make_photo_folder.py --out .gpu/photos --classes 8 --train-per-class 32 --val-per-class 8
"""
from __future__ import annotations

import argparse
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "oracle"))


def source_photos(folder: Path | None) -> list[Path]:
    """The source JPEGs: those in `folder`, or the wheels' photos."""
    if folder is None:
        import assets  # noqa: E402  (downloads the wheels when missing)

        return list(assets.photos())
    found = sorted(folder.glob("*.jpg"))
    if not found:
        sys.exit(f"error: no *.jpg in {folder}")
    return found


def make_class(out: Path, split: str, c: int, per_class: int, photo: Path, seed: int) -> None:
    """Writes `per_class` crops of `photo` to `out/split/cNNN/`."""
    rng = random.Random(f"{seed}-{split}-{c}")
    src = Image.open(photo).convert("RGB")
    folder = out / split / f"c{c:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        w = rng.randint(src.width // 2, src.width)
        h = rng.randint(src.height // 2, src.height)
        x, y = rng.randint(0, src.width - w), rng.randint(0, src.height - h)
        crop = src.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        target = (500, 375) if w >= h else (375, 500)
        crop.resize(target, Image.Resampling.BICUBIC).save(folder / f"{i:05d}.JPEG", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--train-per-class", type=int, default=32)
    p.add_argument("--val-per-class", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--photos", type=Path, default=None, help="folder of source *.jpg (default: the wheels' photos)")
    p.add_argument("--jobs", type=int, default=1, help="processes")
    a = p.parse_args()
    photos = source_photos(a.photos)
    work = [
        (a.out, split, c, per_class, photos[c % len(photos)], a.seed)
        for split, per_class in (("train", a.train_per_class), ("val", a.val_per_class))
        for c in range(a.classes)
    ]
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for future in [pool.submit(make_class, *w) for w in work]:
            future.result()
    print(f"wrote {a.classes} classes to {a.out}")


if __name__ == "__main__":
    main()
