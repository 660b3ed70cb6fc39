#!/usr/bin/env python3
"""Count the ATen operators one training step calls, ours against timm's, phase by phase.

On a GPU every operator that computes is at least one kernel launch and
some microseconds of host time, and an operator that reads a value on the
host (`item`) waits for the device. So the operators a step calls show,
on a CPU and without a GPU, where one implementation of the same step does
work the other does not. Both sides count by one rule: an operator is
counted when it is called outside any other `aten::` operator (ours: rsb_torch_shim::op_count; timm: torch.profiler's
events, looking through parents that are not `aten::` operators, such as
`Optimizer.step#Lamb.step`).

Runs, in one invocation:

  * ours:  target/release/worker bench step --count-ops --steps 1 --warmup 1 ...
  * timm:  <python> bench/timm/step_bench.py --count-ops --steps 1 --warmup 1 ...

with the step of the GPU configuration by default (channels-last; LAMB's
packed path against timm's multi-tensor `foreach` path, which timm takes on
CUDA), in fp32 on the CPU (under bf16 autocast timm's casts happen inside
the operators they feed and are not counted, while ours are: the counts
would differ by bookkeeping, not work). Prints, for each phase (forward with
the loss, backward, update with the gradients' reset), the operators each
side calls, split into views (no kernel), host reads (a device wait on a
GPU) and the rest, then every operator whose counts differ; then ONE JSON
line: {"phases": {phase: {"ours": {...}, "timm": {...}}}, "totals": ...,
<settings>}.

Usage (from the repository root, after `cargo build --release`):
  .venv/bin/python bench/compare_step_ops.py --model resnet50 --size 64
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMM_BENCH = os.path.join(REPO, 'bench', 'timm', 'step_bench.py')
DEFAULT_WORKER = os.path.join(REPO, 'target', 'release', 'worker')
PHASES = ('forward', 'backward', 'update')
# Operators that only make a new view of a tensor's memory: no kernel.
VIEWS = frozenset(f'aten::{name}' for name in (
    'alias', 'as_strided', 'chunk', 'detach', 'expand', 'flatten', 'narrow', 'permute',
    'reshape', 'select', 'slice', 'split', 'split_with_sizes', 'squeeze', 't', 'transpose',
    'unbind', 'unflatten', 'unsqueeze', 'view', '_reshape_alias', 'view_as'))
# Operators that read a tensor's value on the host: on a GPU, a wait for the device.
HOST_READS = frozenset(f'aten::{name}' for name in (
    'item', '_local_scalar_dense', 'is_nonzero', 'nonzero', 'equal', 'allclose', 'tolist'))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Count the ATen operators of one training step, ours against timm's.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', default='resnet50')
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--contiguous', action='store_true',
                   help='contiguous (NCHW) model and input instead of channels-last')
    p.add_argument('--update-path', choices=['packed', 'per-tensor'], default='packed',
                   help="ours: LAMB's packed or per-tensor path; timm: foreach on or off to match")
    p.add_argument('--worker', default=DEFAULT_WORKER, help='path of the Rust worker binary')
    p.add_argument('--python', default=sys.executable, help='Python with torch + timm for the timm side')
    p.add_argument('--timeout', type=float, default=600, help='seconds allowed per side')
    return p.parse_args(argv)


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def run_side(impl, cmd, timeout):
    print(f"[{impl}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        die(f"{impl} ran past --timeout {timeout}s: {' '.join(cmd)}")
    if p.returncode != 0:
        die(f"{impl} failed (exit {p.returncode}): {' '.join(cmd)}\n--- stderr ---\n{p.stderr[-4000:]}")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith('{'):
            try:
                res = json.loads(line)
            except json.JSONDecodeError:
                continue
            counts = res.get('aten_ops_per_step')
            if not isinstance(counts, dict) or sorted(counts) != sorted(PHASES):
                die(f"{impl} printed no per-phase aten_ops_per_step ({PHASES}): {line[:400]}")
            return counts
    die(f"{impl} printed no JSON line: {' '.join(cmd)}\n--- stdout ---\n{p.stdout[-4000:]}")


def split(counts):
    """Calls in `counts` that are views, host reads, and the rest."""
    views = sum(n for op, n in counts.items() if op in VIEWS)
    reads = sum(n for op, n in counts.items() if op in HOST_READS)
    return {'total': sum(counts.values()), 'views': views, 'host_reads': reads,
            'others': sum(counts.values()) - views - reads}


def main(argv=None):
    a = parse_args(argv)
    if not os.access(a.worker, os.X_OK):
        die(f"Rust worker binary not found or not executable: {a.worker} (cargo build --release first)")
    common = ['--model', a.model, '--batch', str(a.batch), '--size', str(a.size),
              '--num-classes', str(a.num_classes), '--threads', str(a.threads),
              '--steps', '1', '--warmup', '1', '--count-ops']
    if not a.contiguous:
        common.append('--channels-last')
    ours_cmd = [a.worker, 'bench', 'step', '--device', 'cpu', '--update-path', a.update_path] + common
    timm_cmd = [a.python, TIMM_BENCH, '--device', 'cpu', '--precision', 'fp32',
                '--foreach', 'on' if a.update_path == 'packed' else 'off'] + common
    sides = {'ours': run_side('ours', ours_cmd, a.timeout), 'timm': run_side('timm', timm_cmd, a.timeout)}

    layout = 'contiguous' if a.contiguous else 'channels-last'
    print(f"ATen operators per training step: {a.model}, batch {a.batch}, {a.size} px, {layout}, "
          f"fp32, ours' {a.update_path} LAMB against timm's foreach={'on' if a.update_path == 'packed' else 'off'}")
    print(f"{'phase':<9} {'side':<5} {'total':>6} {'views':>6} {'host reads':>10} {'others':>7}")
    totals = {'ours': {}, 'timm': {}}
    for phase in PHASES:
        for impl in ('ours', 'timm'):
            s = split(sides[impl][phase])
            for key, n in s.items():
                totals[impl][key] = totals[impl].get(key, 0) + n
            print(f"{phase:<9} {impl:<5} {s['total']:>6} {s['views']:>6} {s['host_reads']:>10} {s['others']:>7}")
    for impl in ('ours', 'timm'):
        s = totals[impl]
        print(f"{'step':<9} {impl:<5} {s['total']:>6} {s['views']:>6} {s['host_reads']:>10} {s['others']:>7}")
    print(f"ratio ours/timm, operators other than views and host reads: "
          f"{totals['ours']['others'] / max(1, totals['timm']['others']):.2f}")
    print("(calls, not kernels: on a GPU a multi-tensor aten::_foreach_* call launches a kernel per "
          "chunk of its list, or one per tensor where its tensors' shapes differ, as timm's trust-ratio "
          "scaling; a host read of a CPU tensor, as timm's step counter, waits for nothing)")

    print('\noperators whose counts differ (ours, timm):')
    for phase in PHASES:
        ours, timm = sides['ours'][phase], sides['timm'][phase]
        diff = sorted((op for op in set(ours) | set(timm) if ours.get(op, 0) != timm.get(op, 0)),
                      key=lambda op: (-abs(ours.get(op, 0) - timm.get(op, 0)), op))
        if not diff:
            print(f"  {phase}: none")
            continue
        print(f"  {phase}:")
        for op in diff:
            kind = ' (view)' if op in VIEWS else ' (host read)' if op in HOST_READS else ''
            print(f"    {op + kind:<48} {ours.get(op, 0):>5} {timm.get(op, 0):>5}")

    print(json.dumps({
        'phases': {phase: {impl: sides[impl][phase] for impl in sides} for phase in PHASES},
        'totals': totals,
        'model': a.model, 'batch': a.batch, 'size': a.size, 'num_classes': a.num_classes,
        'channels_last': not a.contiguous, 'update_path': a.update_path, 'precision': 'fp32',
    }), flush=True)


if __name__ == '__main__':
    main()
