"""Checks of the fused Triton kernels against their torch implementations, run where the kernels
run: in this process on a CUDA GPU, or on the CPU in a child process under Triton's interpreter
(`python tests/kernel_checks.py OUT.json CACHE`, with TRITON_INTERPRET=1 set before triton is
imported). Each check returns the relative errors it measured; tests/test_kernels.py asserts
them. Shapes are small: the interpreter runs every program in numpy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from sidetune.sidenets import FeatureLayout, create_sidenet

WIDTH, CLASSES = 32, 5


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).abs().max() / reference.double().abs().max().clamp_min(1e-12))


def network_errors(device: torch.device, method: str, configs: int, tokens: int, options: dict) -> dict:
    """Logits and every parameter's gradient of a stacked network with the fused kernels
    against the same network's torch implementation (same parameters, same batch)."""
    depth = 4
    layout = FeatureLayout(depth=depth, width=WIDTH, num_tokens=tokens, num_prefix_tokens=1, num_classes=CLASSES,
                           stages=tuple(range(depth + 1)), token_selection="all")
    net = create_sidenet(method, layout, configs, zero_init_out=False, **options)
    generator = torch.Generator().manual_seed(0)
    net.set_final_norm(torch.rand(WIDTH, generator=generator) + 0.5, torch.randn(WIDTH, generator=generator), 1e-6)
    net.reset_parameters(list(range(configs)))
    net.to(device)
    batch = torch.randn(3, len(net.stages_needed()), tokens, WIDTH, generator=generator).half().to(device)
    weights = torch.randn(configs, 3, CLASSES, generator=generator).to(device)
    results = {}
    for fused in (False, True):
        net.fused = fused
        net.zero_grad()
        logits = net(batch)
        (logits * weights).sum().backward()
        results[fused] = logits.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}
    (reference_logits, reference_grads), (logits, grads) = results[False], results[True]
    return {"logits": relative_error(logits, reference_logits),
            "gradients": {name: relative_error(grads[name], reference_grads[name]) for name in grads}}


def adamw_errors(device: torch.device) -> dict:
    """Three fused AdamW updates against the torch ones: 3 configurations, the second inactive
    with NaN and inf gradients, per-config lr and weight decay, some entries not decayed."""
    from sidetune.kernels.adamw import stacked_adamw_

    generator = torch.Generator().manual_seed(1)
    size = 2500  # more than one block of the kernel, and not a multiple of it
    params = torch.randn(3, size, generator=generator).to(device)
    decay = (torch.rand(1, size, generator=generator) > 0.3).float().to(device)
    lr, weight_decay = torch.tensor([[1e-2], [1e-1], [3e-3]]).to(device), torch.tensor([[0.0], [0.1], [0.5]]).to(device)
    active = torch.tensor([True, False, True]).to(device)
    states = {fused: [params.clone(), torch.zeros_like(params), torch.zeros_like(params)] for fused in (False, True)}
    for step in range(1, 4):
        grads = torch.randn(3, size, generator=generator).to(device)
        grads[1, :10] = float("nan")
        grads[1, 10:20] = float("inf")
        for fused, (p, m, v) in states.items():
            stacked_adamw_(p, m, v, grads.clone(), lr, weight_decay, decay, active, torch.tensor(0.7, device=device),
                           torch.tensor(float(step), device=device), fused)
    (p0, m0, v0), (p1, m1, v1) = states[False], states[True]
    return {"params": relative_error(p1, p0), "exp_avg": relative_error(m1, m0), "exp_avg_sq": relative_error(v1, v0),
            "inactive_unchanged": bool(torch.equal(p1[1], params[1])), "finite": bool(torch.isfinite(p1).all())}


def training_errors(device: torch.device, cache_path: str) -> dict:
    """A LAST configuration (two heads) trained two epochs from a cache by the engine with the
    fused kernels and without: the per-epoch losses and the final states. (Stacked
    configurations are checked layer by layer above: the interpreter is slow.)"""
    import sidetune
    from sidetune.training import train_group

    cache = sidetune.open_cache(cache_path)
    configs = [sidetune.TrainConfig.create("last", {"rank": 4, "heads": 2}, lr=1e-2, epochs=2, batch_size=4)]
    runs = {fused: train_group(cache, configs, "train800", "train800", device, fused=fused, cuda_graphs=False)
            for fused in (False, True)}
    losses = [relative_error(torch.tensor(f.epoch_losses), torch.tensor(r.epoch_losses))
              for f, r in zip(runs[True], runs[False])]
    states = [max(relative_error(f.state[name], r.state[name]) for name in r.state) for f, r in zip(runs[True], runs[False])]
    return {"losses": max(losses), "states": max(states), "top1": [[r.top1 for r in runs[f]] for f in (False, True)]}


def all_checks(device: torch.device, cache_path: str) -> dict:
    return {
        "last_cls": network_errors(device, "last", 3, 40, {"rank": 4}),  # two token tiles, the second ragged
        "last_mean_heads": network_errors(device, "last", 2, 21, {"rank": 8, "heads": 2, "pool": "mean"}),
        "last_gap_depth": network_errors(device, "last", 1, 21, {"rank": 4, "gap": 2, "depth": 2, "pool": "both"}),
        "mist": network_errors(device, "mist", 2, 21, {"rank": 4, "groups": 2, "depth": 2}),
        "adamw": adamw_errors(device),
        "training": training_errors(device, cache_path),
    }


if __name__ == "__main__":
    out, cache = sys.argv[1:3]
    Path(out).write_text(json.dumps(all_checks(torch.device("cpu"), cache)))
