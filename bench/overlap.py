#!/usr/bin/env python3
"""Update time of a 2-rank CPU job with the gradient all-reduce overlapped with
the backward pass (`distributed.overlap_backward: true`, the default) and
after it (`false`), alternated in one run on this host.

Each run is `coordinator up --local --nodes 2` (two CPU ranks over the TCP
ring, each given half the cores) on the same recipe, stopped after the same
number of updates (`RSB_MAX_UPDATES`, read by the ranks). The throughput is the
median `images_per_sec` of the step records after the first (which holds
start-up); the update time is the global batch over it. Prints a table, the
medians and the ratio after / overlapped (> 1: overlap is faster), then one
JSON line.

    .venv/bin/python bench/overlap.py [--recipe recipes/fashion_mnist_resnet18.yaml] \\
        [--updates 40] [--rounds 2] [--set key=value ...]

Both settings reduce the same buckets in the same order: the losses are
identical (tests/tests/distributed.rs asserts it), only the timing differs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COORDINATOR = os.path.join(REPO, 'target', 'release', 'coordinator')


def global_batch(out: str) -> int:
    with open(os.path.join(out, 'recipe.yaml')) as f:
        in_batch = False
        for line in f:
            if line.startswith('batch:'):
                in_batch = True
            elif in_batch and line.strip().startswith('global_size:'):
                return int(line.split(':')[1])
    sys.exit(f'error: no batch.global_size in {out}/recipe.yaml')


def run(overlap: bool, args, out: str):
    cmd = [COORDINATOR, 'up', '--local', '--nodes', '2', '--devices', 'cpu', '--recipe', args.recipe,
           '--out', out, '--set', f'distributed.overlap_backward={str(overlap).lower()}',
           '--set', 'runtime.log_every_steps=5']
    for s in args.set:
        cmd += ['--set', s]
    env = {**os.environ, 'RSB_MAX_UPDATES': str(args.updates)}
    print(f"[overlap {overlap}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        sys.exit(f'error: overlap {overlap} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}')
    steps = []
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        for line in f:
            r = json.loads(line)
            if r.get('kind') == 'step':
                steps.append((r['step'], r['loss'], r['images_per_sec']))
    if len(steps) < 2:
        sys.exit(f'error: overlap {overlap}: fewer than 2 step records in {out}/metrics.jsonl')
    ips = statistics.median(s[2] for s in steps[1:])
    return ips, global_batch(out) / ips * 1e3, [(s[0], s[1]) for s in steps]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--recipe', default=os.path.join(REPO, 'recipes', 'fashion_mnist_resnet18.yaml'))
    p.add_argument('--updates', type=int, default=40)
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--set', action='append', default=[], help='recipe override for both settings')
    args = p.parse_args()
    results = {True: [], False: []}
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for overlap in (False, True):
                ips, ms, steps = run(overlap, args, os.path.join(tmp, f'r{r}-{overlap}'))
                results[overlap].append((ips, ms))
                losses.setdefault(overlap, steps)
                print(f'round {r}  overlap {str(overlap):5}  {ips:8.1f} img/s  {ms:8.1f} ms/update', flush=True)
    if losses[True] != losses[False]:
        print('WARNING: the logged losses differ between the two settings', file=sys.stderr)
    med = {o: (statistics.median(v[0] for v in rs), statistics.median(v[1] for v in rs))
           for o, rs in results.items()}
    print(f'median  after backward  {med[False][0]:8.1f} img/s  {med[False][1]:8.1f} ms/update')
    print(f'median  overlapped      {med[True][0]:8.1f} img/s  {med[True][1]:8.1f} ms/update')
    ratio = med[False][1] / med[True][1]
    print(f'update time after / overlapped: {ratio:.3f}')
    print(json.dumps({'after_backward_ms_per_update': med[False][1], 'overlapped_ms_per_update': med[True][1],
                      'ratio_after_over_overlapped': ratio, 'losses_equal': losses[True] == losses[False],
                      'rounds': args.rounds, 'updates': args.updates, 'recipe': args.recipe,
                      'runs': {str(k): v for k, v in results.items()}}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
