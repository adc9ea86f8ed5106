"""Scoring trained side networks on a split: predicted classes, top-1 and per-class accuracy."""

from __future__ import annotations

import torch

from sidetune.cache.reader import Cache
from sidetune.sidenets import SideNet
from sidetune.training.build import restore_sidenet
from sidetune.training.config import TrainResult
from sidetune.training.data import LoadedSplits, ResidentFeatures, StreamedFeatures


def score(cache: Cache, results: list[TrainResult], split: str, device: str | torch.device,
          loaded: LoadedSplits | None = None, batch_size: int = 64) -> None:
    """Evaluate the final states of `results` (from any stacks) on `split` in one pass: every
    network sees each batch, so a live split goes through the backbone once. Fills in each
    successful result's top-1 and per-class accuracy."""
    trained = [r for r in results if r.status == "ok"]
    if not trained:
        return
    device = torch.device(device)
    nets = [restore_sidenet(cache.info, r.config, r.state).to(device) for r in trained]
    predictions, labels = predicted_classes_together(cache, nets, split, device, loaded, batch_size)
    for result, predicted in zip(trained, predictions):
        result.top1, result.per_class = accuracy(predicted, labels, len(cache.class_names))


@torch.no_grad()
def predicted_classes_together(cache: Cache, nets: list[SideNet], split: str, device: torch.device,
                               loaded: LoadedSplits | None = None, batch_size: int = 64
                               ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each one-config network's (N,) predicted classes on `split`, every network scoring each
    batch of one pass over it, and the (N,) labels; on the CPU."""
    stages = sorted({stage for net in nets for stage in net.stages_needed()})
    data = (loaded or LoadedSplits(cache, device)).get(split, stages)
    positions = [[stages.index(stage) for stage in net.stages_needed()] for net in nets]
    predictions: list[list[torch.Tensor]] = [[] for _ in nets]
    for tokens, _ in data.batches(batch_size):
        for net, where, kept in zip(nets, positions, predictions):
            kept.append(net.eval()(tokens[:, where]).argmax(-1)[0].cpu())
    return [torch.cat(kept) for kept in predictions], data.labels.cpu()


@torch.no_grad()
def predicted_classes(net: SideNet, data: ResidentFeatures | StreamedFeatures, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, N) predicted classes for a split in stored order, and its (N,) labels, on the CPU."""
    net.eval()
    predictions = [net(tokens).argmax(-1).cpu() for tokens, _ in data.batches(batch_size)]
    return torch.cat(predictions, dim=1), data.labels.cpu()


def accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Top-1 in percent and per-class accuracy in percent (NaN for classes absent from labels)."""
    correct = (predictions == labels).float()
    per_class = [float(correct[labels == c].mean() * 100) if (labels == c).any() else float("nan") for c in range(num_classes)]
    return float(correct.mean() * 100), per_class


def seen_warning(cache: Cache, train_split: str, scored_split: str, seen: int) -> str:
    """One line: `seen` images of `scored_split` are in `train_split`, so its score is on seen data."""
    total = cache.split(scored_split).num_images
    return (f"{seen} of the {total} images of {scored_split} are in the training split {train_split}: its top-1 "
            "is scored on images the side network trained on, not a held-out score.")
