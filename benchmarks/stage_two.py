"""Stage two against the paper's way and against LoRA: time per epoch and peak memory.

    python benchmarks/stage_two.py                                   # CPU: vit_tiny, 256 images, batch 32
    python benchmarks/stage_two.py --model vit_b16 --device cuda --batch-sizes 32,64 --images 1024

Three ways to train on the same images, same batch size, one epoch measured after a warm-up
epoch, each in its own process (so peak memory is its own):

- cache: LAST (r = 8) trained by sidetune's engine from the extracted cache; cache_compiled
  the same with `--compile` (its warm-up epoch compiles).
- paper: the identical LAST side network and optimiser step, with the frozen backbone run on
  every batch to produce its inputs (no gradient through the backbone) — how LAST is trained
  without a cache.
- lora: LoRA (r = 8 on every block's qkv, B zero-initialised) on the same timm model with a
  linear head, backpropagating through the backbone — what users run today.

The images are decoded and preprocessed once into memory for paper and lora, so their
figures exclude image decoding: the comparison favours them."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from common import WORK, generated_images, machine, peak_memory, run_child, write_result

LAST_OPTIONS = {"rank": 8}
LORA_RANK = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-sizes", default="32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pretrained", action="store_true", help="Hub weights (default: seeded random weights).")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child")
    parser.add_argument("--args")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CASES[args.child](**json.loads(args.args))))
        return

    import sidetune

    folder = generated_images(WORK / f"images-{args.images}", args.images)
    cache_path = WORK / f"cache-{args.model}-{args.images}"
    sidetune.extract(args.model, str(folder), cache_path, pretrained=args.pretrained, device=args.device)
    rows = []
    for batch_size in map(int, args.batch_sizes.split(",")):
        common = {"model": args.model, "cache": str(cache_path), "folder": str(folder), "batch_size": batch_size,
                  "device": args.device, "pretrained": args.pretrained}
        measured = {case: run_child(Path(__file__), case, common) for case in CASES}
        for case, result in measured.items():
            row = {"batch_size": batch_size, "method": case, **result,
                   "time_ratio_to_cache": round(result["epoch_seconds"] / measured["cache"]["epoch_seconds"], 2),
                   "memory_ratio_to_cache": round(result["peak_memory_bytes"] / measured["cache"]["peak_memory_bytes"], 2)}
            rows.append(row)
            print(row, flush=True)
    write_result("stage_two", {"model": args.model, "images": args.images, "pretrained": args.pretrained,
                               "machine": machine(torch.device(args.device)), "rows": rows}, args.out)


def _cache_case(model: str, cache: str, folder: str, batch_size: int, device: str, pretrained: bool,
                compile: bool = False) -> dict:
    import sidetune
    from sidetune.engine import train_group

    epochs = []
    config = sidetune.TrainConfig.create("last", LAST_OPTIONS, epochs=2, warmup_epochs=0, batch_size=batch_size)
    train_group(sidetune.open_cache(cache), [config], "train", "train", torch.device(device),
                on_epoch=lambda stats: epochs.append(stats.seconds), compile=compile)
    return {"epoch_seconds": round(epochs[1] - epochs[0], 3), "peak_memory_bytes": peak_memory(torch.device(device))}


def _images(backbone, folder: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the folder decoded and preprocessed (vtab preprocessing), on the device."""
    from sidetune.backbones import resolve_preprocessing
    from sidetune.datasets import load_source

    split = load_source(folder).splits["train"]
    transform = resolve_preprocessing("vtab", backbone).transform()
    images = torch.stack([transform(split.image(i)) for i in range(len(split))])
    return images.to(device), torch.from_numpy(split.labels).to(device)


def _paper_case(model: str, cache: str, folder: str, batch_size: int, device: str, pretrained: bool) -> dict:
    import sidetune
    from sidetune.backbones import forward_stages, load_backbone
    from sidetune.engine import StackedStep, build_sidenet, training_autocast
    from sidetune.optim import StackedAdamW

    device = torch.device(device)
    backbone = load_backbone(model, pretrained=pretrained)
    backbone.model.to(device)
    images, labels = _images(backbone, folder, device)
    net = build_sidenet(sidetune.open_cache(cache), "last", LAST_OPTIONS, 1)
    net.reset_parameters([0])
    net.to(device)
    stages = net.stages_needed()
    # The side network's step exactly as the engine runs it (fused optimizer, CUDA graphs on a GPU).
    step = StackedStep(net, StackedAdamW(net, torch.tensor([1e-3]), torch.tensor([1e-4])), torch.zeros(1), batch_size,
                       (len(stages), backbone.num_tokens, backbone.width), torch.float16, cuda_graphs=device.type == "cuda")

    def epoch(number: int) -> int:
        for begin in range(0, len(images), batch_size):
            with torch.no_grad(), training_autocast(device):
                tokens = torch.stack([x.half() for x in forward_stages(backbone.model, images[begin:begin + batch_size], stages)], 1)
            number += 1
            step(tokens, labels[begin:begin + batch_size], number, 1.0)
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
    from sidetune.engine import training_autocast

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
    """One warm-up epoch, then one timed epoch."""
    step = epoch(0)
    _synchronize(device)
    started = time.perf_counter()
    epoch(step)
    _synchronize(device)
    return {"epoch_seconds": round(time.perf_counter() - started, 3), "peak_memory_bytes": peak_memory(device)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CASES = {"cache": _cache_case, "cache_compiled": lambda **args: _cache_case(**args, compile=True),
         "paper": _paper_case, "lora": _lora_case}

if __name__ == "__main__":
    main()
