"""Model fixtures from timm 1.0.31: weights saved from timm's own `state_dict()`
as safetensors, an input batch and timm's eval-mode logits, for every model the
registry test covers. BatchNorm parameters and statistics are randomised so that
no branch hides behind timm's zero-initialised last BN.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file

# (name, num_classes, input side): small inputs keep CI fast.
MODELS = [
    ("resnet18", 10, 64),
    ("resnet34", 10, 64),
    ("resnet50", 1000, 96),
    ("resnet101", 10, 64),
    ("resnet152", 10, 64),
]


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for name, num_classes, size in MODELS:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.1)
                    module.running_mean.normal_(0.0, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
                    module.num_batches_tracked.fill_(17)
        model.eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            logits = model(x)
        folder = out / name
        folder.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "weights.safetensors"))
        np.save(folder / "input.npy", x.numpy())
        np.save(folder / "logits.npy", logits.numpy())
        params = sum(p.numel() for p in model.parameters())
        meta = {"name": name, "num_classes": num_classes, "size": size, "parameter_count": params,
                "keys": list(model.state_dict().keys())}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        index.append(name)
    (out / "index.json").write_text(json.dumps(index))
