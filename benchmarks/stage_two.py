"""Stage two against the paper's way and against LoRA: time per epoch, peak memory, FLOP efficiency.

    python benchmarks/stage_two.py                                   # CPU: vit_tiny, 256 images, batch 32
    python benchmarks/stage_two.py --model vit_b16 --device cuda --batch-sizes 32,64 --images 1024

For each side network (linear, LAST r = 8, LoSA r_t = r_c = 16) three ways to train on the same
images with the same batch size, each in its own process (so peak memory is its own), timed as
the fastest of three epochs after a warm-up epoch, and the fastest of `--repeats` such processes
run in alternating order:

- cache: the side network trained by sidetune's engine from the extracted cache;
  cache_compiled the same with `--compile` (its warm-up epoch compiles); on CUDA also
  cache_fused, with `--fused` (the Triton kernels of sidetune/kernels/).
- paper: the identical side network and optimiser step, with the frozen backbone run on every
  batch to produce its inputs (no gradient through the backbone): how it is trained without a
  cache.

With `--configs 16,64`, the cache and paper ways again with K configurations stacked: the
paper's own parallel training (K side networks behind one backbone forward per batch) against
K configurations trained from the cache, rows under "stacks".

And, once per batch size, lora (LoRA r = 8 on every block's qkv, B zero-initialised, on the same
timm model with a linear head, backpropagating through the backbone: what users run today) and
forward (the bare backbone forward over the same batches: the FLOP rate the backbone reaches on
this device).

Efficiency is the side network's achieved training FLOP rate (analytic matrix-product FLOPs of
its forward and backward as the engine computes them, `side_training_flops`, over the cache
way's seconds) divided by the backbone forward's (`backbone_forward_flops` over the forward
case's seconds). Element-wise work is not counted, so it shows how far a step is from pure
matrix-product speed.

The images are decoded and preprocessed once into memory for paper, lora and forward, so their
figures exclude image decoding: the comparison favours them. Every case keeps freed memory as
the command line does (`sidetune.malloc.keep_freed_memory`)."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from common import WORK, generated_images, machine, peak_memory, run_child, write_result
from sidetune.kernels.chain_reference import chain_flops

METHODS = {"linear": {}, "last": {"rank": 8}, "losa": {"token_rank": 16, "channel_rank": 16}}  # LoSA: its defaults
LORA_RANK = 8
WAYS = ("cache", "cache_compiled", "paper")
TIMED_EPOCHS = 3  # after a warm-up epoch; the fastest counts (this machine's noise is ±20% between epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-sizes", default="32")
    parser.add_argument("--methods", default=",".join(METHODS), help="Side networks to measure (comma-separated).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of every case, alternating; the fastest counts.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default="1", help="Also K configurations stacked, cache and paper ways (comma-separated K > 1).")
    parser.add_argument("--pretrained", action="store_true", help="Hub weights (default: seeded random weights).")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child")
    parser.add_argument("--args")
    args = parser.parse_args()
    if args.child:
        from sidetune.malloc import keep_freed_memory

        keep_freed_memory()  # every case with the command line's allocator settings
        print(json.dumps(CASES[args.child](**json.loads(args.args))))
        return

    import sidetune
    from sidetune.backbones import load_backbone

    folder = generated_images(WORK / f"images-{args.images}", args.images)
    cache_path = WORK / f"cache-{args.model}-{args.images}"
    sidetune.extract(args.model, str(folder), cache_path, pretrained=args.pretrained, device=args.device)
    cache = sidetune.open_cache(cache_path)
    backbone = load_backbone(args.model, pretrained=False)
    shapes = {"width": backbone.width, "depth": backbone.depth, "tokens": backbone.num_tokens,
              "classes": len(cache.class_names)}
    backbone_flops = backbone_forward_flops(backbone.model, backbone.num_tokens)
    methods = args.methods.split(",")
    rows: list[dict] = []
    summary: list[dict] = []
    stacks: list[dict] = []
    ways = WAYS + (("cache_fused",) if args.device == "cuda" else ())
    for batch_size in map(int, args.batch_sizes.split(",")):
        common = {"model": args.model, "cache": str(cache_path), "folder": str(folder), "batch_size": batch_size,
                  "device": args.device, "pretrained": args.pretrained}
        cases = [("backbone", "forward"), ("lora", "lora")] + [(method, way) for method in methods for way in ways]
        measured: dict[tuple[str, str], dict] = {}
        for repeat in range(args.repeats):  # the fastest of alternating repeats counts
            for method, way in cases if repeat % 2 == 0 else reversed(cases):
                arguments = common if method in ("backbone", "lora") else {**common, "method": method}
                result = run_child(Path(__file__), way, arguments)
                if (method, way) not in measured or result["epoch_seconds"] < measured[(method, way)]["epoch_seconds"]:
                    measured[(method, way)] = result
        for method, way in cases:
            result = measured[(method, way)]
            rows.append({"batch_size": batch_size, "method": method, "way": way, **result})
            print(rows[-1], flush=True)
        summary += summarise(measured, methods, shapes, backbone_flops, batch_size, ways)
        for k in (int(k) for k in args.configs.split(",") if int(k) > 1):
            for method in methods:
                seconds = {way: run_child(Path(__file__), way, {**common, "method": method, "configs": k})["epoch_seconds"]
                           for way in ("cache", "paper")}
                stacks.append({"batch_size": batch_size, "method": method, "configs": k,
                               **{f"{way}_seconds": value for way, value in seconds.items()},
                               "over_paper": round(seconds["paper"] / seconds["cache"], 2)})
                print(stacks[-1], flush=True)
    write_result("stage_two", {"model": args.model, "images": args.images, "pretrained": args.pretrained, "repeats": args.repeats,
                               "shapes": shapes, "backbone_gflop_per_image": round(backbone_flops / 1e9, 3),
                               "machine": machine(torch.device(args.device)), "rows": rows, "summary": summary,
                               "stacks": stacks},
                 args.out)


def summarise(measured: dict[tuple[str, str], dict], methods: list[str], shapes: dict, backbone_flops: float,
              batch_size: int, ways: tuple[str, ...] = WAYS) -> list[dict]:
    """Per side network: its seconds each way, its speed-ups over the paper's way and LoRA, its
    analytic training FLOPs per image and its FLOP efficiency (eager and compiled)."""
    forward, lora = measured[("backbone", "forward")]["epoch_seconds"], measured[("lora", "lora")]["epoch_seconds"]
    summary = []
    for method in methods:
        flops = side_training_flops(method, METHODS[method], **shapes, batch_size=batch_size)
        seconds = {way: measured[(method, way)]["epoch_seconds"] for way in ways}
        row = {"batch_size": batch_size, "method": method, **{f"{way}_seconds": s for way, s in seconds.items()},
               "side_gflop_per_image": float(f"{flops / 1e9:.4g}")}
        for suffix, way in (("", "cache"), ("_compiled", "cache_compiled"), ("_fused", "cache_fused")):
            if way not in seconds:
                continue
            row[f"over_paper{suffix}"] = round(seconds["paper"] / seconds[way], 2)
            row[f"over_lora{suffix}"] = round(lora / seconds[way], 2)
            row[f"efficiency{suffix}"] = float(f"{flops * forward / (backbone_flops * seconds[way]):.3g}")
        summary.append(row)
        print(row, flush=True)
    return summary


def backbone_forward_flops(model: nn.Module, tokens: int) -> float:
    """FLOPs (2 per multiply-add) of one image through a timm ViT's patch embedding and blocks:
    every linear layer of a block applied to every token, and attention's two T x T products."""
    proj = model.patch_embed.proj
    patches = tokens - model.num_prefix_tokens
    total = 2 * patches * proj.in_channels * math.prod(proj.kernel_size) * proj.out_channels
    for block in model.blocks:
        total += sum(2 * tokens * m.in_features * m.out_features for m in block.modules() if isinstance(m, nn.Linear))
        total += 2 * 2 * tokens * tokens * model.embed_dim
    return float(total)


def side_training_flops(method: str, options: dict, width: int, depth: int, tokens: int, classes: int,
                        batch_size: int) -> float:
    """FLOPs (2 per multiply-add) of one image's training forward and backward through a side
    network, matrix products only, as the engine computes them (frozen inputs need no gradient);
    products of weights alone, once per step, count a batch's share."""
    d, t = width, tokens
    head = 2 * 2 * d * classes  # the linear head: forward and its weights' gradient
    if method == "linear":
        return float(head)
    if method == "last":  # low-rank form (sidetune/sidenets/last.py), depth 1, gap 1: one module per block
        r, m = options["rank"], depth
        # S = X_g (γ⊙W_g) and U = X_g W_Oᵀ for the modules before g's (a GPU computes all of U: m r m columns)
        shared = 2 * t * d * 3 * r * m + 2 * t * d * r * m * (m - 1) // 2
        chain = sum(chain_flops(m, 1, t, 1, 1, r, options.get("heads", 1)))  # forward and backward, one image
        small = 3 * (2 * m * d * 3 * r + 2 * m * r * d * m * 3 * r + 2 * m * r * d * m * r)  # βW, Z, G; once per step
        return 2 * shared + chain + small / batch_size + 3 * 2 * m * r * d + head  # y = x_N + A W_O at CLS
    if method == "losa":  # per block: token mixing (T -> r_t -> T) and channel mixing (D -> r_c -> D)
        mixing = 2 * 2 * d * t * (options["token_rank"] + options["channel_rank"])
        return float(depth * 3 * mixing + head)  # backward: inputs and weights
    raise ValueError(f"no FLOP count for {method}")


def _cache_case(model: str, cache: str, folder: str, batch_size: int, device: str, pretrained: bool, method: str,
                compile: bool = False, fused: bool = False, configs: int = 1) -> dict:
    import sidetune
    from sidetune.training import train_group

    ends = []
    stack = [sidetune.TrainConfig.create(method, METHODS[method], epochs=1 + TIMED_EPOCHS, warmup_epochs=0,
                                         batch_size=batch_size, seed=seed) for seed in range(configs)]
    train_group(sidetune.open_cache(cache), stack, "train", "train", torch.device(device),
                on_epoch=lambda stats: ends.append(stats.seconds), compile=compile, fused=fused, evaluate=False)
    return {"epoch_seconds": round(min(b - a for a, b in itertools.pairwise(ends)), 3),
            "peak_memory_bytes": peak_memory(torch.device(device))}


def _images(backbone, folder: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the folder decoded and preprocessed (vtab preprocessing), on the device."""
    from sidetune.backbones import resolve_preprocessing
    from sidetune.datasets import load_source

    split = load_source(folder).splits["train"]
    transform = resolve_preprocessing("vtab", backbone).transform()
    images = torch.stack([transform(split.image(i)) for i in range(len(split))])
    return images.to(device), torch.from_numpy(split.labels).to(device)


def _paper_case(model: str, cache: str, folder: str, batch_size: int, device: str, pretrained: bool, method: str,
                configs: int = 1) -> dict:
    """The paper's way: the backbone run on every batch, and `configs` side networks (stacked,
    as the engine runs them) trained behind that one forward."""
    import sidetune
    from sidetune.backbones import forward_stages, load_backbone
    from sidetune.training import sidenet_blueprint
    from sidetune.training.optim import StackedAdamW
    from sidetune.training.step import StackedStep, training_autocast

    device = torch.device(device)
    backbone = load_backbone(model, pretrained=pretrained)
    backbone.model.to(device)
    images, labels = _images(backbone, folder, device)
    net = sidenet_blueprint(sidetune.open_cache(cache), method, METHODS[method]).build(configs)
    net.reset_parameters(list(range(configs)))
    net.to(device)
    stages = net.stages_needed()
    # The side network's step exactly as the engine runs it (stacked optimizer, CUDA graphs on a GPU).
    lr, decay = torch.full((configs,), 1e-3), torch.full((configs,), 1e-4)
    step = StackedStep(net, StackedAdamW(net, lr, decay), torch.zeros(configs), batch_size,
                       (len(stages), backbone.num_tokens, backbone.width), torch.float16, cuda_graphs=device.type == "cuda")

    def epoch(number: int) -> int:
        for begin in range(0, len(images), batch_size):
            with torch.no_grad(), training_autocast(device):
                tokens = torch.stack([x.half() for x in forward_stages(backbone.model, images[begin:begin + batch_size], stages)], 1)
            number += 1
            step(tokens, labels[begin:begin + batch_size], number, 1.0)
        return number

    return _timed_epochs(epoch, device)


def _forward_case(model: str, cache: str, folder: str, batch_size: int, device: str, pretrained: bool) -> dict:
    """The bare backbone forward over the batches (the part of the paper's way the cache removes)."""
    from sidetune.backbones import forward_stages, load_backbone
    from sidetune.training.step import training_autocast

    device = torch.device(device)
    backbone = load_backbone(model, pretrained=pretrained)
    backbone.model.to(device)
    images, _ = _images(backbone, folder, device)

    def epoch(number: int) -> int:
        for begin in range(0, len(images), batch_size):
            with torch.no_grad(), training_autocast(device):
                for _ in forward_stages(backbone.model, images[begin:begin + batch_size], [backbone.depth]):
                    pass
        return number

    return _timed_epochs(epoch, device)


class LoRALinear(nn.Module):
    """y = W x + b + (B A x) * alpha / r with W, b frozen; A (r x in) Kaiming-uniform, B zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 8.0):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


def _lora_case(model: str, cache: str, folder: str, batch_size: int, device: str, pretrained: bool) -> dict:
    from sidetune.backbones import load_backbone
    from sidetune.training.step import training_autocast

    device = torch.device(device)
    torch.manual_seed(0)
    backbone = load_backbone(model, pretrained=pretrained)
    vit = backbone.model
    for parameter in vit.parameters():
        parameter.requires_grad_(False)
    for block in vit.blocks:
        block.attn.qkv = LoRALinear(block.attn.qkv, LORA_RANK)
    images, labels = _images(backbone, folder, device)
    head = nn.Linear(backbone.width, int(labels.max()) + 1)
    vit.to(device).train(), head.to(device)
    trainable = [p for p in vit.parameters() if p.requires_grad] + list(head.parameters())
    optimiser = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=1e-4)

    def epoch(step: int) -> int:
        for begin in range(0, len(images), batch_size):
            with training_autocast(device):
                features = vit.forward_features(images[begin:begin + batch_size])
                logits = head(features[:, 0])
            loss = nn.functional.cross_entropy(logits.float(), labels[begin:begin + batch_size])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        return step

    return _timed_epochs(epoch, device)


def _timed_epochs(epoch, device: torch.device) -> dict:
    """One warm-up epoch, then the fastest of TIMED_EPOCHS timed ones."""
    step = epoch(0)
    seconds = []
    for _ in range(TIMED_EPOCHS):
        _synchronize(device)
        started = time.perf_counter()
        step = epoch(step)
        _synchronize(device)
        seconds.append(time.perf_counter() - started)
    return {"epoch_seconds": round(min(seconds), 3), "peak_memory_bytes": peak_memory(device)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CASES = {"cache": _cache_case, "cache_compiled": lambda **args: _cache_case(**args, compile=True),
         "cache_fused": lambda **args: _cache_case(**args, fused=True),
         "paper": _paper_case, "lora": _lora_case, "forward": _forward_case}

if __name__ == "__main__":
    main()
