"""Generates every oracle fixture the parity tests compare against, using
timm 1.0.31 and Pillow from the project venv.

    .venv/bin/python tests/oracle/gen_fixtures.py [--out target/fixtures]

The fixtures are generated (in CI too), not committed: weights alone are
hundreds of megabytes. A marker file records the timm/torch/Pillow versions so
that stale fixtures are regenerated.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "target" / "fixtures")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args()

    import PIL
    import timm
    import torch

    import hashlib

    sources = sorted(HERE.glob("*.py"))
    stamp = {
        "timm": timm.__version__,
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "sources": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources},
    }
    marker = args.out / "VERSIONS.json"
    if not args.force and marker.is_file() and json.loads(marker.read_text()) == stamp:
        print(f"fixtures in {args.out} are up to date")
        return 0
    if timm.__version__ != "1.0.31":
        print(f"error: the oracle is timm 1.0.31, this venv has {timm.__version__}", file=sys.stderr)
        return 2

    import assets
    import bad_images
    import decode_eval
    import eval_cli
    import eval_sets
    import models
    import numerics
    import pil_ops

    args.out.mkdir(parents=True, exist_ok=True)
    steps = [
        ("models", lambda: models.generate(args.out / "models")),
        ("lamb", lambda: numerics.generate_lamb(args.out / "lamb")),
        ("mixup+bce", lambda: numerics.generate_mixup(args.out / "mixup")),
        ("schedule", lambda: numerics.generate_schedule(args.out / "schedule")),
        ("sampler", lambda: numerics.generate_sampler(args.out / "sampler")),
        ("pil_ops", lambda: pil_ops.generate(args.out / "pil_ops", assets.photos())),
        ("decode+eval", lambda: decode_eval.generate(args.out / "decode_eval", assets.photos())),
        ("eval sets (ReaL, V2)", lambda: eval_sets.generate(args.out / "eval_sets")),
        ("bad images (Pillow sdist)", lambda: bad_images.generate(args.out / "bad_images")),
        ("train step (BN, BCE, LAMB, drop path)", lambda: __import__("train_step").generate(args.out / "train_step")),
        ("rand_augment draws", lambda: __import__("rand_augment_draws").generate(args.out / "rand_augment")),
        ("worker eval CLI (ReaL, V2)", lambda: eval_cli.generate(args.out / "eval_cli")),
        ("seed-study statistics (scipy.stats)", lambda: __import__("seed_stats").generate(args.out / "seed_stats")),
    ]
    for name, step in steps:
        print(f"generating {name} fixtures", flush=True)
        step()
    marker.write_text(json.dumps(stamp, indent=1))
    print(f"fixtures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
