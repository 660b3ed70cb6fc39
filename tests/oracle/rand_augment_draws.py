"""RandAugment sampling fixtures from timm 1.0.31: timm's own random draws,
its per-op decisions and its output images, for the Rust replay test
(tests/tests/parity_rand_augment.rs).

For each config string of `CASES` (the RSB ones and three that exercise the
magnitude clip at 10 and at 0, uniform magnitudes, `p` and the default op set),
`rand_augment_transform(spec, hparams)` is built as timm's
`transforms_factory` builds it (fill `img_mean` = (124, 116, 104); a fixed
`interpolation` unless the case uses timm's random one) and called on
`IMAGES` photos. While it runs, `auto_augment.np` and `auto_augment.random`
are replaced by thin recorders that call numpy's and Python's real
generators (seeded per case) and log every result in call order:

* `["op", i]`: the index of each op `np.random.choice` picked;
* `["random", bits, v]`: `random.random()` (the apply draw and the sign draws);
* `["gauss", bits, v]` / `["uniform", bits, v]`: the magnitude noise, before the clip;
* `["interp", i]`: `random.choice` over `_RANDOM_INTERPOLATION`.

Each chosen `AugmentOp` also records what it did: whether it ran, the
magnitude its level function received (after the clip) and the level
arguments (floats also as their IEEE-754 bits, `*_bits`, which the test
reads: decimal JSON floats need not parse back exactly). The op set, `prob`, `magnitude`, `magnitude_std` and
`magnitude_max` of every `AugmentOp` are recorded too (an infinite
`magnitude_std` as the string "inf": JSON has no infinity).

Images are 64x48 crops (bicubic-downscaled) of the test photos, stored as
uint8 HxWx3 arrays: `inputs.npy` [P, H, W, 3], `<case>.npy` [N, H, W, 3]
(image j is computed from input j % P).
"""
from __future__ import annotations

import json
import math
import struct
import random as python_random
from pathlib import Path

import numpy as np
from PIL import Image
from timm.data import auto_augment
from timm.data.auto_augment import rand_augment_transform

FILL = (124, 116, 104)
SIZE = (64, 48)
IMAGES = 40

# (case name, config string, interpolation: "random" or a PIL filter name, seed).
# Pillow 13 refuses to posterize to 0 bits (timm's Posterize below magnitude
# 2.5, PosterizeIncreasing at 10), so the low-magnitude cases use the
# increasing set and the one that clips at 10 the default set; the seeds are
# fixed, and a draw that still hits it stops generation with a clear error.
CASES = [
    ("rsb_a1a2", "rand-m7-mstd0.5-inc1", "random", 11),
    ("rsb_a3", "rand-m6-n1-mstd0.5-inc1", "bicubic", 12),
    ("clip_high", "rand-m9-n3-mstd2", "bilinear", 13),
    ("clip_low", "rand-m1-n3-mstd2-p0.8-inc1", "random", 14),
    ("uniform", "rand-m8-mstd101-p0.7-inc1", "random", 15),
]

FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def exact(v) -> int:
    """The IEEE-754 bits of `float(v)`: JSON readers need not round decimal
    floats correctly (serde_json's default parser can be one ulp off)."""
    return struct.unpack("<Q", struct.pack("<d", float(v)))[0]


class RecordingRandom:
    """The part of Python's `random` module timm's RandAugment uses, logging results."""

    def __init__(self, seed: int, log: list):
        self._rng = python_random.Random(seed)
        self._log = log

    def random(self):
        v = self._rng.random()
        self._log.append(["random", exact(v), v])
        return v

    def gauss(self, mu, sigma):
        v = self._rng.gauss(mu, sigma)
        self._log.append(["gauss", exact(v), v])
        return v

    def uniform(self, a, b):
        v = self._rng.uniform(a, b)
        self._log.append(["uniform", exact(v), v])
        return v

    def choice(self, seq):
        # Same consumption as `self._rng.choice(seq)`; the index is what matters.
        i = self._rng.choice(range(len(seq)))
        self._log.append(["interp", i])
        return seq[i]


class RecordingNumpy:
    """`numpy` as seen by auto_augment.py, with `np.random.choice` logged."""

    def __init__(self, seed: int, log: list):
        self._state = np.random.RandomState(seed)
        self._log = log
        self.random = self

    def choice(self, a, size=None, replace=True, p=None):
        picked = self._state.choice(a, size, replace=replace, p=p)
        for op in picked:
            self._log.append(["op", next(i for i, o in enumerate(a) if o is op)])
        return picked

    def __getattr__(self, name):
        return getattr(np, name)


def photos_small() -> np.ndarray:
    import assets

    images = []
    for path in sorted(assets.photos()):
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            # Centre crop to 4:3, then downscale.
            cw, ch = (w, w * 3 // 4) if w * 3 // 4 <= h else (h * 4 // 3, h)
            left, top = (w - cw) // 2, (h - ch) // 2
            im = im.crop((left, top, left + cw, top + ch)).resize(SIZE, Image.Resampling.BICUBIC)
            images.append(np.asarray(im, dtype=np.uint8))
    return np.stack(images)


def trace_ops(ra, events: list) -> None:
    """Wraps every op's level and image functions to log its decisions."""
    for op in ra.ops:
        def level(magnitude, hparams, _fn=op.level_fn, _op=op):
            events[-1]["magnitude"] = magnitude
            events[-1]["magnitude_bits"] = exact(magnitude)
            args = _fn(magnitude, hparams)
            events[-1]["args"] = list(args)
            events[-1]["args_bits"] = [exact(a) for a in args]
            return args

        def apply(img, *args, _fn=op.aug_fn, **kwargs):
            events[-1]["applied"] = True
            return _fn(img, *args, **kwargs)

        if op.level_fn is not None:
            op.level_fn = level
        op.aug_fn = apply


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    inputs = photos_small()
    np.save(out / "inputs.npy", inputs)
    original_call = auto_augment.AugmentOp.__call__
    original_np, original_random = auto_augment.np, auto_augment.random
    manifest = []
    try:
        for name, spec, interpolation, seed in CASES:
            hparams = dict(translate_const=int(min(SIZE) * 0.45), img_mean=FILL)
            if interpolation != "random":
                hparams["interpolation"] = FILTERS[interpolation]
            ra = rand_augment_transform(spec, hparams)
            ops = [{"name": op.name, "prob": op.prob, "magnitude": op.magnitude,
                    "magnitude_std": "inf" if math.isinf(op.magnitude_std) else op.magnitude_std, "magnitude_max": op.magnitude_max}
                   for op in ra.ops]
            draws: list = []
            events: list = []
            trace_ops(ra, events)

            def traced_call(self, img, _events=events):
                _events.append({"name": self.name, "applied": False})
                return original_call(self, img)

            auto_augment.AugmentOp.__call__ = traced_call
            auto_augment.np = RecordingNumpy(seed, draws)
            auto_augment.random = RecordingRandom(seed, draws)
            images, records = [], []
            for j in range(IMAGES):
                start_draw, start_event = len(draws), len(events)
                img = Image.fromarray(inputs[j % len(inputs)])
                try:
                    result = ra(img)
                except ValueError as e:
                    raise RuntimeError(f"{name}: image {j}: timm failed ({e}); pick another seed") from e
                images.append(np.asarray(result, dtype=np.uint8))
                records.append({"input": j % len(inputs), "draws": draws[start_draw:],
                                "ops": events[start_event:]})
            auto_augment.AugmentOp.__call__ = original_call
            auto_augment.np, auto_augment.random = original_np, original_random
            np.save(out / f"{name}.npy", np.stack(images))
            manifest.append({"name": name, "spec": spec, "interpolation": interpolation,
                             "fill": list(FILL), "num_layers": ra.num_layers, "ops": ops,
                             "images": records})
    finally:
        auto_augment.AugmentOp.__call__ = original_call
        auto_augment.np, auto_augment.random = original_np, original_random
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("target/fixtures/rand_augment"))
