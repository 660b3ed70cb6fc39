"""Train-mode fixtures from timm 1.0.31: whole updates (train-mode forward with
BN batch statistics, timm's `BinaryCrossEntropy`, backward, timm's `Lamb`) and
a drop-path forward from a replayed libtorch seed.

Whole updates (`generate_updates`): for each model of `UPDATE_MODELS`, timm
builds the model with a 10-class head and drop-path off, then every entry of
its state dict (except `num_batches_tracked`) is re-initialised from
libtorch's generator: after `torch.manual_seed(INIT_SEED)`, in the order of
`meta.json`'s `init` list, `entry = offset + scale * torch.randn(shape)`.
The Rust test replays the same draws with `tch::manual_seed` (same libtorch,
same generator), so the multi-hundred-megabyte initial state dicts are not
stored; `meta.json` records the squared norm of every initial entry so that a
different replay is reported as such. Then three updates, each on its own
batch of `BATCH` random images and Mixup-style soft targets (timm's
`mixup_target` with smoothing 0.1 and a per-batch lambda, so the 0.2 target
threshold of the RSB BCE turns some mixed classes on and some off), with
`Lamb(param_groups_weight_decay(model, WEIGHT_DECAY, model.no_weight_decay()),
lr=LR, betas, eps, max_grad_norm=1.0)` as `create_optimizer_v2` builds it.

After every update the fixture holds the loss, the logits of the forward, the
global gradient norm before clipping (what Lamb clips by), every BN running
statistic in full, every parameter of at most `FULL_NUMEL` elements in full,
and for the larger ones `SAMPLES` elements at the evenly spaced flat indices
`i * (numel - 1) // (SAMPLES - 1)` plus the float64 norm of the parameter and
of its change since the initial state (which covers every element). That keeps
a model's fixture around one megabyte.

Every update also records timm's own `envelope`: how far timm moves (in the
measures the Rust test uses, the change norms apart) when its parameters
are perturbed by about one float32 rounding (a relative 1e-7 Gaussian) after
the first update, the largest over `PERTURB_DRAWS` draws. Deep BN
networks at batch 4 amplify such a difference by orders of magnitude within
two updates (LAMB's no-decay group steps by about lr * sign(grad), so a tiny
gradient that changes sign moves a BN parameter by 2 lr), so after the first
update agreement with timm can only be asked up to a multiple of this.

Drop path (`generate_drop_path`): resnet50 with `drop_path_rate=0.1`, the same
re-initialisation, one train-mode forward after `torch.manual_seed(DROP_SEED)`;
also the logits of the same forward with drop path off (so that the test can
check the masks changed something).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy
from timm.optim import Lamb, param_groups_weight_decay

INIT_SEED = 1234
DATA_SEED = 99
NUM_CLASSES = 10
BATCH = 4
UPDATES = 3
LR = 5e-3
WEIGHT_DECAY = 0.02
BETAS = (0.9, 0.999)
EPS = 1e-6
MAX_GRAD_NORM = 1.0
TARGET_THRESHOLD = 0.2
SMOOTHING = 0.1
# Mixup lambda of each batch: 0.7 keeps both classes above the 0.2 threshold,
# 0.85 drops the second one (0.15 + 0.01 < 0.2), 1.0 is plain smoothing.
LAMBDAS = [0.7, 0.85, 1.0]
FULL_NUMEL = 4096
SAMPLES = 256
# The relative-error floors of the envelope, as in the Rust test.
PARAMETER_FLOOR = 1e-2
BUFFER_FLOOR = 1e-2
PERTURB_SEED = 7
# Perturbations drawn (seeds PERTURB_SEED, PERTURB_SEED + 1, ...): the
# envelope is the largest move of timm over them, as one draw's move varies
# by an order of magnitude from draw to draw (and from one CPU's kernels to
# another's).
PERTURB_DRAWS = 3

# (name, input side, extra create_model kwargs). The ViT keeps timm's 224 px
# position embeddings and resamples them for 64 px inputs (4x4 patches), as
# the Rust model does (see models.py).
UPDATE_MODELS = [
    ("resnet50", 64, {}),
    ("seresnet50", 64, {}),
    ("efficientnet_b0", 64, {}),
    ("regnety_040", 64, {}),
    ("vit_small_patch16_224", 64, dict(dynamic_img_size=True)),
]

DROP_MODEL = "resnet50"
DROP_SIZE = 64
DROP_BATCH = 8
DROP_RATE = 0.1
DROP_SEED = 4321


def init_rule(name: str, tensor: torch.Tensor) -> tuple[float, float]:
    """(offset, scale) of the seeded re-initialisation of one state-dict entry:
    statistics near (0, 1), norm gains near 1, small biases and ViT tokens,
    weights with variance 1 / fan-in."""
    if name.endswith("running_var"):
        return 1.0, 0.1
    if name.endswith("running_mean"):
        return 0.0, 0.1
    if name.endswith(".bias"):
        return 0.0, 0.05
    if name in ("cls_token", "pos_embed"):
        return 0.0, 0.02
    if tensor.dim() <= 1:
        return 1.0, 0.1
    fan_in = tensor.numel() // tensor.shape[0]
    return 0.0, 1.0 / math.sqrt(fan_in)


def reinitialise(model: torch.nn.Module) -> list[dict]:
    """Redraws every state-dict entry but the BN counters; returns the replay list."""
    torch.manual_seed(INIT_SEED)
    state = model.state_dict()
    entries = []
    with torch.no_grad():
        for name in sorted(state):
            if name.endswith("num_batches_tracked"):
                continue
            tensor = state[name]
            offset, scale = init_rule(name, tensor)
            tensor.copy_(offset + scale * torch.randn(tensor.shape))
            entries.append({"name": name, "offset": offset, "scale": scale,
                            "sum_sq": float(tensor.double().square().sum())})
    return entries


def sample_indices(numel: int) -> torch.Tensor:
    return torch.tensor([i * (numel - 1) // (SAMPLES - 1) for i in range(SAMPLES)], dtype=torch.long)


def snapshot(model: torch.nn.Module, initial: dict, prefix: str, tensors: dict, norms: dict) -> None:
    for name, p in model.named_parameters():
        p = p.detach()
        if p.numel() <= FULL_NUMEL:
            tensors[f"{prefix}.param.{name}"] = p.clone()
        else:
            tensors[f"{prefix}.sample.{name}"] = p.flatten()[sample_indices(p.numel())].clone()
            norms[name] = {"norm": float(p.double().norm()),
                           "delta_norm": float((p.double() - initial[name].double()).norm())}
    for name, b in model.named_buffers():
        if not name.endswith("num_batches_tracked"):
            tensors[f"{prefix}.buffer.{name}"] = b.detach().clone()


def train(name: str, size: int, kwargs: dict, perturb: int | None = None):
    """Builds, re-initialises and trains `name` for `UPDATES` updates; yields
    (model, step, inputs, targets, logits, loss, grad_norm) after each. With
    `perturb` (a seed), every parameter is multiplied by (1 + 1e-7 * N(0, 1))
    after the first update: about one float32 rounding, to measure how far
    timm itself moves from such a difference in the later updates."""
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES,
                              drop_path_rate=0.0, **kwargs)
    reinitialise(model)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, weight_decay=WEIGHT_DECAY, no_weight_decay_list=skip)
    optimizer = Lamb(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                     max_grad_norm=MAX_GRAD_NORM)
    loss_fn = BinaryCrossEntropy(smoothing=0.0, target_threshold=TARGET_THRESHOLD)
    model.train()
    generator = torch.Generator().manual_seed(DATA_SEED)
    noise = torch.Generator().manual_seed(perturb if perturb is not None else PERTURB_SEED)
    for step, lam in enumerate(LAMBDAS[:UPDATES]):
        x = torch.randn(BATCH, 3, size, size, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
        targets = mixup_target(labels, NUM_CLASSES, lam=lam, smoothing=SMOOTHING)
        optimizer.zero_grad()
        logits = model(x)
        loss = loss_fn(logits, targets)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        optimizer.step()
        if perturb is not None and step == 0:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.0 + 1e-7 * torch.randn(p.shape, generator=noise))
        yield model, optimizer, step, x, targets, logits.detach().clone(), loss.item(), grad_norm.item()


def relative(ours: float, reference: float) -> float:
    """As the Rust test's `relative`: |ours - reference| / max(|reference|, 1e-12)."""
    return abs(ours - reference) / max(abs(reference), 1e-12)


def norm(t: torch.Tensor) -> float:
    """The float64 norm of `t`."""
    return float(t.double().norm())


def relative_max(a: torch.Tensor, b: torch.Tensor, floor: float) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs().clamp_min(floor)).max())


def generate_updates(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for name, size, kwargs in UPDATE_MODELS:
        start = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        updates = []
        reference = []
        init = group_names = initial = None
        for model, optimizer, step, x, targets, logits, loss, grad_norm in train(name, size, kwargs):
            if step == 0:
                probe = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
                init = reinitialise(probe)
                initial = {n: p.detach().clone() for n, p in probe.named_parameters()}
                by_id = {id(p): n for n, p in model.named_parameters()}
                group_names = [[by_id[id(p)] for p in g["params"]] for g in optimizer.param_groups]
            tensors[f"step{step}.input"] = x
            tensors[f"step{step}.targets"] = targets
            tensors[f"step{step}.logits"] = logits
            norms: dict = {}
            snapshot(model, initial, f"step{step}", tensors, norms)
            updates.append({"loss": loss, "grad_norm": grad_norm, "norms": norms})
            reference.append((logits, loss, grad_norm,
                              {n: p.detach().clone() for n, p in model.named_parameters()},
                              {n: b.detach().clone() for n, b in model.named_buffers()
                               if not n.endswith("num_batches_tracked")}))
        for draw in range(PERTURB_DRAWS):
            for model, _, step, _, _, logits, loss, grad_norm in train(
                name, size, kwargs, perturb=PERTURB_SEED + draw
            ):
                ref_logits, ref_loss, ref_grad, ref_params, ref_buffers = reference[step]
                params = {n: p.detach() for n, p in model.named_parameters()}
                sampled = [n for n in ref_params if ref_params[n].numel() > FULL_NUMEL]
                buffers = dict(model.named_buffers())
                moved = {
                    "loss": relative(loss, ref_loss),
                    "grad_norm": relative(grad_norm, ref_grad),
                    "logits": float((logits - ref_logits).abs().max() / ref_logits.abs().max()),
                    "parameters": max(relative_max(params[n], ref_params[n], PARAMETER_FLOOR)
                                      for n in ref_params),
                    # Over the parameters whose norms the test compares
                    # (those it does not compare in full).
                    "norms": max(
                        (relative(norm(params[n]), norm(ref_params[n])) for n in sampled),
                        default=0.0,
                    ),
                    # The norm of each one's change since the initial state:
                    # ill-conditioned where a parameter barely moved, so its
                    # own envelope.
                    "change_norms": max(
                        (relative(norm(params[n] - initial[n]), norm(ref_params[n] - initial[n]))
                         for n in sampled),
                        default=0.0,
                    ),
                    "running_stats": max((relative_max(buffers[n], ref_buffers[n], BUFFER_FLOOR)
                                          for n in ref_buffers), default=0.0),
                }
                envelope = updates[step].setdefault("envelope", {})
                for key, value in moved.items():
                    envelope[key] = max(envelope.get(key, 0.0), value)
        folder = out / name
        folder.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "updates.safetensors"))
        meta = {"name": name, "size": size, "batch": BATCH, "num_classes": NUM_CLASSES,
                "create_kwargs": kwargs, "init_seed": INIT_SEED, "init": init,
                "lr": LR, "weight_decay": WEIGHT_DECAY, "betas": list(BETAS), "eps": EPS,
                "max_grad_norm": MAX_GRAD_NORM, "target_threshold": TARGET_THRESHOLD,
                "full_numel": FULL_NUMEL, "samples": SAMPLES, "groups": group_names,
                "updates": updates}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        index.append(name)
        print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
    (out / "index.json").write_text(json.dumps(index))


def generate_drop_path(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    logits = {}
    init = None
    for rate in (DROP_RATE, 0.0):
        model = timm.create_model(DROP_MODEL, pretrained=False, num_classes=NUM_CLASSES,
                                  drop_path_rate=rate)
        init = reinitialise(model)
        model.train()
        x = torch.randn(DROP_BATCH, 3, DROP_SIZE, DROP_SIZE,
                        generator=torch.Generator().manual_seed(DATA_SEED))
        torch.manual_seed(DROP_SEED)
        with torch.no_grad():
            logits[rate] = model(x)
    save_file({"input": x, "logits": logits[DROP_RATE], "logits_without_drop_path": logits[0.0]},
              str(out / "drop_path.safetensors"))
    meta = {"name": DROP_MODEL, "num_classes": NUM_CLASSES, "drop_path_rate": DROP_RATE,
            "seed": DROP_SEED, "init_seed": INIT_SEED, "init": init}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def generate(out: Path) -> None:
    generate_updates(out / "updates")
    generate_drop_path(out / "drop_path")


if __name__ == "__main__":
    import sys

    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("target/fixtures/train_step"))
