#!/usr/bin/env python3
"""End-to-end training throughput of 1 rank against 2 ranks on this host.

Alternates `coordinator up --local --nodes 1` and `--nodes 2` (CPU ranks; the
coordinator gives each local worker its share of the cores) on the same recipe
and the same number of updates, and reads the throughput over all ranks that
the trainer logs (`images_per_sec` of the step records after the first,
which includes start-up). Prints a table, the medians and the ratio
2 ranks / 1 rank, then one JSON line.

    .venv/bin/python bench/ranks_throughput.py [--recipe recipes/fashion_mnist_resnet18.yaml] \\
        [--epochs 1] [--rounds 2] [--set data.root=...]

The global batch, and so the work per update, is the same for both: with 2
ranks each runs half the sampler streams. On one 2-core host the two ranks
share the cores, so this measures the overhead of the data-parallel machinery
(ring all-reduce over loopback, one process per rank) rather than a speed-up.
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


def run(nodes: int, args, out: str) -> float:
    cmd = [COORDINATOR, 'up', '--local', '--nodes', str(nodes), '--devices', 'cpu',
           '--recipe', args.recipe, '--out', out,
           '--set', f'schedule.cosine.epochs={args.epochs}', '--set', 'schedule.cosine.warmup_epochs=0',
           '--set', f'eval.every_epochs={args.epochs + 1}', '--set', 'runtime.log_every_steps=10']
    for s in args.set:
        cmd += ['--set', s]
    print(f"[{nodes} rank(s)] {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f'error: {nodes} rank(s) failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}')
    steps = []
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        for line in f:
            r = json.loads(line)
            if r.get('kind') == 'step':
                steps.append(r['images_per_sec'])
    if len(steps) < 2:
        sys.exit(f'error: {nodes} rank(s): fewer than 2 step records in {out}/metrics.jsonl')
    return statistics.median(steps[1:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--recipe', default=os.path.join(REPO, 'recipes', 'fashion_mnist_resnet18.yaml'))
    p.add_argument('--epochs', type=int, default=1)
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--set', action='append', default=[], help='recipe override for both runs')
    args = p.parse_args()
    results = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for nodes in (1, 2):
                ips = run(nodes, args, os.path.join(tmp, f'r{r}-n{nodes}'))
                results[nodes].append(ips)
                print(f'round {r}  {nodes} rank(s)  {ips:8.1f} img/s', flush=True)
    med = {n: statistics.median(v) for n, v in results.items()}
    print(f'median  1 rank  {med[1]:8.1f} img/s')
    print(f'median  2 ranks {med[2]:8.1f} img/s')
    print(f'ratio 2 ranks / 1 rank: {med[2] / med[1]:.3f}')
    print(json.dumps({'one_rank_images_per_sec': med[1], 'two_ranks_images_per_sec': med[2],
                      'ratio_two_over_one': med[2] / med[1], 'rounds': args.rounds,
                      'epochs': args.epochs, 'recipe': args.recipe, 'runs': results}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
