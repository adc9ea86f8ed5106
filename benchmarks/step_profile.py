"""What a stage-two training step costs and asks of the device: milliseconds per step, and
the kernels it launches, per method and number of stacked configurations K (random tokens at a
backbone's shapes, no cache).

    python benchmarks/step_profile.py                                   # CPU, vit_tiny shapes
    python benchmarks/step_profile.py --device cuda --width 768 --stacks 1,16,64 --out FILE

Timed variants of each method's step:
- before (LAST only): the engine before the low-rank form: a (K, B, T, D) side state, AdamW
  with ~8 kernels per parameter, the non-finite check read on the host every step, a float32
  copy of every batch;
- eager: the engine's StackedStep as shipped (torch implementation of every op);
- captured (CUDA) / compiled (CPU): that step in a CUDA graph, or its forward through torch.compile;
- fused (CUDA): with the Triton kernels (LAST's and MIST's chain, the stacked AdamW) in a graph.
Counted (benchmarks/launches.py, torch's profiler): one step's compute ops on the torch path, and
its kernel launches with the fused kernels (on a CPU run in a child under Triton's
interpreter: counts, not times), for LAST and MIST at 6, 12 and 24 modules."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine, write_result
from launches import count_steps
from sidetune.sidenets import FeatureLayout, create_sidenet
from sidetune.sidenets.base import layer_norm_stacked
from sidetune.training.optim import StackedAdamW
from sidetune.training.step import StackedStep, cross_entropy_per_config, training_autocast

METHODS = {"linear": {}, "last": {"rank": 8}, "mist": {"rank": 8}, "losa": {"token_rank": 8, "channel_rank": 8}}
COUNTED = ("last", "mist")
COUNT_SHAPES = {"width": 32, "tokens": 5, "batch_size": 2}  # what a step launches does not depend on its sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--stacks", default="1,16")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--count-depths", default="6,12,24")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child-counts", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_counts:  # in a child under TRITON_INTERPRET=1: the fused path's launches on CPU tensors
        print(json.dumps(launch_counts(**json.loads(args.child_counts), device=torch.device("cpu"), fused=True)))
        return
    device = torch.device(args.device)
    stacks = [int(k) for k in args.stacks.split(",")]
    layout = vit_layout(args.depth, args.width, args.tokens)
    variants = ["eager", "captured"] + (["fused"] if device.type == "cuda" else [])
    rows = []
    for method in args.methods.split(","):
        for k in stacks:
            for variant in (["before"] if method == "last" else []) + variants:
                ms = timed_steps(layout, method, k, variant, args, device)
                rows.append({"method": method, "variant": variant, "configs": k, "ms_per_step": ms,
                             "ms_per_config": None if ms is None else round(ms / k, 3)})
                print(rows[-1], flush=True)
    counts = []
    # Triton's interpreter runs each program in Python: on a CPU the counts stop at K = 4 (what a
    # step launches grows with K only by a few layout copies).
    counted_stacks = (stacks[0], stacks[-1] if device.type == "cuda" else min(stacks[-1], 4))
    for depth in (int(d) for d in args.count_depths.split(",")):
        for k in counted_stacks:
            arguments = {"depth": depth, "configs": k}
            torch_path = launch_counts(**arguments, device=device, fused=False)
            fused = launch_counts(**arguments, device=device, fused=True) if device.type == "cuda" else interpreted_counts(arguments)
            for method in COUNTED:
                counts.append({"method": method, "blocks": depth, "modules": torch_path[method].pop("modules"),
                               "configs": k, "torch_path": torch_path[method], "fused": fused[method]})
                print(counts[-1], flush=True)
    profile(layout, stacks[-1], args, device)
    write_result("step_profile", {"shapes": {"width": args.width, "depth": args.depth, "tokens": args.tokens,
                                             "batch_size": args.batch_size},
                                  "machine": machine(device), "rows": rows, "launch_counts": counts}, args.out)


def vit_layout(depth: int, width: int, tokens: int) -> FeatureLayout:
    return FeatureLayout(depth=depth, width=width, num_tokens=tokens, num_prefix_tokens=1, num_classes=10,
                         stages=tuple(range(depth + 1)), token_selection="all")


def launch_counts(depth: int, configs: int, device: torch.device, fused: bool) -> dict:
    """What one eager step of each counted method dispatches, at `depth` modules (LAST: one per
    block; MIST: `depth` groups of stages, one module each)."""
    layout = vit_layout(depth, COUNT_SHAPES["width"], COUNT_SHAPES["tokens"])
    args = argparse.Namespace(batch_size=COUNT_SHAPES["batch_size"], tokens=COUNT_SHAPES["tokens"],
                              width=COUNT_SHAPES["width"])
    result = {}
    for method in COUNTED:
        options = {**METHODS[method], **({"groups": max(1, depth // 4)} if method == "mist" else {})}  # 4 modules each
        step, tokens, labels = build(layout, method, configs, "fused" if fused else "eager", args, device, options,
                                     graphs=False)
        numbers = iter(range(1, 100))
        step(tokens, labels, next(numbers))
        counted = count_steps(lambda: step(tokens, labels, next(numbers)), steps=2)
        modules = step.net.groups * step.net.depth
        result[method] = {"modules": modules, **counted.row(), "top_ops": dict(counted.by_op.most_common(8))}
    return result


def interpreted_counts(arguments: dict) -> dict:
    """launch_counts with the fused kernels, in a child whose Triton runs in its interpreter."""
    command = [sys.executable, __file__, "--child-counts", json.dumps(arguments)]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")) if p)}
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    if finished.returncode != 0:
        raise RuntimeError(f"counting the fused path failed:\n{finished.stderr[-4000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


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


def build(layout: FeatureLayout, method: str, k: int, variant: str, args, device: torch.device,
          options: dict | None = None, graphs: bool = True):
    net = create_sidenet(method, layout, k, **(METHODS[method] if options is None else options))
    net.set_final_norm(torch.ones(layout.width), torch.zeros(layout.width), 1e-6)
    net.reset_parameters(list(range(k)))
    net.to(device)
    generator = torch.Generator().manual_seed(0)
    stages = net.stages_needed()
    tokens = torch.randn(args.batch_size, len(stages), args.tokens, args.width, generator=generator).half().to(device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)
    lr, decay = torch.full((k,), 1e-3), torch.full((k,), 1e-4)
    if variant != "before":  # the engine as shipped
        fused = variant == "fused"
        net.fused = fused
        captured = variant in ("captured", "fused") and graphs
        shipped = StackedStep(net, StackedAdamW(net, lr, decay, fused=fused), torch.zeros(k), args.batch_size,
                              tuple(tokens.shape[1:]), tokens.dtype, compile=captured and device.type != "cuda",
                              cuda_graphs=captured and device.type == "cuda")
        def step(t: torch.Tensor, y: torch.Tensor, number: int) -> None:
            shipped(t, y, number, 1.0)

        step.net = net
        return step, tokens, labels

    optimizer = PerParameterAdamW(net, lr.to(device), decay.to(device))
    active = torch.ones(k, dtype=torch.bool, device=device)
    smoothing = torch.zeros(k, device=device)

    def step(batch: torch.Tensor, y: torch.Tensor, number: int) -> None:
        optimizer.zero_grad()
        with training_autocast(device):
            logits = d_wide_last_logits(net, batch.float())
        losses = cross_entropy_per_config(logits.float(), y, smoothing)
        finite = torch.isfinite(losses)
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
            m = (i - 1) * net.depth + j
            x = layer_norm_stacked(h, net.lsa_norm_weight[:, m], net.lsa_norm_bias[:, m])
            b, t = x.shape[1:3]
            qkv = torch.bmm(x.reshape(k, b * t, -1), net.lsa_w_qkv[:, m]).view(k * b, t, 3, net.heads, net.rank // net.heads)
            q, key, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            attended = F.scaled_dot_product_attention(q, key, v).transpose(1, 2).reshape(k, b * t, net.rank)
            h = h + torch.bmm(attended, net.lsa_w_o[:, m]).view(k, b, t, -1)
        u = h
    pooled = net.head_features(u - tokens[:, :-1].float().sum(dim=1))
    return torch.matmul(pooled, net.head_weight) + net.head_bias[:, None, :]


class PerParameterAdamW:
    """The optimizer before the stacked update: AdamW parameter by parameter, ~8 kernels each."""

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
    step, tokens, labels = build(layout, "last", k, "eager", args, device)
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
