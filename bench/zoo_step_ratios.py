#!/usr/bin/env python3
"""Train-step speed of one model per family of the zoo, ours against timm.

For each model below, runs `bench/compare_train_step.py` (timm and
`worker bench step` alternately, same libtorch, batch, resolution, threads
and channels_last) and prints a Markdown table of the median images/s of
both sides and the ratio ours / timm (> 1: ours is faster), then one JSON line
with every result.

    .venv/bin/python bench/zoo_step_ratios.py [--rounds 3] [--models resnet50,vit_small_patch16_224]

Every step is forward + backward (BCE) + LAMB update, as in training.
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARE = os.path.join(REPO, 'bench', 'compare_train_step.py')

# (model, batch, resolution): one per family and per block type. The ViTs
# have a fixed 16x16-patch grid at 224 px in timm, hence their resolution.
FAMILIES = [
    ('resnet50', 16, 128),
    ('seresnet50', 16, 128),
    ('ecaresnet50t', 16, 128),
    ('resnext50_32x4d', 16, 128),
    ('regnety_040', 16, 128),
    ('efficientnet_b0', 16, 128),
    ('efficientnetv2_rw_s', 16, 128),
    ('vit_small_patch16_224', 8, 224),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--models', default='', help='comma-separated subset of the models above')
    p.add_argument('--timm-malloc-like-ours', action='store_true',
                   help="give timm's process the allocator settings the worker uses (see compare_train_step.py)")
    args = p.parse_args()
    wanted = set(filter(None, args.models.split(',')))
    results = []
    for model, batch, size in FAMILIES:
        if wanted and model not in wanted:
            continue
        cmd = [sys.executable, COMPARE, '--model', model, '--batch', str(batch), '--size', str(size),
               '--num-classes', '1000', '--steps', str(args.steps), '--warmup', str(args.warmup),
               '--threads', str(args.threads), '--rounds', str(args.rounds), '--channels-last']
        if args.timm_malloc_like_ours:
            cmd.append('--timm-malloc-like-ours')
        print(f'== {model}: batch {batch}, {size} px', file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            print(f'error: {model}: compare_train_step.py exited with {proc.returncode}', file=sys.stderr)
            return 1
        last = [line for line in proc.stdout.splitlines() if line.startswith('{')][-1]
        r = json.loads(last)
        r.pop('runs', None)
        results.append(r)
        print(f"   ours {r['ours_images_per_sec']:.1f} img/s, timm {r['timm_images_per_sec']:.1f} img/s, "
              f"ratio {r['ratio_ours_over_timm']:.3f}", file=sys.stderr, flush=True)
    print('| model | batch | px | timm img/s | ours img/s | ours / timm |')
    print('| --- | --- | --- | --- | --- | --- |')
    for r in results:
        print(f"| {r['model']} | {r['batch']} | {r['size']} | {r['timm_images_per_sec']:.1f} | "
              f"{r['ours_images_per_sec']:.1f} | {r['ratio_ours_over_timm']:.3f} |")
    print(json.dumps(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
