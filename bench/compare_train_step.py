#!/usr/bin/env python3
"""Compare the training-step speed of timm and of the project's Rust trainer.

Runs, in one invocation and on the same machine, alternately (timm, ours,
timm, ours, ... for --rounds rounds):

  * timm:  <python> bench/timm/step_bench.py --model M --batch B
           --size S --num-classes C --steps N --warmup W --threads T
           [--channels-last]
  * ours:  target/release/worker bench step --model M --batch B --size S
           --num-classes C --steps N --warmup W --threads T [--channels-last]

Each prints one JSON line with the keys impl, model, batch, size, threads,
images_per_sec, step_ms_median (the last JSON line of its stdout is used).
This script prints a table of all runs, the median images/s of each side
over the rounds and the ratio ours / timm (> 1 means the Rust trainer is
faster), then ONE final JSON line:

  {"timm_images_per_sec", "ours_images_per_sec", "ratio_ours_over_timm",
   "timm_step_ms_median", "ours_step_ms_median", "rounds", <settings>,
   "runs": [...every run's JSON...]}

Both sides pick their device the same way (a GPU when there is one, bf16
autocast there, fp32 on a CPU): compare only runs whose "device" agree.

Usage (from the repository root, after `cargo build --release`):
  .venv/bin/python bench/compare_train_step.py --model resnet18 --batch 128 \
      --size 32 --num-classes 10 --steps 30 --warmup 5 --threads 2 --rounds 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMM_BENCH = os.path.join(REPO, 'bench', 'timm', 'step_bench.py')
DEFAULT_WORKER = os.path.join(REPO, 'target', 'release', 'worker')
# What `worker` sets for itself with mallopt at start-up (worker/src/main.rs).
TIMM_MALLOC_LIKE_OURS = {'MALLOC_MMAP_THRESHOLD_': str(64 << 20), 'MALLOC_TRIM_THRESHOLD_': str(2**31 - 1)}
REQUIRED_KEYS = ('impl', 'model', 'batch', 'size', 'threads', 'images_per_sec', 'step_ms_median')


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Alternate timm and Rust train-step benchmarks and print the speed ratio ours/timm.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', default='resnet18')
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--size', type=int, default=32)
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--steps', type=int, default=30, help='timed steps per run')
    p.add_argument('--warmup', type=int, default=5, help='untimed steps per run')
    p.add_argument('--threads', type=int, default=2, help='intra-op threads of both sides')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--rounds', type=int, default=2, help='number of (timm, ours) pairs')
    p.add_argument('--worker', default=DEFAULT_WORKER, help='path of the Rust worker binary')
    p.add_argument('--python', default=sys.executable, help='Python with torch + timm for the timm side')
    p.add_argument('--timeout', type=float, default=1800, help='seconds allowed per run')
    p.add_argument('--timm-malloc-like-ours', action='store_true',
                   help="run the timm side with glibc's allocator set as the worker sets it for itself "
                        "(no trimming, mmap threshold 64 MiB): compares the libtorch work alone")
    return p.parse_args(argv)


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def common_flags(a):
    f = ['--model', a.model, '--batch', str(a.batch), '--size', str(a.size),
         '--num-classes', str(a.num_classes), '--steps', str(a.steps), '--warmup', str(a.warmup),
         '--threads', str(a.threads)]
    if a.channels_last:
        f.append('--channels-last')
    return f


def run_one(impl, cmd, a):
    print(f"[{impl}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        env = dict(os.environ)
        if impl == 'timm' and a.timm_malloc_like_ours:
            env.update(TIMM_MALLOC_LIKE_OURS)
        p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=a.timeout, env=env)
    except subprocess.TimeoutExpired:
        die(f"{impl} bench ran past --timeout {a.timeout}s: {' '.join(cmd)}")
    if p.returncode != 0:
        die(f"{impl} bench failed (exit {p.returncode}): {' '.join(cmd)}\n--- stdout ---\n{p.stdout[-4000:]}"
            f"\n--- stderr ---\n{p.stderr[-4000:]}")
    res = None
    for line in reversed(p.stdout.splitlines()):
        line = line.strip()
        if line.startswith('{'):
            try:
                res = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if res is None:
        die(f"{impl} bench printed no JSON line: {' '.join(cmd)}\n--- stdout ---\n{p.stdout[-4000:]}")
    missing = [k for k in REQUIRED_KEYS if k not in res]
    if missing:
        die(f"{impl} bench JSON lacks keys {missing}: {res}")
    if res['impl'] != impl:
        die(f"expected \"impl\": \"{impl}\", got {res['impl']!r} from {' '.join(cmd)}")
    for key, want in (('model', a.model), ('batch', a.batch), ('size', a.size), ('threads', a.threads)):
        if res[key] != want:
            die(f"{impl} bench reports {key}={res[key]!r}, asked for {want!r}")
    return res


def main(argv=None):
    a = parse_args(argv)
    if a.rounds < 1:
        die('--rounds must be >= 1')
    if not os.path.isfile(a.worker):
        die(f"Rust worker binary not found: {a.worker}\n"
            f"Build it first (cargo build --release, in {REPO}) or pass --worker PATH. "
            "It must provide `worker bench step --model M --batch B --size S --num-classes C "
            "--steps N --warmup W --threads T [--channels-last]`.")
    if not os.access(a.worker, os.X_OK):
        die(f"Rust worker binary is not executable: {a.worker}")
    if not os.path.isfile(TIMM_BENCH):
        die(f"timm bench script not found: {TIMM_BENCH}")

    flags = common_flags(a)
    cmds = {
        'timm': [a.python, TIMM_BENCH] + flags,
        'ours': [a.worker, 'bench', 'step'] + flags,
    }
    runs = []
    for r in range(a.rounds):
        for impl in ('timm', 'ours'):
            res = run_one(impl, cmds[impl], a)
            res['round'] = r
            runs.append(res)

    by = {impl: [x for x in runs if x['impl'] == impl] for impl in ('timm', 'ours')}
    devices = {impl: sorted({str(x.get('device', '?')) for x in by[impl]}) for impl in by}

    print(f"{'round':>5}  {'impl':<5}  {'images/s':>10}  {'step ms (median)':>16}  device")
    for x in runs:
        print(f"{x['round']:>5}  {x['impl']:<5}  {x['images_per_sec']:>10.1f}  {x['step_ms_median']:>16.2f}  "
              f"{x.get('device', '?')}")
    med = {impl: statistics.median(x['images_per_sec'] for x in by[impl]) for impl in by}
    med_ms = {impl: statistics.median(x['step_ms_median'] for x in by[impl]) for impl in by}
    ratio = med['ours'] / med['timm']
    print(f"median  timm   {med['timm']:>10.1f}  {med_ms['timm']:>16.2f}")
    print(f"median  ours   {med['ours']:>10.1f}  {med_ms['ours']:>16.2f}")
    print(f"ratio ours/timm (images/s): {ratio:.3f}")
    if devices['timm'] != devices['ours'] and '?' not in devices['ours'] + devices['timm']:
        print(f"warning: the two sides ran on different devices: timm {devices['timm']}, ours {devices['ours']}",
              file=sys.stderr)

    print(json.dumps({
        'timm_images_per_sec': med['timm'],
        'ours_images_per_sec': med['ours'],
        'ratio_ours_over_timm': ratio,
        'timm_step_ms_median': med_ms['timm'],
        'ours_step_ms_median': med_ms['ours'],
        'rounds': a.rounds,
        'model': a.model, 'batch': a.batch, 'size': a.size, 'num_classes': a.num_classes,
        'steps': a.steps, 'warmup': a.warmup, 'threads': a.threads, 'channels_last': a.channels_last,
        'timm_malloc_like_ours': a.timm_malloc_like_ours,
        'runs': runs,
    }), flush=True)


if __name__ == '__main__':
    main()
