"""Generates every oracle fixture the parity tests compare against, using
timm 1.0.31 and Pillow from the project venv.

    .venv/bin/python tests/oracle/gen_fixtures.py [--out target/fixtures] [--only STEP ...]

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
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="STEP",
        help="regenerate only these steps (by key, e.g. grad_scaler) and restamp the folder; "
        "refused unless the stamp is current for every other oracle script (this driver aside)",
    )
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
    if not args.force and not args.only and marker.is_file() and json.loads(marker.read_text()) == stamp:
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
    # (description, key: the fixture folder and --only name, oracle script, generator)
    steps = [
        ("models", "models", "models.py", lambda: models.generate(args.out / "models")),
        ("lamb", "lamb", "numerics.py", lambda: numerics.generate_lamb(args.out / "lamb")),
        ("mixup+bce", "mixup", "numerics.py", lambda: numerics.generate_mixup(args.out / "mixup")),
        ("schedule", "schedule", "numerics.py", lambda: numerics.generate_schedule(args.out / "schedule")),
        ("sampler", "sampler", "numerics.py", lambda: numerics.generate_sampler(args.out / "sampler")),
        ("pil_ops", "pil_ops", "pil_ops.py", lambda: pil_ops.generate(args.out / "pil_ops", assets.photos())),
        ("decode+eval", "decode_eval", "decode_eval.py", lambda: decode_eval.generate(args.out / "decode_eval", assets.photos())),
        ("eval sets (ReaL, V2)", "eval_sets", "eval_sets.py", lambda: eval_sets.generate(args.out / "eval_sets")),
        ("bad images (Pillow sdist)", "bad_images", "bad_images.py", lambda: bad_images.generate(args.out / "bad_images")),
        ("train step (BN, BCE, LAMB, drop path)", "train_step", "train_step.py", lambda: __import__("train_step").generate(args.out / "train_step")),
        ("rand_augment draws", "rand_augment", "rand_augment_draws.py", lambda: __import__("rand_augment_draws").generate(args.out / "rand_augment")),
        ("crop+flip draws", "crop", "crop_draws.py", lambda: __import__("crop_draws").generate(args.out / "crop")),
        ("worker eval CLI (ReaL, V2)", "eval_cli", "eval_cli.py", lambda: eval_cli.generate(args.out / "eval_cli")),
        ("seed-study statistics (scipy.stats)", "seed_stats", "seed_stats.py", lambda: __import__("seed_stats").generate(args.out / "seed_stats")),
        ("fp16 loss scaler (torch.amp.GradScaler)", "grad_scaler", "grad_scaler.py", lambda: __import__("grad_scaler").generate(args.out / "grad_scaler")),
    ]
    if args.only:
        keys = {key for _, key, _, _ in steps}
        unknown = sorted(set(args.only) - keys)
        if unknown:
            print(f"error: unknown steps {unknown}; the steps are {sorted(keys)}", file=sys.stderr)
            return 2
        # The other fixtures are kept only if the stamp vouches for them:
        # same versions, and no script changed but this driver and those
        # whose every step is regenerated now.
        others = {script for _, key, script, _ in steps if key not in args.only}
        allowed = {"gen_fixtures.py"} | {
            script for _, key, script, _ in steps if key in args.only and script not in others
        }
        old = json.loads(marker.read_text()) if marker.is_file() else {}
        old_sources = old.get("sources", {})
        stale = [k for k in ("timm", "torch", "pillow") if old.get(k) != stamp[k]]
        stale += sorted(
            name
            for name in set(old_sources) | set(stamp["sources"])
            if name not in allowed and old_sources.get(name) != stamp["sources"].get(name)
        )
        if stale:
            print(f"error: --only: the other fixtures are stale too ({', '.join(stale)}); "
                  "regenerate everything (without --only)", file=sys.stderr)
            return 2
        steps = [step for step in steps if step[1] in args.only]
    for name, _key, _script, step in steps:
        print(f"generating {name} fixtures", flush=True)
        step()
    marker.write_text(json.dumps(stamp, indent=1))
    print(f"fixtures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
