"""Where a stage-two training step spends its time, and what each engine change bought: one
stacked LAST step at a backbone's shapes (random tokens, no cache), timed per K, change by change.

    python benchmarks/step_profile.py                                   # CPU, vit_tiny shapes
    python benchmarks/step_profile.py --device cuda --width 768 --stacks 1,16,64 --out FILE

Variants, each adding one change to the one before (the first is the engine before round two):
- before: LAST with a (K, B, T, D) side state, AdamW with ~8 kernels per parameter, the
  non-finite check read on the host every step, a float32 copy of every batch;
- fused_optimizer: one (K, P) AdamW update (sidetune/optim.py);
- no_host_sync: the non-finite check stays on the device;
- stored_dtype: the batch stays 16-bit, cast inside the side network;
- low_rank: LAST in low-rank form (sidetune/sidenets/last.py), the engine as shipped;
- cuda_graphs (CUDA) / compiled (CPU): the shipped step captured in a CUDA graph, or its
  forward through torch.compile.
Then the shipped step for linear and LoSA, and a profile of the shipped step at the largest K."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine, write_result
from sidetune.engine import StackedStep, cross_entropy_per_config, training_autocast
from sidetune.optim import StackedAdamW
from sidetune.sidenets import FeatureLayout, create_sidenet
from sidetune.sidenets.base import layer_norm_stacked

VARIANTS = ("before", "fused_optimizer", "no_host_sync", "stored_dtype", "low_rank", "captured")
METHODS = {"last": {"rank": 8}, "linear": {}, "losa": {"token_rank": 8, "channel_rank": 8}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--stacks", default="1,16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    layout = FeatureLayout(depth=args.depth, width=args.width, num_tokens=args.tokens, num_prefix_tokens=1,
                           num_classes=10, stages=tuple(range(args.depth + 1)), token_selection="all")
    rows = []
    stacks = [int(k) for k in args.stacks.split(",")]
    for k in stacks:
        for variant in VARIANTS:
            ms = timed_steps(layout, "last", k, variant, args, device)
            rows.append({"method": "last", "variant": variant, "configs": k, "ms_per_step": ms,
                         "ms_per_config": None if ms is None else round(ms / k, 3)})
            print(rows[-1], flush=True)
        for method in ("linear", "losa"):
            for variant in ("low_rank", "captured"):  # the shipped step, eager and captured/compiled
                ms = timed_steps(layout, method, k, variant, args, device)
                rows.append({"method": method, "variant": "shipped" if variant == "low_rank" else variant,
                             "configs": k, "ms_per_step": ms, "ms_per_config": None if ms is None else round(ms / k, 3)})
                print(rows[-1], flush=True)
    profile(layout, stacks[-1], args, device)
    write_result("step_profile", {"shapes": {"width": args.width, "depth": args.depth, "tokens": args.tokens,
                                             "batch_size": args.batch_size},
                                  "machine": machine(device), "rows": rows}, args.out)


def timed_steps(layout: FeatureLayout, method: str, k: int, variant: str, args, device: torch.device) -> float | None:
    """Milliseconds per step of `variant`, after warm-up steps; None when it runs out of memory."""
    try:
        return _timed_steps(layout, method, k, variant, args, device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _timed_steps(layout: FeatureLayout, method: str, k: int, variant: str, args, device: torch.device) -> float:
    step, tokens, labels = build(layout, method, k, variant, args, device)
    warmup = 3 if variant != "captured" or device.type == "cuda" else 2  # a compiled CPU step compiles on the first
    for number in range(1, warmup + 1):
        step(tokens, labels, number)
    synchronize(device)
    started = time.perf_counter()
    for number in range(warmup + 1, warmup + 1 + args.steps):
        step(tokens, labels, number)
    synchronize(device)
    return round((time.perf_counter() - started) / args.steps * 1000, 3)


def build(layout: FeatureLayout, method: str, k: int, variant: str, args, device: torch.device):
    level = VARIANTS.index(variant)
    net = create_sidenet(method, layout, k, **METHODS[method])
    net.set_final_norm(torch.ones(layout.width), torch.zeros(layout.width), 1e-6)
    net.reset_parameters(list(range(k)))
    net.to(device)
    generator = torch.Generator().manual_seed(0)
    stages = net.stages_needed()
    tokens = torch.randn(args.batch_size, len(stages), args.tokens, args.width, generator=generator).half().to(device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)
    lr, decay = torch.full((k,), 1e-3), torch.full((k,), 1e-4)
    if level >= VARIANTS.index("low_rank"):  # the engine as shipped
        captured = level == VARIANTS.index("captured")
        shipped = StackedStep(net, StackedAdamW(net, lr, decay), torch.zeros(k), args.batch_size, tuple(tokens.shape[1:]),
                              tokens.dtype, compile=captured and device.type != "cuda",
                              cuda_graphs=captured and device.type == "cuda")
        return (lambda t, y, number: shipped(t, y, number, 1.0)), tokens, labels

    forward = lambda batch: d_wide_last_logits(net, batch)
    optimizer = StackedAdamW(net, lr, decay) if level >= 1 else PerParameterAdamW(net, lr.to(device), decay.to(device))
    active = torch.ones(k, dtype=torch.bool, device=device)
    smoothing = torch.zeros(k, device=device)

    def step(batch: torch.Tensor, y: torch.Tensor, number: int) -> None:
        optimizer.zero_grad()
        with training_autocast(device):
            logits = forward(batch if level >= VARIANTS.index("stored_dtype") else batch.float())
        losses = cross_entropy_per_config(logits.float(), y, smoothing)
        finite = torch.isfinite(losses)
        if level < VARIANTS.index("no_host_sync"):
            bool(finite[active].all())  # the host waits for the device, as the engine did every step
        active.logical_and_(finite)
        torch.where(active, losses, 0.0).sum().backward()
        optimizer.step(torch.tensor(1.0, device=device), torch.tensor(float(number), device=device), active)

    return step, tokens, labels


def d_wide_last_logits(net, tokens: torch.Tensor) -> torch.Tensor:
    """LAST as the engine computed it before the low-rank form: the (K, B, T, D) side state."""
    k = net.num_configs
    u = tokens[:, 0].float().unsqueeze(0).expand(k, -1, -1, -1)
    for i in range(1, net.groups + 1):
        h = u + tokens[:, i]
        for j in range(net.depth):
            p = lambda name: getattr(net, f"lsa{i - 1}_{j}_{name}")
            x = layer_norm_stacked(h, p("norm_weight"), p("norm_bias"))
            b, t = x.shape[1:3]
            w_qkv = torch.cat([p("w_q"), p("w_k"), p("w_v")], dim=-1)
            qkv = torch.bmm(x.reshape(k, b * t, -1), w_qkv).view(k * b, t, 3, net.heads, net.rank // net.heads)
            q, key, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            attended = F.scaled_dot_product_attention(q, key, v).transpose(1, 2).reshape(k, b * t, net.rank)
            h = h + torch.bmm(attended, p("w_o")).view(k, b, t, -1)
        u = h
    pooled = net.head_features(u - tokens[:, :-1].float().sum(dim=1))
    return torch.matmul(pooled, net.head_weight) + net.head_bias[:, None, :]


class PerParameterAdamW:
    """The optimizer before round two: AdamW parameter by parameter, ~8 kernels each."""

    def __init__(self, net, lr: torch.Tensor, weight_decay: torch.Tensor):
        self.net, self.lr, self.weight_decay = net, lr, weight_decay
        self.moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in net.named_parameters()}

    def zero_grad(self) -> None:
        self.net.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, lr_scale: torch.Tensor, step: torch.Tensor, active: torch.Tensor) -> None:
        number = int(step)
        lr = torch.where(active, self.lr * lr_scale, torch.zeros_like(self.lr))
        for name, parameter in self.net.named_parameters():
            grad = torch.nan_to_num(parameter.grad, nan=0.0, posinf=0.0, neginf=0.0)
            shape = (-1,) + (1,) * (parameter.dim() - 1)
            exp_avg, exp_avg_sq = self.moments[name]
            exp_avg.mul_(0.9).add_(grad, alpha=0.1)
            exp_avg_sq.mul_(0.999).addcmul_(grad, grad, value=0.001)
            step_lr = lr.view(shape)
            if self.net.decay_mask(name):
                parameter.mul_(1 - step_lr * self.weight_decay.view(shape))
            denominator = (exp_avg_sq / (1 - 0.999 ** number)).sqrt_().add_(1e-8)
            parameter.addcdiv_(exp_avg * (step_lr / (1 - 0.9 ** number)), denominator, value=-1.0)


def profile(layout: FeatureLayout, k: int, args, device: torch.device) -> None:
    step, tokens, labels = build(layout, "last", k, "low_rank", args, device)
    for number in range(1, 4):
        step(tokens, labels, number)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as recorded:
        for number in range(4, 7):
            step(tokens, labels, number)
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"LAST, the shipped eager step at K = {k}, 3 steps:")
    print(recorded.key_averages().table(sort_by=sort, row_limit=15))
    if device.type == "cuda":
        kernels = [e for e in recorded.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"CUDA kernels per step: {len(kernels) / 3:.0f}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
