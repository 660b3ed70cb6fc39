"""torch.amp.GradScaler on the CPU over scripted sequences of finite and
non-finite gradients: the oracle of the fp16 loss scaler
(crates/train/src/grad_scaler.rs, tests/tests/parity_grad_scaler.rs).

Each case drives GradScaler as timm's NativeScaler does (scale(loss).backward(),
unscale_, step, update) on two parameters whose loss is sum(p * g), so the
scaled gradient is exactly f32(g * scale). Per step it records the raw g, the
scale before, whether an inf/NaN was found, whether the optimizer stepped,
the unscaled gradients, and the scale and growth tracker after; per case the
final state_dict().
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

INF = float("inf")
NAN = float("nan")


def _sequences():
    gen = torch.Generator().manual_seed(10)

    def finite(scale=1.0):
        return [torch.randn(5, generator=gen) * scale, torch.randn(2, 3, generator=gen) * scale]

    def poisoned(value, which=0):
        g = finite()
        g[which].view(-1)[1] = value
        return g

    # torch's defaults: a clean start, every kind of non-finite value,
    # gradients that only overflow once scaled, recovery.
    default = [
        finite(),
        finite(1e34),  # finite, but overflows f32 once scaled by 65536
        poisoned(INF),
        poisoned(NAN, 1),
        poisoned(-INF, 1),
        finite(1e34),  # finite, and 1e34 * 8192 still fits in f32
        finite(1e34),
        finite(1e34),
        finite(1e34),
        finite(),
        finite(1e-30),
        poisoned(NAN),
        finite(),
    ]
    # Short growth interval from near f32's top, with gradients too small to
    # overflow even at 2^127: the scale reaches 2^127, and every later growth
    # (to 2^128, inf) is refused.
    ceiling = [finite(1e-3) for _ in range(9)]
    # Interleaved growth and backoff, growth interval 3.
    growth = [finite(), finite(), finite(), finite(), poisoned(INF), finite(), finite(), finite(),
              finite(), finite(), poisoned(NAN, 1), finite(), finite(), finite()]
    # A scale backed off into the subnormals and to zero.
    underflow = [poisoned(INF) for _ in range(4)] + [finite()]
    return [
        ("default", dict(), default),
        ("ceiling", dict(init_scale=2.0 ** 125, growth_interval=2), ceiling),
        ("growth", dict(init_scale=1024.0, growth_interval=3), growth),
        ("underflow", dict(init_scale=2.0 ** -147), underflow),
    ]


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, kwargs, steps in _sequences():
        scaler = torch.amp.GradScaler("cpu", **kwargs)
        params = [torch.zeros(5, requires_grad=True), torch.zeros(2, 3, requires_grad=True)]
        opt = torch.optim.SGD(params, lr=0.1)
        stepped = []
        sgd_step = opt.step

        def counted_step(*args, **kwargs):
            stepped.append(True)
            return sgd_step(*args, **kwargs)

        # GradScaler.step calls optimizer.step only for an applied update.
        opt.step = counted_step
        tensors = {}
        records = []
        for i, grads in enumerate(steps):
            opt.zero_grad(set_to_none=True)
            scale_before = scaler.get_scale()
            loss = sum((p * g).sum() for p, g in zip(params, grads))
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            found_inf = sum(v.item() for v in scaler._found_inf_per_device(opt).values()) > 0
            for j, (g, p) in enumerate(zip(grads, params)):
                tensors[f"step{i}.g{j}"] = g.contiguous()
                tensors[f"step{i}.u{j}"] = p.grad.detach().clone().contiguous()
            stepped.clear()
            scaler.step(opt)
            applied = bool(stepped)
            scaler.update()
            records.append(
                dict(
                    scale_before=scale_before,
                    found_inf=bool(found_inf),
                    applied=bool(applied),
                    scale_after=scaler.get_scale(),
                    growth_tracker=scaler._get_growth_tracker(),
                )
            )
        file = f"{name}.safetensors"
        save_file(tensors, str(out / file))
        state = scaler.state_dict()
        cases.append(
            dict(
                name=name,
                file=file,
                init_scale=kwargs.get("init_scale", 65536.0),
                growth_interval=kwargs.get("growth_interval", 2000),
                steps=records,
                state_dict={k: (float(v) if isinstance(v, float) else v) for k, v in state.items()},
            )
        )
    (out / "cases.json").write_text(json.dumps(dict(torch=torch.__version__, cases=cases), indent=1))
