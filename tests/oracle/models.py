"""Model fixtures from timm 1.0.31: weights saved from timm's own `state_dict()`
as safetensors, an input batch and timm's eval-mode logits, for every model of
the registry (the RSB Table 3 zoo). Norm parameters and statistics, biases and
the ViT class token are randomised so that no branch hides behind timm's
zero-initialised last BN, zero biases or near-zero class token.

The models are built with `drop_path_rate=0.1` (inactive in eval mode) so that
meta.json records timm's per-block stochastic-depth rates (`drop_path_rates`,
one per residual block, 0 where timm builds no DropPath).

Weights are saved as float16, which halves the fixtures' largest part (3.7 GB
in float32): every floating-point parameter and buffer is first rounded to a
float16 value, so the float32 model timm computes its logits with holds exactly
the values the file holds, and parity is as exact as before. Loading them tests
the loader's float16 path as timm's half-precision checkpoints use it.

Weights and logits use a 10-class head and a small input (the 1000-class
parameter count is recorded in meta.json as `parameter_count_1000`), so that
generation and the parity test stay fast. ViTs are built with
`dynamic_img_size=True`: their position embeddings keep timm's 224 px shape
and are resampled for the smaller inputs, as the Rust model does.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from timm.layers import DropPath
from timm.optim import param_groups_weight_decay

# (name, num_classes, input side, extra create_model kwargs): small inputs keep CI
# fast; 72 px gives odd feature maps (9, 5, 3) for the ceil-mode average-pool
# shortcuts and strided convolutions.
VIT = dict(dynamic_img_size=True)
MODELS = [
    ("resnet18", 10, 64, {}),
    ("resnet34", 10, 64, {}),
    ("resnet50", 1000, 96, {}),
    ("resnet101", 10, 64, {}),
    ("resnet152", 10, 64, {}),
    ("resnet50d", 10, 72, {}),
    ("seresnet50", 10, 64, {}),
    ("senet154", 10, 72, {}),
    ("resnext50_32x4d", 10, 64, {}),
    ("ecaresnet50t", 10, 72, {}),
    ("ecaresnet269d", 10, 72, {}),
    ("regnety_040", 10, 72, {}),
    ("regnety_080", 10, 64, {}),
    ("regnety_160", 10, 64, {}),
    ("regnety_320", 10, 64, {}),
    ("efficientnet_b0", 10, 72, {}),
    ("efficientnet_b1", 10, 64, {}),
    ("efficientnet_b2", 10, 64, {}),
    ("efficientnet_b3", 10, 64, {}),
    ("efficientnet_b4", 10, 64, {}),
    ("efficientnetv2_rw_s", 10, 72, {}),
    ("efficientnetv2_rw_m", 10, 64, {}),
    ("vit_tiny_patch16_224", 10, 224, VIT),
    ("vit_small_patch16_224", 10, 48, VIT),
    ("vit_base_patch16_224", 10, 32, VIT),
]


def randomise(model: torch.nn.Module) -> None:
    """Moves every parameter that starts at a constant (norm affine, biases,
    BN statistics, class token) away from it."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(17)
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Linear)):
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.05)
        for name, p in model.named_parameters():
            if name in ("cls_token",):
                p.normal_(0.0, 0.5)


DROP_PATH_RATE = 0.1


def drop_path_rates(model: torch.nn.Module) -> list[float]:
    """The stochastic-depth rate of every residual block, in block order: the
    blocks are the modules with a `drop_path` (CNNs) or `drop_path1` (ViT)."""
    rates = []
    for module in model.modules():
        for attr in ("drop_path", "drop_path1"):
            if hasattr(module, attr):
                dp = getattr(module, attr)
                rates.append(float(dp.drop_prob) if isinstance(dp, DropPath) else 0.0)
    return rates


def parameter_count_1000(model: torch.nn.Module, num_classes: int) -> int:
    """The parameter count with a 1000-class head: every model here ends in a
    Linear classifier with bias."""
    params = sum(p.numel() for p in model.parameters())
    head = model.get_classifier()
    assert isinstance(head, torch.nn.Linear), type(head)
    return params + (1000 - num_classes) * (head.in_features + 1)


def no_weight_decay_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters timm's `param_groups_weight_decay` (as
    `create_optimizer_v2` calls it, with `model.no_weight_decay()`) puts in the
    group without weight decay."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, weight_decay=0.05, no_weight_decay_list=skip)
    by_id = {id(p): n for n, p in model.named_parameters()}
    no_decay = [g for g in groups if g["weight_decay"] == 0.0]
    assert len(no_decay) == 1, groups
    return sorted(by_id[id(p)] for p in no_decay[0]["params"])


def round_to_float16(model: torch.nn.Module) -> None:
    """Rounds every floating-point parameter and buffer to the nearest float16
    value, in place and kept float32: what the float16 file holds, exactly."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for name, num_classes, size, kwargs in MODELS:
        start = time.perf_counter()
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                  drop_path_rate=DROP_PATH_RATE, **kwargs)
        randomise(model)
        round_to_float16(model)
        model.eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            logits = model(x)
        folder = out / name
        folder.mkdir(exist_ok=True)
        state = model.state_dict()
        half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        save_file(half, str(folder / "weights.safetensors"))
        np.save(folder / "input.npy", x.numpy())
        np.save(folder / "logits.npy", logits.numpy())
        meta = {"name": name, "num_classes": num_classes, "size": size,
                "parameter_count": sum(p.numel() for p in model.parameters()),
                "parameter_count_1000": parameter_count_1000(model, num_classes),
                "create_kwargs": kwargs, "drop_path_rate": DROP_PATH_RATE,
                "drop_path_rates": drop_path_rates(model), "keys": list(state.keys()),
                "no_weight_decay": no_weight_decay_names(model)}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        index.append(name)
        print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
    (out / "index.json").write_text(json.dumps(index))
