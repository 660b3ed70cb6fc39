"""Training-crop fixtures from timm 1.0.31: the random draws of
`RandomResizedCropAndInterpolation` and `RandomHorizontalFlip`, timm's crop
boxes and flip decisions, and its output images, for the Rust replay test
(tests/tests/parity_crop.rs).

For each case of `CASES` the chain is built by timm's own factory,
`transforms_imagenet_train(..., color_jitter=None, auto_augment=None,
use_prefetcher=True, separate=True)`, whose primary stage must be exactly the
random resized crop (plus the horizontal flip when `hflip > 0`: timm adds it
only then). It is called on each of the `INPUTS` images `PER_INPUT` times.
While it runs, `timm.data.transforms.random` and `torch.rand` are replaced by
thin recorders that call Python's and torch's real generators (seeded per
case) and log every result in call order:

* `["uniform", bits, v]`: `random.uniform` (per attempt: area fraction, then log aspect ratio);
* `["randint", v]`: `random.randint` (top, then left);
* `["interp", i]`: `random.choice` over `_RANDOM_INTERPOLATION` (bilinear, bicubic);
* `["flip", bits, v]`: the `torch.rand(1)` of `RandomHorizontalFlip` (a float32, as a float).

Floats are also given as their IEEE-754 bits (`bits`, which the test reads:
decimal JSON floats need not parse back exactly); so are the case's `scale`,
`ratio` and `hflip` (`*_bits`). The box `get_params` returned (`[i, j, h, w]`)
is logged by wrapping it on the crop instance, and whether the image was
flipped by wrapping torchvision's `F.hflip`.

The inputs are the test photos resized (bicubic) to shapes that reach every
branch of `get_params`: a random crop, and the centre fallback of an image
too wide (200x21) or too tall (21x200) for the ratio range, or a whole image
(`near_whole` rarely fits a crop of 90 % of a square), with a fallback side
that Python's `round` takes half to even. The seeds are fixed and
the generator checks that every branch, both interpolations, flips and
non-flips occur, and that no box has a side of 0 (timm accepts it and PIL
then fails; the Rust side rejects such an attempt on purpose). Saved as
uint8 HxWx3 arrays: `input-K.npy` and `<case>.npy` [N, size, size, 3], with
`manifest.json` describing every record.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as tvf
from PIL import Image
from timm.data import transforms as timm_transforms
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.data.transforms_factory import transforms_imagenet_train
from torchvision.transforms import RandomHorizontalFlip

import rand_augment_draws
from rand_augment_draws import exact

# (width, height) of each input, made from the photos in name order.
INPUTS = [(120, 90), (90, 120), (64, 64), (33, 31), (200, 21), (21, 200)]
PER_INPUT = 12

# (name, output size, scale, ratio, interpolation, hflip, seed). `near_whole`
# never fits a crop in the strips, and its ratio range makes their fallback
# side 21 / 0.4 = 21 * 2.5 = 52.5, which `round` takes to 52 (half to even).
CASES = [
    ("rsb", 32, (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0), "random", 0.5, 21),
    ("bicubic", 24, (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0), "bicubic", 0.5, 22),
    ("wide", 20, (0.02, 1.0), (0.5, 2.0), "bilinear", 0.3, 23),
    ("near_whole", 16, (0.9, 1.0), (0.4, 2.5), "random", 0.0, 24),
]


class RecordingRandom(rand_augment_draws.RecordingRandom):
    """The part of Python's `random` module timm's crop uses, logging results:
    RandAugment's recorder (`uniform`, `choice` of an interpolation) and
    `randint`."""

    def randint(self, a, b):
        v = self._rng.randint(a, b)
        self._log.append(["randint", v])
        return v


def inputs() -> list[np.ndarray]:
    import assets

    photos = sorted(assets.photos())
    out = []
    for k, size in enumerate(INPUTS):
        with Image.open(photos[k % len(photos)]) as im:
            im = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            out.append(np.asarray(im, dtype=np.uint8))
    return out


def branch(record: dict, width: int, height: int, ratio) -> str:
    """Which part of `get_params` made the box (from the draws and the shape)."""
    if any(d[0] == "randint" for d in record["draws"]):
        return "random crop"
    in_ratio = width / height
    if in_ratio < min(ratio):
        side = width / min(ratio)
    elif in_ratio > max(ratio):
        side = height * max(ratio)
    else:
        return "fallback, whole image"
    if side % 1 == 0.5:
        return "fallback, rounded half to even"
    return "fallback, too tall" if in_ratio < min(ratio) else "fallback, too wide"


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    images_in = inputs()
    for k, array in enumerate(images_in):
        np.save(out / f"input-{k}.npy", array)
    original_random, original_rand, original_hflip = timm_transforms.random, torch.rand, tvf.hflip
    seen = {"random crop": 0, "fallback, too tall": 0, "fallback, too wide": 0,
            "fallback, whole image": 0, "fallback, rounded half to even": 0,
            "bilinear": 0, "bicubic": 0, "flipped": 0, "not flipped": 0}
    manifest = []
    try:
        for name, size, scale, ratio, interpolation, hflip, seed in CASES:
            primary, _, _ = transforms_imagenet_train(
                img_size=size, scale=scale, ratio=ratio, hflip=hflip, vflip=0.0,
                color_jitter=None, auto_augment=None, interpolation=interpolation,
                use_prefetcher=True, separate=True,
            )
            kinds = [type(t) for t in primary.transforms]
            want = [RandomResizedCropAndInterpolation] + ([RandomHorizontalFlip] if hflip > 0 else [])
            assert kinds == want, f"{name}: timm's primary transforms are {kinds}"
            rrc = primary.transforms[0]

            draws: list = []
            boxes: list = []
            flips: list = []

            def get_params(img, scale_, ratio_, _inner=RandomResizedCropAndInterpolation.get_params):
                box = _inner(img, scale_, ratio_)
                boxes.append([int(v) for v in box])
                return box

            generator = torch.Generator().manual_seed(seed)

            def rand(*args, **kwargs):
                v = original_rand(*args, generator=generator, **kwargs)
                f = float(v)
                draws.append(["flip", exact(f), f])
                return v

            def hflip_(img):
                flips.append(True)
                return original_hflip(img)

            rrc.get_params = get_params
            timm_transforms.random = RecordingRandom(seed, draws)
            torch.rand = rand
            tvf.hflip = hflip_
            results, records = [], []
            for k, array in enumerate(images_in):
                for _ in range(PER_INPUT):
                    start, boxes_before, flips_before = len(draws), len(boxes), len(flips)
                    result = primary(Image.fromarray(array))
                    assert len(boxes) == boxes_before + 1, f"{name}: one get_params call per image"
                    box = boxes[-1]
                    if box[2] == 0 or box[3] == 0:
                        raise RuntimeError(f"{name}: input {k}: timm drew a box with a side of 0 "
                                           f"({box}); pick another seed")
                    result = np.asarray(result, dtype=np.uint8)
                    assert result.shape == (size, size, 3), result.shape
                    results.append(result)
                    record = {"input": k, "draws": draws[start:], "box": box,
                              "flipped": len(flips) > flips_before}
                    records.append(record)
                    height, width = array.shape[:2]
                    seen[branch(record, width, height, ratio)] += 1
                    seen["flipped" if record["flipped"] else "not flipped"] += 1
                    interp = [d[1] for d in record["draws"] if d[0] == "interp"]
                    if interpolation == "random":
                        seen[("bilinear", "bicubic")[interp[0]]] += 1
                    else:
                        seen[interpolation] += 1
            timm_transforms.random, torch.rand, tvf.hflip = original_random, original_rand, original_hflip
            np.save(out / f"{name}.npy", np.stack(results))
            manifest.append({
                "name": name, "size": size, "interpolation": interpolation, "seed": seed,
                "scale": list(scale), "scale_bits": [exact(v) for v in scale],
                "ratio": list(ratio), "ratio_bits": [exact(v) for v in ratio],
                "hflip": hflip, "hflip_bits": exact(hflip), "images": records,
            })
    finally:
        timm_transforms.random, torch.rand, tvf.hflip = original_random, original_rand, original_hflip
    missing = [what for what, count in seen.items() if count == 0]
    if missing:
        raise RuntimeError(f"the crop fixtures never exercise {missing}; pick other seeds ({seen})")
    (out / "manifest.json").write_text(json.dumps(
        {"inputs": len(images_in), "seen": seen, "cases": manifest}, indent=1))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("target/fixtures/crop"))
