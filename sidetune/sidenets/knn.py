"""Weighted k-nearest-neighbour classification, as DINO evaluates frozen features
(facebookresearch/dino, eval_knn.py; solo-learn the same): every image's last stage through the
frozen final norm, pooled and L2-normalised; a query's k most cosine-similar training images
vote for their labels with weight exp(similarity / T); the most voted class wins.

No training: `fit` keeps the training split's normalised features and labels (the memory bank,
saved with the run, so evaluate and predict need no cache). `neighbors` and `temperature` may
differ within a stack: a sweep over them computes each batch's similarities to the bank once,
keeps the top max(k) (the bank taken a chunk at a time, so the similarity matrix never has to
fit at once) and lets every configuration vote from its own first k."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from sidetune.sidenets.base import FeatureLayout, SideNet

BANK_CHUNK = 16384  # training images compared with a batch at a time


class KNNProbe(SideNet):
    name = "knn"
    summary = "DINO's weighted k-NN on the final-normed, pooled, L2-normalised last stage (no training)"
    option_help = {"neighbors": "k: the most similar training images that vote",
                   "temperature": "T: a neighbour's vote weighs exp(cosine similarity / T)"}
    option_minimum = {"temperature": 1e-6}
    token_selections = ("all", "cls", "mean")
    closed_form = True
    stacked_options = ("neighbors", "temperature")
    default_lr = 0.0  # unused: no gradient steps
    # DINO's k in {10, 20, 100, 200} at T = 0.07, and temperatures either side
    default_grid = {"neighbors": [10, 20, 100, 200], "temperature": [0.02, 0.07, 0.2]}

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "auto", neighbors: int = 20,
                 temperature: float = 0.07):
        super().__init__(layout, num_configs, pool, standardize=False)
        del self.head_weight, self.head_bias  # votes, not a linear head
        self.initialisers.clear()
        self.register_buffer("neighbors", torch.full((num_configs,), neighbors, dtype=torch.int64))
        self.register_buffer("temperature", torch.full((num_configs,), float(temperature)))
        self.config_buffers.update({"neighbors", "temperature"})
        width = layout.width * (2 if self.pool == "both" else 1)
        self.register_buffer("bank_features", torch.zeros(0, width))
        self.register_buffer("bank_labels", torch.zeros(0, dtype=torch.int64))

    def set_stacked_options(self, values: list[dict[str, object]]) -> None:
        self.neighbors.copy_(torch.tensor([int(v["neighbors"]) for v in values]))
        self.temperature.copy_(torch.tensor([float(v["temperature"]) for v in values]))

    def stages_needed(self) -> list[int]:
        return [self.layout.depth]

    def pooled_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised features, shared by every configuration."""
        return F.normalize(self.head_features(self.stage_tokens(tokens)[-1].float().unsqueeze(0))[0], dim=-1)

    @torch.no_grad()
    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], penalties: torch.Tensor) -> None:
        """Keep the training split's features and labels as the memory bank."""
        features, labels = zip(*((self.pooled_features(tokens), batch_labels) for tokens, batch_labels in batches))
        self.bank_features = torch.cat(features)
        self.bank_labels = torch.cat(labels).to(torch.int64)

    def nearest(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, k) cosine similarities of each query's k nearest bank images, most similar first,
        and their labels; the bank compared a chunk at a time."""
        best_similarity = queries.new_full((len(queries), 0), float("-inf"))
        best_label = torch.zeros(len(queries), 0, dtype=torch.int64, device=queries.device)
        for start in range(0, len(self.bank_features), BANK_CHUNK):
            chunk = self.bank_features[start:start + BANK_CHUNK]
            similarity = torch.cat([best_similarity, queries @ chunk.T], 1)
            labels = torch.cat([best_label, self.bank_labels[start:start + BANK_CHUNK].expand(len(queries), -1)], 1)
            best_similarity, order = similarity.topk(min(k, similarity.shape[1]), dim=1)
            best_label = labels.gather(1, order)
        return best_similarity, best_label

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(K, B, C) votes: each configuration's first k neighbours, weighted exp(similarity / T)."""
        queries = self.pooled_features(tokens)
        classes = self.layout.num_classes
        votes = queries.new_zeros(self.num_configs, len(queries), classes)
        if not len(self.bank_features):  # before `fit`
            return votes
        similarity, labels = self.nearest(queries, int(self.neighbors.max()))
        kept = torch.arange(similarity.shape[1], device=queries.device)[None] < self.neighbors[:, None]  # (K, k)
        weights = torch.exp(similarity[None] / self.temperature[:, None, None]) * kept[:, None, :]
        return votes.scatter_add_(2, labels[None].expand(self.num_configs, -1, -1), weights)

    @torch.no_grad()
    def load_config_state(self, state: dict[str, torch.Tensor]) -> None:
        """A saved state, its memory bank of whatever size it was."""
        self.bank_features = torch.empty_like(state["bank_features"])
        self.bank_labels = torch.empty_like(state["bank_labels"])
        super().load_config_state(state)
