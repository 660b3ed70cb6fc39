"""Fixtures for the numerical ingredients, produced by timm 1.0.31 itself.

Each `generate_*` writes one folder under the fixture root; the Rust parity
tests in `tests/tests/parity_*.rs` read them back and compare:

* `lamb/`      timm `Lamb` steps on named parameters (two weight-decay groups,
               gradient clipping active on some steps and not on others);
* `mixup/`     timm `FastCollateMixup` outputs (images, targets) with the random
               decisions timm drew, so that our code can replay them;
* `bce/`       timm `BinaryCrossEntropy` losses and input gradients;
* `schedule/`  timm `CosineLRScheduler` learning rates per update, stepped per
               epoch (`t_in_epochs=True`) and per update (`t_in_epochs=False`);
* `sampler/`   timm `RepeatAugSampler` and torch `DistributedSampler` index lists.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1))


# ---------------------------------------------------------------- LAMB
def generate_lamb(out: Path) -> None:
    from timm.optim import create_optimizer_v2

    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for case, (weight_decay, max_grad_norm) in enumerate([(0.02, 1.0), (0.0, 1.0), (0.05, None)]):
        torch.manual_seed(100 + case)
        model = torch.nn.Sequential()
        model.add_module("conv", torch.nn.Conv2d(3, 4, 3, bias=True))
        model.add_module("bn", torch.nn.BatchNorm2d(4))
        model.add_module("fc", torch.nn.Linear(8, 5))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.5)
            model.bn.bias.zero_()  # a zero-norm parameter: trust ratio falls back to 1
        kwargs = {} if max_grad_norm == 1.0 else {"max_grad_norm": max_grad_norm}
        opt = create_optimizer_v2(model, "lamb", lr=5e-3, weight_decay=weight_decay, **kwargs)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
        lrs = [5e-3, 4e-3, 3e-3, 2e-3, 1e-3, 5e-4]
        tensors = {f"init.{n}": p.detach().clone() for n, p in model.named_parameters()}
        for step, lr in enumerate(lrs):
            for g in opt.param_groups:
                g["lr"] = lr
            # Alternate large (clipped) and small (unclipped) gradients.
            scale = 3.0 if step % 2 == 0 else 0.01
            for n, p in model.named_parameters():
                p.grad = torch.randn_like(p) * scale
                tensors[f"grad{step}.{n}"] = p.grad.detach().clone()
            opt.step()
            for n, p in model.named_parameters():
                tensors[f"param{step}.{n}"] = p.detach().clone()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"case{case}.safetensors"))
        cases.append({
            "file": f"case{case}.safetensors",
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
            "betas": [0.9, 0.999],
            "eps": 1e-6,
            "lrs": lrs,
            "groups": groups,
            "names": [n for n, _ in model.named_parameters()],
        })
    _write_json(out / "cases.json", cases)


# ---------------------------------------------------------------- Mixup / CutMix / BCE
class _Recorder:
    """Wraps numpy's global random functions to record what timm draws."""

    def __init__(self):
        self.calls = []
        self._orig = {}

    def __enter__(self):
        for name in ("rand", "beta", "randint"):
            orig = getattr(np.random, name)
            self._orig[name] = orig

            def wrapper(*args, _orig=orig, _name=name, **kwargs):
                value = _orig(*args, **kwargs)
                self.calls.append((_name, np.array(value).tolist()))
                return value

            setattr(np.random, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(np.random, name, orig)


def _batch_decision(calls, mixup_alpha, cutmix_alpha):
    """Rebuilds the per-batch decision of `_params_per_batch` + `rand_bbox`."""
    betas = [v for n, v in calls if n == "beta"]
    ints = [v for n, v in calls if n == "randint"]
    if not betas:
        return {"lam": 1.0, "center": None}
    lam = betas[0]
    use_cutmix = len(ints) == 2
    return {"lam": lam, "center": [ints[0], ints[1]] if use_cutmix else None}


def _elem_decisions(calls, batch, mixup_alpha, cutmix_alpha, prob):
    rands = [np.array(v) for n, v in calls if n == "rand"]
    betas = [np.array(v) for n, v in calls if n == "beta"]
    ints = [v for n, v in calls if n == "randint"]
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = rands[0] < 0.5
        lam_mix = np.where(use_cutmix, betas[0], betas[1])
        mix = rands[1] < prob
    elif cutmix_alpha > 0:
        use_cutmix = np.ones(batch, dtype=bool)
        lam_mix, mix = betas[0], rands[0] < prob
    else:
        use_cutmix = np.zeros(batch, dtype=bool)
        lam_mix, mix = betas[0], rands[0] < prob
    lam = np.where(mix, lam_mix.astype(np.float32), np.float32(1.0))
    out, k = [], 0
    for i in range(batch):
        if lam[i] != 1.0 and use_cutmix[i]:
            out.append({"lam": float(lam[i]), "center": [ints[k], ints[k + 1]]})
            k += 2
        else:
            out.append({"lam": float(lam[i]), "center": None})
    return out


def generate_mixup(out: Path) -> None:
    from timm.data import FastCollateMixup
    from timm.loss import BinaryCrossEntropy

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cases = []
    settings = [
        # (mode, mixup_alpha, cutmix_alpha, prob, smoothing, seed)
        ("batch", 0.2, 0.0, 1.0, 0.1, 1),
        ("batch", 0.0, 1.0, 1.0, 0.1, 2),
        ("batch", 0.1, 1.0, 1.0, 0.0, 3),
        ("batch", 0.1, 1.0, 1.0, 0.0, 4),
        ("batch", 0.1, 1.0, 1.0, 0.0, 5),
        ("batch", 0.1, 1.0, 0.5, 0.0, 6),
        ("elem", 0.2, 1.0, 1.0, 0.1, 7),
    ]
    for idx, (mode, ma, ca, prob, smoothing, seed) in enumerate(settings):
        batch, h, w, classes = 6, 12, 10, 7
        images = rng.integers(0, 256, size=(batch, 3, h, w), dtype=np.uint8)
        labels = rng.integers(0, classes, size=(batch,))
        mixer = FastCollateMixup(mixup_alpha=ma, cutmix_alpha=ca, prob=prob, switch_prob=0.5,
                                 mode=mode, label_smoothing=smoothing, num_classes=classes)
        np.random.seed(seed)
        with _Recorder() as rec:
            mixed, targets = mixer([(images[i], int(labels[i])) for i in range(batch)])
        if mode == "batch":
            decisions = _batch_decision(rec.calls, ma, ca)
        else:
            decisions = _elem_decisions(rec.calls, batch, ma, ca, prob)
        np.save(out / f"case{idx}_images.npy", images)
        np.save(out / f"case{idx}_mixed.npy", mixed.numpy())
        np.save(out / f"case{idx}_targets.npy", targets.numpy().astype(np.float32))
        cases.append({
            "prefix": f"case{idx}", "mode": mode, "mixup_alpha": ma, "cutmix_alpha": ca,
            "prob": prob, "smoothing": smoothing, "labels": labels.tolist(), "num_classes": classes,
            "decisions": decisions,
        })
    _write_json(out / "cases.json", cases)

    # BCE on mixed targets, with and without a threshold, and on sparse labels.
    bce_dir = out.parent / "bce"
    bce_dir.mkdir(parents=True, exist_ok=True)
    bce_cases = []
    torch.manual_seed(0)
    for idx, (threshold, smoothing) in enumerate([(0.2, 0.0), (None, 0.0), (0.2, 0.1)]):
        logits = (torch.randn(8, 11) * 3).requires_grad_(True)
        soft = torch.rand(8, 11)
        soft = soft / soft.sum(1, keepdim=True) * 1.3
        loss = BinaryCrossEntropy(smoothing=smoothing, target_threshold=threshold)(logits, soft)
        loss.backward()
        np.save(bce_dir / f"case{idx}_logits.npy", logits.detach().numpy())
        np.save(bce_dir / f"case{idx}_targets.npy", soft.numpy())
        np.save(bce_dir / f"case{idx}_grad.npy", logits.grad.numpy())
        bce_cases.append({"prefix": f"case{idx}", "target_threshold": threshold, "loss": loss.item()})
    _write_json(bce_dir / "cases.json", bce_cases)


# ---------------------------------------------------------------- schedule
def generate_schedule(out: Path) -> None:
    """timm's cosine schedule built as train.py builds it (`create_scheduler_v2`)
    and driven as train.py drives it, in both of its modes:

    * `step_on: epoch` (`step_on_epochs=True`, `t_in_epochs=True`, timm v0.5.x):
      lengths in epochs; `step(epoch + 1)` at each epoch's end, so epoch e runs
      at lr(e) (epoch 0 at the value set by the constructor);
    * `step_on: update` (`--sched-on-updates`, `t_in_epochs=False`): lengths
      times the updates per epoch; `step_update(num_updates)` after each update.

    train.py calls both methods in both modes (the other one is a no-op), and
    so does this driver. The LR of every optimizer update is read from the
    optimizer's param group, over `num_epochs` as `create_scheduler_v2`
    returns it (the cosine plus the cooldown).
    """
    from timm.scheduler import create_scheduler_v2

    out.mkdir(parents=True, exist_ok=True)
    cases = []
    # epochs, warmup_epochs, warmup_lr, min_lr, cooldown_epochs, lr, updates per epoch
    configs = [
        (8, 1, 1e-4, 1e-6, 0, 8e-3, 468),     # the Fashion-MNIST default: whole warmup epoch
        (100, 5, 1e-4, 1e-6, 0, 8e-3, 625),   # an A3-like run, shortened updates per epoch
        (6, 1.5, 1e-5, 0.0, 2, 5e-3, 37),     # fractional warmup, cooldown, min_lr 0
        (10, 0, 1e-4, 1e-5, 3, 2e-3, 11),     # no warmup, cooldown, min_lr > 0
        (4, 0.5, 0.0, 1e-6, 1, 1e-2, 13),     # warmup shorter than an epoch from warmup_lr 0
        (7, 2.25, 3e-4, 2e-4, 0, 6e-4, 5),    # min_lr close to the peak, warmup_lr above min_lr
    ]
    for step_on in ("epoch", "update"):
        for epochs, warmup_epochs, warmup_lr, min_lr, cooldown, lr, upe in configs:
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
            sched, num_epochs = create_scheduler_v2(
                opt, sched="cosine", num_epochs=epochs, warmup_epochs=warmup_epochs,
                warmup_lr=warmup_lr, min_lr=min_lr, cooldown_epochs=cooldown, cycle_limit=1,
                step_on_epochs=step_on == "epoch", updates_per_epoch=upe)
            assert sched.t_in_epochs == (step_on == "epoch")
            lrs = []
            num_updates = 0
            for epoch in range(num_epochs):
                for _ in range(upe):
                    lrs.append(opt.param_groups[0]["lr"])
                    num_updates += 1
                    sched.step_update(num_updates=num_updates)
                sched.step(epoch + 1)
            cases.append({"step_on": step_on, "epochs": epochs, "warmup_epochs": warmup_epochs,
                          "warmup_lr": warmup_lr, "min_lr": min_lr, "cooldown_epochs": cooldown,
                          "lr": lr, "updates_per_epoch": upe, "lrs": lrs})
    _write_json(out / "cases.json", cases)


# ---------------------------------------------------------------- samplers
class _Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def generate_sampler(out: Path) -> None:
    from timm.data.distributed_sampler import RepeatAugSampler
    from torch.utils.data.distributed import DistributedSampler

    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for n, world, repeats in [(1000, 4, 3), (5000, 8, 3), (777, 3, 2), (100, 4, 3), (60000, 4, 3)]:
        for rank in range(world):
            s = RepeatAugSampler(_Sized(n), num_replicas=world, rank=rank, num_repeats=repeats)
            for epoch in (0, 3):
                s.set_epoch(epoch)
                cases.append({"kind": "repeat_aug", "n": n, "world": world, "rank": rank,
                              "repeats": repeats, "epoch": epoch, "seed": 0, "indices": list(s)})
    for n, world, seed in [(1000, 4, 0), (10, 3, 7), (60000, 1, 0)]:
        for rank in range(world):
            s = DistributedSampler(_Sized(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
            for epoch in (0, 5):
                s.set_epoch(epoch)
                cases.append({"kind": "distributed", "n": n, "world": world, "rank": rank,
                              "repeats": 1, "epoch": epoch, "seed": seed, "indices": list(s)})
    _write_json(out / "cases.json", cases)
