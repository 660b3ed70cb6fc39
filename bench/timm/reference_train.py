#!/usr/bin/env python3
"""Reference trainer: train a recipe with timm's own components (the oracle).

The project's Rust trainer must reach the same accuracy as timm's components
run with the same settings on the same machine. This script is the timm side:
it reads the same recipe YAML as the Rust trainer (schema:
recipes/src/schema.rs, same defaults for absent fields, unknown fields are
errors) and trains it the way timm's train.py would, using

  * timm.create_model(name, num_classes, drop_path_rate, zero_init_last)
  * timm.data.create_dataset('', ROOT, split=<train_split|val_split>)
    (ImageDataset over ROOT/<split>/<class>/*, images converted to RGB,
    classes in timm's natural sort order)
  * timm.data.create_transform(is_training=True, scale, ratio, hflip,
    vflip=0, color_jitter=None, auto_augment=<rand_augment>,
    interpolation=<augment.interpolation>, mean, std, re_prob=0) and the
    eval transform (resize shorter side to floor(size / crop_pct), centre
    crop, eval interpolation)
  * a torch DataLoader (shuffle, drop_last) of `batch.micro_size` images;
    with `batch.repeated_augmentation` R > 1, timm's RepeatAugSampler with
    W = global_size / micro_size virtual ranks (see below)
  * timm.data.Mixup on each micro-batch (normalised float tensors, as
    train.py without the prefetcher); with --prefetcher, train.py's default
    GPU input path instead: timm.data.create_loader(use_prefetcher=True)
    with FastCollateMixup in the workers, uint8 batches copied on a side
    stream and normalised on the device (repeated augmentation 1 only)
  * timm.loss.BinaryCrossEntropy(target_threshold, smoothing) (or, for
    `cross_entropy`, train.py's choice: SoftTargetCrossEntropy with Mixup,
    LabelSmoothingCrossEntropy with smoothing, nn.CrossEntropyLoss else)
  * timm.optim.create_optimizer_v2(model, 'lamb' | 'lambc', lr,
    weight_decay, betas, eps, max_grad_norm, always_adapt) (timm's
    weight-decay exclusion of biases / 1-d params)
  * timm.scheduler.CosineLRScheduler(t_initial=epochs*S, warmup_t=
    warmup_epochs*S, warmup_lr_init, lr_min, t_in_epochs=(step_on ==
    epoch), cycle_limit=1), S = 1 for `step_on: epoch` and U (optimizer
    updates per epoch) for `step_on: update`; stepped as train.py steps it,
    step_update(num_updates) after every optimizer update and step(epoch + 1)
    after every epoch; cooldown_epochs extra epochs run at lr_min, as timm's
    create_scheduler_v2 adds them.
  * top-1 / top-5 with timm.utils.accuracy after every `eval.every_epochs`
    epochs and after the last one.

Gradient accumulation (global_size > micro_size) follows train.py's
--grad-accum-steps: A = global_size / micro_size consecutive micro-batches,
each mixed separately, loss / A, one optimizer update; an incomplete last
group of an epoch still makes one update (train.py's behaviour), so
U = ceil(len(loader) / A).

Repeated augmentation (R > 1): timm refuses RepeatAugSampler without
torch.distributed, so this script emulates the W = global_size / micro_size
DDP ranks the project also uses: W RepeatAugSampler(num_replicas=W, rank=r,
num_repeats=R) streams, one micro-batch from each rank per optimizer update
(gradient accumulation over the ranks == DDP's gradient average; BN
statistics per micro-batch as per GPU). U = len(rank sampler) // micro_size.

Output (DIR is created):
  * one line per epoch on stdout;
  * DIR/metrics.jsonl: {"kind":"step","epoch","step","lr","loss",
    "images_per_sec"} every `runtime.log_every_steps` optimizer updates
    (step = updates done so far, lr = the lr that update used, loss = mean
    training loss of the micro-batches since the previous step record or
    the start of the epoch, whichever is later; images_per_sec = training
    images over that same window / its wall time)
    and {"kind":"epoch","epoch","step","top1","top5","train_loss",
    "images_per_sec","elapsed_s"} per epoch (epochs are 0-based as in timm's
    logs; top1/top5 null on epochs without evaluation; images_per_sec =
    training images of the epoch / its training wall time; elapsed_s = wall
    time since the start of the first epoch, training + evaluation);
  * DIR/summary.json: final top1/top5, best top1, wall time, train images/s,
    the resolved recipe and the environment.
Accuracies are in percent.

Usage (CPU, 2 threads, 2 loader workers):
  .venv/bin/python bench/timm/reference_train.py \
      --recipe recipes/fashion_mnist_a3_strict.yaml \
      --data data/fashion-mnist --out runs/timm_a3_strict
  # quick check on a subset
  .venv/bin/python bench/timm/reference_train.py --recipe ... \
      --data /tmp/fmnist --out /tmp/timm_out --max-steps 30

The data folder given by --data replaces the recipe's data.root.
"""

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from types import SimpleNamespace

# ---------------------------------------------------------------------------
# Recipe schema (mirror of recipes/src/schema.rs: deny_unknown_fields,
# serde defaults, externally tagged enums).
# ---------------------------------------------------------------------------

REQUIRED = object()


class RecipeError(Exception):
    """A recipe that the Rust schema would reject (or that cannot be mapped)."""


def _fail(path, msg):
    raise RecipeError(f"recipe field `{path}`: {msg}")


# YAML 1.2 float syntax (serde_yaml); PyYAML (YAML 1.1) reads e.g. `1e-6` as a string.
_FLOAT_RE = re.compile(r'^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$')


def t_str(v, path):
    if not isinstance(v, str):
        _fail(path, f"expected a string, got {v!r}")
    return v


def t_bool(v, path):
    if not isinstance(v, bool):
        _fail(path, f"expected true/false, got {v!r}")
    return v


def _t_uint(bits):
    def t(v, path):
        if isinstance(v, bool) or not isinstance(v, int):
            _fail(path, f"expected a non-negative integer, got {v!r}")
        if v < 0 or v >= 2 ** bits:
            _fail(path, f"{v} is out of range for u{bits}")
        return v
    return t


t_u32 = _t_uint(32)
t_u64 = _t_uint(64)


def t_f64(v, path):
    if isinstance(v, bool):
        _fail(path, f"expected a number, got {v!r}")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and _FLOAT_RE.match(v.strip()):
        return float(v)
    _fail(path, f"expected a number, got {v!r}")


def t_array(inner, n):
    def t(v, path):
        if not isinstance(v, list) or len(v) != n:
            _fail(path, f"expected a list of {n} numbers, got {v!r}")
        return [inner(x, f"{path}[{i}]") for i, x in enumerate(v)]
    return t


def t_option(inner):
    def t(v, path):
        return None if v is None else inner(v, path)
    return t


def t_unit_enum(*names):
    def t(v, path):
        if v not in names:
            _fail(path, f"expected one of {', '.join(names)}; got {v!r}")
        return v
    return t


class Section:
    """A struct with deny_unknown_fields; fields: name -> (type, default)."""

    def __init__(self, fields):
        self.fields = fields

    def __call__(self, v, path):
        if v is None:
            v = {}
        if not isinstance(v, dict):
            _fail(path, f"expected a mapping, got {v!r}")
        for key in v:
            if key not in self.fields:
                _fail(f"{path}.{key}" if path else str(key),
                      f"unknown field (known fields: {', '.join(self.fields)})")
        out = {}
        for name, (typ, default) in self.fields.items():
            p = f"{path}.{name}" if path else name
            if name in v:
                out[name] = typ(v[name], p)
            elif default is REQUIRED:
                _fail(p, "missing (required, no default)")
            else:
                out[name] = default() if callable(default) else default
        return SimpleNamespace(**out)

    def defaults(self, path):
        return self({}, path)


class TaggedEnum:
    """Externally tagged enum: a mapping with exactly one key, the variant."""

    def __init__(self, variants):
        self.variants = variants

    def __call__(self, v, path):
        if not isinstance(v, dict) or len(v) != 1:
            _fail(path, f"expected a mapping with exactly one of {', '.join(self.variants)}; got {v!r}")
        (tag, body), = v.items()
        if tag not in self.variants:
            _fail(f"{path}.{tag}", f"unknown variant (known: {', '.join(self.variants)})")
        return tag, self.variants[tag](body, f"{path}.{tag}")


IMAGENET_DEFAULT_MEAN = [0.485, 0.456, 0.406]
IMAGENET_DEFAULT_STD = [0.229, 0.224, 0.225]
INTERP = t_unit_enum('bilinear', 'bicubic', 'random')

MODEL = Section({
    'name': (t_str, REQUIRED),
    'num_classes': (t_u32, REQUIRED),
    'drop_path_rate': (t_f64, 0.0),
    'zero_init_last': (t_bool, True),
})
DATA = Section({
    'root': (t_str, REQUIRED),
    'train_split': (t_str, 'train'),
    'val_split': (t_str, 'val'),
    'mean': (t_array(t_f64, 3), lambda: list(IMAGENET_DEFAULT_MEAN)),
    'std': (t_array(t_f64, 3), lambda: list(IMAGENET_DEFAULT_STD)),
    'loader_threads': (t_u32, 0),
    'prefetch_batches': (t_u32, 4),
    # Ours only (DCT-scaled JPEG decoding, a speed option): timm always decodes
    # at full size, so the reference accepts the field and ignores it.
    'scaled_decode': (t_bool, True),
})
AUGMENT = Section({
    'input_size': (t_u32, REQUIRED),
    'scale': (t_array(t_f64, 2), lambda: [0.08, 1.0]),
    'ratio': (t_array(t_f64, 2), lambda: [3.0 / 4.0, 4.0 / 3.0]),
    'interpolation': (INTERP, 'random'),
    'hflip': (t_f64, 0.5),
    'rand_augment': (t_option(t_str), None),
})
MIXUP = Section({
    'mixup_alpha': (t_f64, REQUIRED),
    'cutmix_alpha': (t_f64, REQUIRED),
    'prob': (t_f64, 1.0),
    'switch_prob': (t_f64, 0.5),
    'mode': (t_unit_enum('batch', 'elem'), 'batch'),
    'label_smoothing': (t_f64, 0.0),
})
LOSS = TaggedEnum({
    'bce': Section({
        'target_threshold': (t_option(t_f64), None),
        'smoothing': (t_f64, 0.0),
    }),
    'cross_entropy': Section({
        'smoothing': (t_f64, 0.0),
    }),
})
OPTIMIZER = TaggedEnum({
    'lamb': Section({
        'lr': (t_f64, REQUIRED),
        'weight_decay': (t_f64, REQUIRED),
        'betas': (t_array(t_f64, 2), lambda: [0.9, 0.999]),
        'eps': (t_f64, 1e-6),
        'max_grad_norm': (t_option(t_f64), 1.0),
        'trust_clip': (t_bool, False),
        'always_adapt': (t_bool, False),
    }),
})
SCHEDULE = TaggedEnum({
    'cosine': Section({
        'epochs': (t_u32, REQUIRED),
        'warmup_epochs': (t_f64, REQUIRED),
        'warmup_lr': (t_f64, REQUIRED),
        'min_lr': (t_f64, REQUIRED),
        'cooldown_epochs': (t_u32, 0),
        'step_on': (t_unit_enum('epoch', 'update'), REQUIRED),
    }),
})
BATCH = Section({
    'global_size': (t_u32, REQUIRED),
    'micro_size': (t_u32, REQUIRED),
    'repeated_augmentation': (t_u32, 1),
})
EVAL = Section({
    'input_size': (t_u32, REQUIRED),
    'crop_pct': (t_f64, REQUIRED),
    'interpolation': (INTERP, 'bicubic'),
    'batch_size': (t_u32, REQUIRED),
    'every_epochs': (t_u32, 1),
})
RUNTIME = Section({
    'precision': (t_unit_enum('auto', 'fp32', 'bf16', 'fp16'), 'auto'),
    'channels_last': (t_bool, True),
    'log_every_steps': (t_u32, 50),
    'keep_last_checkpoints': (t_u32, 2),
    'torch_threads': (t_u32, 0),
    # Ours only (non-finite updates skipped, K in a row stop the run): timm
    # applies every update; accepted and ignored.
    'max_nonfinite_updates': (t_u32, 3),
    # Ours only (mid-epoch checkpoints): the reference writes none; accepted and ignored.
    'checkpoint_every_updates': (t_u32, 0),
})
# Ours only (collectives between ranks): the reference is one process, so the
# section is accepted and ignored.
DISTRIBUTED = Section({
    'backend': (t_unit_enum('auto', 'ring', 'nccl'), 'auto'),
    'collective_timeout_secs': (t_u64, 600),
    'collectives_at_world_size_one': (t_bool, False),
    'overlap_backward': (t_bool, True),
    'gradient_compression': (t_unit_enum('none', 'bf16'), 'none'),
    'straggler_warn_ratio': (t_f64, 1.5),
    'fabric_probe_mib': (t_u32, 25),
    'slow_link_warn_ratio': (t_f64, 3.0),
    'expected_bus_gb_per_s': (t_option(t_f64), None),
})
RECIPE = Section({
    'name': (t_str, REQUIRED),
    'seed': (t_u64, 0),
    'model': (MODEL, REQUIRED),
    'data': (DATA, REQUIRED),
    'augment': (AUGMENT, REQUIRED),
    'mixup': (t_option(MIXUP), None),
    'loss': (LOSS, REQUIRED),
    'optimizer': (OPTIMIZER, REQUIRED),
    'schedule': (SCHEDULE, REQUIRED),
    'batch': (BATCH, REQUIRED),
    'eval': (EVAL, REQUIRED),
    'runtime': (RUNTIME, lambda: RUNTIME.defaults('runtime')),
    'distributed': (DISTRIBUTED, lambda: DISTRIBUTED.defaults('distributed')),
})


def load_recipe(path):
    import yaml
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise RecipeError(f"{path} is not valid YAML: {e}")
    r = RECIPE(raw, '')
    # Semantic checks that the Rust side also needs.
    b = r.batch
    if b.micro_size == 0 or b.global_size == 0:
        _fail('batch', 'global_size and micro_size must be > 0')
    if b.global_size % b.micro_size:
        _fail('batch.global_size', f"{b.global_size} is not a multiple of micro_size {b.micro_size}")
    if b.repeated_augmentation == 0:
        _fail('batch.repeated_augmentation', 'must be >= 1 (1 = off)')
    if r.eval.every_epochs == 0:
        _fail('eval.every_epochs', 'must be >= 1')
    if r.eval.interpolation == 'random':
        _fail('eval.interpolation', "timm's eval transform has no 'random' interpolation; use bilinear or bicubic")
    if not (0.0 < r.eval.crop_pct <= 1.0):
        _fail('eval.crop_pct', f"must be in (0, 1], got {r.eval.crop_pct}")
    if r.runtime.log_every_steps == 0:
        _fail('runtime.log_every_steps', 'must be >= 1')
    if r.mixup is not None and (r.mixup.mixup_alpha > 0 or r.mixup.cutmix_alpha > 0) and b.micro_size % 2:
        _fail('batch.micro_size', "timm's Mixup needs an even batch size")
    return r


def recipe_to_dict(ns):
    if isinstance(ns, SimpleNamespace):
        return {k: recipe_to_dict(v) for k, v in vars(ns).items()}
    if isinstance(ns, tuple):  # (variant, body) of a tagged enum
        return {ns[0]: recipe_to_dict(ns[1])}
    if isinstance(ns, list):
        return [recipe_to_dict(x) for x in ns]
    return ns


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a recipe with timm's own components (reference for the Rust trainer).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--recipe', required=True, help='recipe YAML (schema: recipes/src/schema.rs)')
    p.add_argument('--data', required=True, help='dataset root with <train_split>/<class>/* and <val_split>/<class>/* '
                   '(replaces the recipe data.root)')
    p.add_argument('--out', required=True, help='output folder (metrics.jsonl, summary.json)')
    p.add_argument('--threads', type=int, default=2, help='torch intra-op threads (replaces runtime.torch_threads)')
    p.add_argument('--workers', type=int, default=2, help='DataLoader worker processes (replaces data.loader_threads)')
    p.add_argument('--max-steps', type=int, default=None,
                   help='stop after this many optimizer updates (evaluates once at the stop); '
                        'the LR schedule keeps its full length')
    p.add_argument('--seed', type=int, default=None, help='replaces the recipe seed')
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto',
                   help='auto = cuda when available, else cpu')
    p.add_argument('--prefetcher', action='store_true',
                   help="train.py's default input path (create_loader with use_prefetcher=True, "
                        "FastCollateMixup in the workers); needs batch.repeated_augmentation 1")
    return p.parse_args(argv)


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class RankInterleavedBatchSampler:
    """W virtual DDP ranks, each a timm RepeatAugSampler; yields one micro-batch
    of rank 0, then rank 1, ..., rank W-1, then the next micro-batch of each."""

    def __init__(self, dataset, world, repeats, micro):
        from timm.data.distributed_sampler import RepeatAugSampler
        self.samplers = [RepeatAugSampler(dataset, num_replicas=world, rank=r, shuffle=True, num_repeats=repeats)
                         for r in range(world)]
        self.micro = micro
        self.per_rank = len(self.samplers[0]) // micro  # drop_last per rank

    def set_epoch(self, epoch):
        for s in self.samplers:
            s.set_epoch(epoch)

    def __iter__(self):
        streams = [list(s) for s in self.samplers]
        for b in range(self.per_rank):
            for idx in streams:
                yield idx[b * self.micro:(b + 1) * self.micro]

    def __len__(self):
        return self.per_rank * len(self.samplers)


def main(argv=None):
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
    except RecipeError as e:
        die(f"{args.recipe}: {e}")

    if args.threads < 1:
        die('--threads must be >= 1')
    if args.workers < 0:
        die('--workers must be >= 0')
    if args.max_steps is not None and args.max_steps < 1:
        die('--max-steps must be >= 1')

    data_root = args.data
    if not os.path.isdir(data_root):
        die(f"data folder not found: {data_root}")
    for split in (recipe.data.train_split, recipe.data.val_split):
        d = os.path.join(data_root, split)
        if not os.path.isdir(d):
            die(f"split folder not found: {d} (expected {data_root}/<split>/<class>/*.png)")

    import numpy as np
    import torch
    import torch.nn as nn
    import timm
    from timm.data import create_dataset, create_loader, create_transform, FastCollateMixup, Mixup
    from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy, LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import accuracy, random_seed

    torch.set_num_threads(args.threads)

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

    rt = recipe.runtime
    if rt.precision in ('bf16', 'fp16') and not on_gpu:
        die(f'runtime.precision {rt.precision} is GPU only here; this run is on the CPU')
    amp_dtype = torch.bfloat16 if (on_gpu and rt.precision in ('auto', 'bf16')) else None
    if on_gpu and rt.precision == 'fp16':
        amp_dtype = torch.float16
    # fp16: timm's NativeScaler, i.e. torch's GradScaler with its defaults.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    channels_last = on_gpu and rt.channels_last  # schema: channels-last on a GPU

    seed = recipe.seed if args.seed is None else args.seed
    random_seed(seed, 0)  # timm train.py: torch, numpy, random seeded with seed + rank

    # ---------------- data ----------------
    aug = recipe.augment
    train_tf = create_transform(
        input_size=aug.input_size,
        is_training=True,
        scale=tuple(aug.scale),
        ratio=tuple(aug.ratio),
        hflip=aug.hflip,
        vflip=0.0,
        color_jitter=None,  # RSB: no colour jitter (timm disables it anyway when auto_augment is set)
        auto_augment=aug.rand_augment,
        interpolation=aug.interpolation,
        mean=tuple(recipe.data.mean),
        std=tuple(recipe.data.std),
        re_prob=0.0,
    )
    ev = recipe.eval
    eval_tf = create_transform(
        input_size=ev.input_size,
        is_training=False,
        interpolation=ev.interpolation,
        mean=tuple(recipe.data.mean),
        std=tuple(recipe.data.std),
        crop_pct=ev.crop_pct,
    )
    ds_train = create_dataset('', root=data_root, split=recipe.data.train_split, is_training=True,
                              input_img_mode='RGB')
    ds_val = create_dataset('', root=data_root, split=recipe.data.val_split, is_training=False,
                            input_img_mode='RGB')
    ds_train.transform = train_tf
    ds_val.transform = eval_tf
    num_classes = recipe.model.num_classes
    for name, ds in (('train', ds_train), ('val', ds_val)):
        classes = ds.reader.class_to_idx
        if len(ds) == 0:
            die(f"no images found under {os.path.join(data_root, getattr(recipe.data, name + '_split'))}")
        if len(classes) != num_classes:
            die(f"{name} split has {len(classes)} class folders, recipe model.num_classes is {num_classes}")
    if ds_train.reader.class_to_idx != ds_val.reader.class_to_idx:
        die('train and val class folders differ')

    micro = recipe.batch.micro_size
    accum = recipe.batch.global_size // micro
    repeats = recipe.batch.repeated_augmentation
    pin = on_gpu
    loader_common = dict(num_workers=args.workers, pin_memory=pin, persistent_workers=args.workers > 0)
    ra_sampler = None
    if repeats > 1:
        ra_sampler = RankInterleavedBatchSampler(ds_train, accum, repeats, micro)
        if ra_sampler.per_rank == 0:
            die(f"training split too small: {len(ra_sampler.samplers[0])} samples per rank < micro_size {micro}")
        loader_train = torch.utils.data.DataLoader(ds_train, batch_sampler=ra_sampler, **loader_common)
        updates_per_epoch = ra_sampler.per_rank
        if accum < repeats:
            print(f"note: {accum} virtual rank(s) < {repeats} repeats: copies of an image share micro-batches "
                  "(as timm with that many GPUs)")
    else:
        if len(ds_train) < micro:
            die(f"training split has {len(ds_train)} images < micro_size {micro}")
        g = torch.Generator()
        g.manual_seed(seed)
        loader_train = torch.utils.data.DataLoader(
            ds_train, batch_size=micro, shuffle=True, drop_last=True, generator=g, **loader_common)
        updates_per_epoch = (len(loader_train) + accum - 1) // accum  # train.py with --grad-accum-steps
    loader_val = torch.utils.data.DataLoader(
        ds_val, batch_size=ev.batch_size, shuffle=False, drop_last=False, **loader_common)

    mixup_fn = None
    mx = recipe.mixup
    mixup_args = None
    if mx is not None and (mx.mixup_alpha > 0 or mx.cutmix_alpha > 0):
        mixup_args = dict(
            mixup_alpha=mx.mixup_alpha, cutmix_alpha=mx.cutmix_alpha, cutmix_minmax=None,
            prob=mx.prob, switch_prob=mx.switch_prob, mode=mx.mode,
            label_smoothing=mx.label_smoothing, num_classes=num_classes)
        mixup_fn = Mixup(**mixup_args)
    if args.prefetcher:
        # train.py's default: uint8 batches (mixed in the workers by
        # FastCollateMixup), copied on a side stream and normalised on the
        # device by timm's PrefetchLoader, which yields device tensors.
        if repeats > 1:
            die('--prefetcher needs batch.repeated_augmentation 1 (RepeatAugSampler needs torch.distributed)')
        if accum != 1:
            die('--prefetcher needs batch.global_size == batch.micro_size')
        if on_gpu and args.workers > 0:
            # Each worker keeps two batches in shared memory (uint8 here).
            need = args.workers * 2 * micro * 3 * aug.input_size * aug.input_size
            try:
                free = shutil.disk_usage('/dev/shm').free
            except OSError:
                free = None
            if free is not None and free < need:
                die(f'/dev/shm has {free / 2**20:.0f} MiB free; {args.workers} DataLoader workers need about '
                    f'{need / 2**20:.0f} MiB for their batches: use fewer --workers or a larger /dev/shm')
        ds_train.transform = None  # create_loader builds train.py's transform (uint8 output)
        loader_train = create_loader(
            ds_train, input_size=(3, aug.input_size, aug.input_size), batch_size=micro, is_training=True,
            use_prefetcher=True, scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip, vflip=0.0,
            color_jitter=None, auto_augment=aug.rand_augment, interpolation=aug.interpolation, re_prob=0.0,
            mean=tuple(recipe.data.mean), std=tuple(recipe.data.std), num_workers=args.workers,
            collate_fn=FastCollateMixup(**mixup_args) if mixup_args else None, pin_memory=on_gpu,
            device=device, persistent_workers=args.workers > 0)
        updates_per_epoch = len(loader_train)
        mixup_fn = None

    # ---------------- model, loss, optimizer, schedule ----------------
    model = timm.create_model(
        recipe.model.name, pretrained=False, num_classes=num_classes,
        drop_path_rate=recipe.model.drop_path_rate, zero_init_last=recipe.model.zero_init_last)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    loss_kind, loss_cfg = recipe.loss
    if loss_kind == 'bce':
        train_loss_fn = BinaryCrossEntropy(target_threshold=loss_cfg.target_threshold, smoothing=loss_cfg.smoothing)
    elif mixup_fn is not None:
        train_loss_fn = SoftTargetCrossEntropy()
    elif loss_cfg.smoothing > 0:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=loss_cfg.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    train_loss_fn = train_loss_fn.to(device)
    val_loss_fn = nn.CrossEntropyLoss().to(device)

    opt_kind, oc = recipe.optimizer
    assert opt_kind == 'lamb'
    optimizer = create_optimizer_v2(
        model, 'lambc' if oc.trust_clip else 'lamb', lr=oc.lr, weight_decay=oc.weight_decay,
        betas=tuple(oc.betas), eps=oc.eps, max_grad_norm=oc.max_grad_norm, always_adapt=oc.always_adapt)

    sched_kind, sc = recipe.schedule
    assert sched_kind == 'cosine'
    if sc.epochs == 0:
        die('recipe field `schedule.cosine.epochs`: must be >= 1')
    # step_on: epoch -> lengths in epochs, t_in_epochs=True (timm v0.5.x);
    # update -> lengths in updates, t_in_epochs=False (--sched-on-updates).
    steps_per_epoch = 1 if sc.step_on == 'epoch' else updates_per_epoch
    lr_scheduler = CosineLRScheduler(
        optimizer,
        t_initial=sc.epochs * steps_per_epoch,
        lr_min=sc.min_lr,
        cycle_mul=1.0,
        cycle_decay=1.0,
        cycle_limit=1,
        warmup_t=sc.warmup_epochs * steps_per_epoch,
        warmup_lr_init=sc.warmup_lr,
        warmup_prefix=False,
        t_in_epochs=sc.step_on == 'epoch',
        k_decay=1.0,
    )
    num_epochs = sc.epochs + sc.cooldown_epochs

    def amp_ctx():
        if amp_dtype is None:
            return torch.autocast(device_type=device.type, enabled=False)
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    # ---------------- output ----------------
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, 'metrics.jsonl')
    if os.path.exists(metrics_path):
        print(f"note: overwriting {metrics_path}")
    metrics_f = open(metrics_path, 'w')

    def emit(rec):
        metrics_f.write(json.dumps(rec) + '\n')
        metrics_f.flush()

    n_params = sum(p.numel() for p in model.parameters())
    print(f"timm {timm.__version__} torch {torch.__version__} device {device} threads {args.threads} "
          f"workers {args.workers} amp {amp_dtype} channels_last {channels_last}")
    print(f"recipe {recipe.name}: model {recipe.model.name} ({n_params / 1e6:.2f}M params), "
          f"train {len(ds_train)} images, val {len(ds_val)} images, {num_classes} classes")
    print(f"batch global {recipe.batch.global_size} = {accum} x micro {micro}, repeats {repeats}, "
          f"{updates_per_epoch} updates/epoch, {num_epochs} epochs ({sc.epochs} cosine + {sc.cooldown_epochs} "
          f"cooldown), seed {seed}, max_steps {args.max_steps}")
    print(f"train transform: {ds_train.transform if args.prefetcher else train_tf}")
    print(f"eval transform: {eval_tf}")
    where = " (FastCollateMixup in the workers, the prefetcher's input path)" if args.prefetcher else ""
    print(f"mixup: {vars(mx) if mixup_args else None}{where}; loss: {train_loss_fn.__class__.__name__} "
          f"{vars(loss_cfg)}")

    # ---------------- evaluation ----------------
    def evaluate():
        model.eval()
        n = 0
        top1_sum = top5_sum = loss_sum = 0.0
        k5 = min(5, num_classes)
        with torch.inference_mode():
            for x, y in loader_val:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with amp_ctx():
                    out = model(x)
                loss = val_loss_fn(out.float(), y)
                a1, a5 = accuracy(out, y, topk=(1, k5))  # percent of this batch
                b = x.size(0)
                n += b
                top1_sum += round(a1.item() * b / 100.0)  # back to exact counts
                top5_sum += round(a5.item() * b / 100.0)
                loss_sum += loss.item() * b
        return 100.0 * top1_sum / n, 100.0 * top5_sum / n, loss_sum / n

    # ---------------- training loop (train.py train_one_epoch) ----------------
    num_updates = 0
    total_train_images = 0
    total_train_time = 0.0
    last = None
    best_top1 = None
    stop = False
    t_start = time.perf_counter()
    log_every = rt.log_every_steps
    for epoch in range(num_epochs):
        if ra_sampler is not None:
            ra_sampler.set_epoch(epoch)
        model.train()
        sync()
        t_epoch = time.perf_counter()
        t_log = t_epoch
        log_images = 0
        log_loss_sum = 0.0
        log_loss_n = 0
        ep_images = 0
        ep_loss_sum = 0.0
        n_batches = len(loader_train)
        last_accum = n_batches % accum
        last_batch_idx_to_accum = n_batches - last_accum
        accum_steps = accum
        optimizer.zero_grad()
        for batch_idx, (x, y) in enumerate(loader_train):
            need_update = batch_idx == n_batches - 1 or (batch_idx + 1) % accum == 0
            if batch_idx >= last_batch_idx_to_accum:
                accum_steps = last_accum
            if not args.prefetcher:  # the prefetcher's batches are on the device already
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp_ctx():
                out = model(x)
                loss = train_loss_fn(out, y)
            if accum_steps > 1:
                loss = loss / accum_steps
            scaler.scale(loss).backward()
            loss_val = loss.item() * accum_steps
            b = x.size(0)
            ep_images += b
            ep_loss_sum += loss_val * b
            log_images += b
            log_loss_sum += loss_val
            log_loss_n += 1
            if not need_update:
                continue
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            num_updates += 1
            lr_used = optimizer.param_groups[0]['lr']
            lr_scheduler.step_update(num_updates=num_updates)
            if num_updates % log_every == 0:
                sync()
                now = time.perf_counter()
                emit({'kind': 'step', 'epoch': epoch, 'step': num_updates, 'lr': lr_used,
                      'loss': log_loss_sum / log_loss_n, 'images_per_sec': log_images / (now - t_log)})
                t_log = now
                log_images = 0
                log_loss_sum = 0.0
                log_loss_n = 0
            if args.max_steps is not None and num_updates >= args.max_steps:
                stop = True
                break
        sync()
        ep_train_time = time.perf_counter() - t_epoch
        total_train_time += ep_train_time
        total_train_images += ep_images
        train_loss = ep_loss_sum / max(ep_images, 1)
        ep_ips = ep_images / ep_train_time

        do_eval = stop or (epoch + 1) % ev.every_epochs == 0 or epoch + 1 == num_epochs
        top1 = top5 = val_loss = None
        if do_eval:
            top1, top5, val_loss = evaluate()
            last = (top1, top5)
            best_top1 = top1 if best_top1 is None else max(best_top1, top1)
        elapsed = time.perf_counter() - t_start
        emit({'kind': 'epoch', 'epoch': epoch, 'step': num_updates, 'top1': top1, 'top5': top5,
              'train_loss': train_loss, 'images_per_sec': ep_ips, 'elapsed_s': elapsed})
        acc = f"top1 {top1:.2f} top5 {top5:.2f} val_loss {val_loss:.4f}" if do_eval else "no eval"
        print(f"epoch {epoch} step {num_updates} lr {optimizer.param_groups[0]['lr']:.3e} "
              f"train_loss {train_loss:.4f} {acc} train {ep_ips:.1f} img/s elapsed {elapsed:.1f}s", flush=True)
        if stop:
            print(f"stopped after --max-steps {args.max_steps} updates")
            break
        lr_scheduler.step(epoch + 1)  # train.py; a no-op when stepping per update

    wall = time.perf_counter() - t_start
    metrics_f.close()
    summary = {
        'impl': 'timm',
        'recipe': recipe.name,
        'top1': last[0] if last else None,
        'top5': last[1] if last else None,
        'best_top1': best_top1,
        'epochs_run': epoch + 1,
        'steps': num_updates,
        'updates_per_epoch': updates_per_epoch,
        'wall_time_s': wall,
        'train_time_s': total_train_time,
        'train_images': total_train_images,
        'train_images_per_sec': total_train_images / total_train_time if total_train_time > 0 else None,
        'max_steps': args.max_steps,
        'seed': seed,
        'device': str(device),
        'threads': args.threads,
        'workers': args.workers,
        'amp_dtype': str(amp_dtype) if amp_dtype is not None else None,
        'channels_last': channels_last,
        'data': os.path.abspath(data_root),
        'train_size': len(ds_train),
        'val_size': len(ds_val),
        'versions': {'timm': timm.__version__, 'torch': torch.__version__, 'numpy': np.__version__,
                     'python': platform.python_version()},
        'recipe_resolved': recipe_to_dict(recipe),
    }
    with open(os.path.join(args.out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    print(f"done: top1 {summary['top1']} top5 {summary['top5']} wall {wall:.1f}s "
          f"train {summary['train_images_per_sec']:.1f} img/s -> {args.out}")


if __name__ == '__main__':
    main()
