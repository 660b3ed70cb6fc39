#!/usr/bin/env python3
"""Time timm's training step on random input (the timm side of the speed comparison).

One step = forward, timm BinaryCrossEntropy(target_threshold=0.2) on random
soft (mixup-like) targets, backward, timm Lamb step (create_optimizer_v2
'lamb', lr 8e-3, weight decay 0.02, timm defaults otherwise, i.e. global
grad-norm clip 1.0 and no decay / no trust ratio for biases and norm
weights), zero_grad. The model is timm.create_model(M, num_classes=C) in
train mode; the input is a fixed random N(0, 1) batch of B x 3 x S x S.

`--warmup` untimed steps run first, then `--steps` timed ones (each timed
alone, with a device synchronisation on a GPU). Output on stdout: ONE JSON
line

  {"impl":"timm","model":M,"batch":B,"size":S,"threads":T,
   "images_per_sec": B * steps / (sum of timed step times),
   "step_ms_median": median timed step time in ms, ...}

(extra keys: channels_last, device, precision, num_classes, steps, warmup,
step_ms_min, step_ms_max, torch, timm, the phases' medians with
--phase-times, and with --count-ops aten_ops_per_step: the ATen operators
of one more step by phase, as bench/compare_step_ops.py reads them). Progress goes to stderr. The Rust
side (`worker bench step`) prints the same keys with "impl":"ours";
bench/compare_train_step.py runs both.

Usage:
  .venv/bin/python bench/timm/step_bench.py --model resnet18 \
      --batch 128 --size 32 --num-classes 10 --steps 30 --warmup 5 --threads 2
"""

import argparse
import json
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time timm's train step (forward, BCE, backward, Lamb, zero_grad) on random input.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', default='resnet18', help='timm model name')
    p.add_argument('--batch', type=int, default=128, help='images per step')
    p.add_argument('--size', type=int, default=32, help='input side in pixels')
    p.add_argument('--num-classes', type=int, default=10, help='classifier outputs')
    p.add_argument('--steps', type=int, default=30, help='timed steps')
    p.add_argument('--warmup', type=int, default=5, help='untimed steps first')
    p.add_argument('--threads', type=int, default=2, help='torch intra-op threads')
    p.add_argument('--channels-last', action='store_true', help='channels-last model and input')
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto',
                   help='auto = cuda when available, else cpu')
    p.add_argument('--precision', choices=['auto', 'fp32', 'bf16'], default='auto',
                   help='auto = bf16 autocast on a GPU, fp32 on a CPU (the recipe runtime.precision rule)')
    p.add_argument('--seed', type=int, default=0, help='seed of the weights and the random batch')
    p.add_argument('--foreach', choices=['auto', 'on', 'off'], default='auto',
                   help="Lamb's multi-tensor path: auto = timm's default (on for CUDA tensors)")
    p.add_argument('--count-ops', action='store_true',
                   help='after the timed steps, run one more step while counting the ATen operators '
                        'it calls (aten_ops_per_step), as `worker bench step --count-ops`')
    p.add_argument('--phase-times', action='store_true',
                   help='also time forward, backward and the optimizer apart (a device '
                        'synchronisation between them on a GPU), as `worker bench step --phase-times`')
    return p.parse_args(argv)


def count_top_level_aten_ops(work):
    """Runs work() and returns its result and how many times it called each
    ATen operator outside any other aten:: operator (parents that are not
    aten:: operators, such as `Optimizer.step#Lamb.step` or the autograd
    engine's `evaluate_function` scopes, are looked through), the rule
    `worker bench step --count-ops` counts by (rsb_torch_shim::op_count,
    which follows the calls themselves where torch.profiler links events
    by their times on each thread)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = work()
    counts = {}
    for event in prof.events():
        if not event.name.startswith('aten::'):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith('aten::'):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] = counts.get(event.name, 0) + 1
    return result, dict(sorted(counts.items()))


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    args = parse_args(argv)
    for name in ('batch', 'size', 'num_classes', 'steps', 'threads'):
        if getattr(args, name) < 1:
            die(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        die('--warmup must be >= 0')

    import torch
    import timm
    from timm.loss import BinaryCrossEntropy
    from timm.optim import create_optimizer_v2

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device == 'auto':
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    elif args.device == 'cuda':
        if not torch.cuda.is_available():
            die('--device cuda given but torch.cuda.is_available() is False')
        device = torch.device('cuda')
    else:
        device = torch.device('cpu')
    on_gpu = device.type == 'cuda'
    if on_gpu:  # as timm's train.py main()
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.precision == 'bf16' and not on_gpu:
        die('--precision bf16 is GPU only (as the recipe schema)')
    amp_dtype = torch.bfloat16 if on_gpu and args.precision in ('auto', 'bf16') else None

    try:
        model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    except RuntimeError as e:
        die(f"timm.create_model({args.model!r}): {e}")
    model.to(device)
    model.train()
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=mf)
    loss_fn = BinaryCrossEntropy(smoothing=0.0, target_threshold=0.2).to(device)
    foreach = {'auto': None, 'on': True, 'off': False}[args.foreach]
    optimizer = create_optimizer_v2(model, 'lamb', lr=8e-3, weight_decay=0.02, foreach=foreach)

    B, C = args.batch, args.num_classes
    x = torch.randn(B, 3, args.size, args.size, device=device).contiguous(memory_format=mf)
    # random mixup-like soft targets: lam * onehot(a) + (1 - lam) * onehot(b)
    a = torch.randint(0, C, (B,), device=device)
    b = torch.randint(0, C, (B,), device=device)
    lam = torch.rand(B, 1, device=device)
    eye = torch.eye(C, device=device)
    target = lam * eye[a] + (1 - lam) * eye[b]

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    # Phase times (ms) of the timed steps, when asked for.
    phases = {'forward': [], 'backward': [], 'optimizer': []}

    def phase_sync(marks):
        if args.phase_times:
            sync()
            marks.append(time.perf_counter())

    def forward():
        if amp_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=amp_dtype):
                out = model(x)
                return loss_fn(out, target)
        out = model(x)
        return loss_fn(out, target)

    def update():
        optimizer.step()
        optimizer.zero_grad()

    def step(marks):
        phase_sync(marks)
        loss = forward()
        phase_sync(marks)
        loss.backward()
        phase_sync(marks)
        update()
        phase_sync(marks)
        return loss

    def counted_step():
        """One step, each phase's operators counted apart."""
        loss, forward_ops = count_top_level_aten_ops(forward)
        _, backward_ops = count_top_level_aten_ops(loss.backward)
        _, update_ops = count_top_level_aten_ops(update)
        return {'forward': forward_ops, 'backward': backward_ops, 'update': update_ops}

    for i in range(args.warmup):
        step([])
    sync()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        marks = []
        loss = step(marks)
        sync()
        times.append(time.perf_counter() - t0)
        if args.phase_times:
            for name, (a, b) in zip(('forward', 'backward', 'optimizer'), zip(marks, marks[1:])):
                phases[name].append((b - a) * 1e3)
        print(f"step {i} {times[-1] * 1e3:.1f} ms loss {loss.item():.4f}", file=sys.stderr)

    # The same step once more, each phase's operators counted apart (no
    # synchronisation inside the step, so that only its own operators are
    # counted): the forward pass with the loss, the backward pass, and the
    # update with the gradients' reset.
    aten_ops_per_step = counted_step() if args.count_ops else None
    sync()

    res = {
        'impl': 'timm',
        'model': args.model,
        'batch': B,
        'size': args.size,
        'threads': args.threads,
        'images_per_sec': B * len(times) / sum(times),
        'step_ms_median': statistics.median(times) * 1e3,
        'step_ms_min': min(times) * 1e3,
        'step_ms_max': max(times) * 1e3,
        'num_classes': C,
        'steps': args.steps,
        'warmup': args.warmup,
        'channels_last': args.channels_last,
        'device': str(device) if not on_gpu else torch.cuda.get_device_name(device),
        'precision': 'bf16' if amp_dtype is not None else 'fp32',
        'torch': torch.__version__,
        'timm': timm.__version__,
        'foreach': args.foreach,
        'forward_ms_median': statistics.median(phases['forward']) if args.phase_times else None,
        'backward_ms_median': statistics.median(phases['backward']) if args.phase_times else None,
        'optimizer_ms_median': statistics.median(phases['optimizer']) if args.phase_times else None,
        'aten_ops_per_step': aten_ops_per_step,
    }
    print(json.dumps(res), flush=True)


if __name__ == '__main__':
    main()
