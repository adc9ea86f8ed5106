"""Head2Toe-style multi-layer probing (Evci et al., ICML 2022; google-research/head2toe): pooled
features from every stored stage, each L2-normalised, concatenated, standardised, then one
linear head, with a per-stage group-lasso penalty or a top-k selection of stages.

    f_s = pool(z_s) / ||pool(z_s)||    per stored stage s (CLS, mean of patch tokens, or both)
    x   = standardise([f_0, ..., f_N])
    loss = cross-entropy + group_lasso · Σ_s ||W_s||₂   (W_s: the head's rows reading stage s)

With `top_stages` = k > 0 only the k stages whose features separate the classes best on the
training split (the mean over their features of the between-class to within-class variance
ratio) feed the head; the others are masked out. Reads caches of every stage: the `cls` and
`mean` specs (one vector per stage per image) are enough. The original also taps inside blocks
(attention, MLP) and selects single features; the cache holds block outputs only."""

from __future__ import annotations

from typing import Iterable

import torch

from sidetune.errors import SidetuneError
from sidetune.sidenets.base import FeatureLayout, SideNet


class Head2Toe(SideNet):
    name = "head2toe"
    summary = "Head2Toe: pooled features of every stage, one head, group-lasso selection"
    option_help = {"group_lasso": "per-stage group-lasso strength",
                   "top_stages": "keep only the k stages that separate the classes best (0: all)"}
    option_minimum = {"top_stages": 0}
    token_selections = ("all", "cls", "mean")
    default_lr = 0.01  # Head2Toe's Adam learning rate
    default_grid = {"lr": [3e-3, 1e-2, 3e-2], "weight_decay": [1e-4, 1e-3]}

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "auto", standardize: bool = True,
                 group_lasso: float = 0.0, top_stages: int = 0):
        self.stage_widths = [layout.shape(stage)[1] * (2 if pool == "both" else 1) for stage in layout.backbone_stages]
        super().__init__(layout, num_configs, pool, standardize, feature_width=sum(self.stage_widths))
        if group_lasso < 0 or not 0 <= top_stages <= len(layout.backbone_stages):
            raise SidetuneError(f"head2toe: group_lasso must be at least 0 and top_stages between 0 and the "
                                f"{len(layout.backbone_stages)} stored stages (got {group_lasso} and {top_stages}).")
        self.group_lasso, self.top_stages = group_lasso, top_stages
        self.register_buffer("stage_mask", torch.ones(len(layout.backbone_stages)))

    def stages_needed(self) -> list[int]:
        return list(self.layout.backbone_stages)

    def stage_features(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's (B, D'_s) features: pooled and L2-normalised."""
        pooled = [self.pool_tokens(x.float().unsqueeze(0))[0] for x in self.stage_tokens(tokens)]
        return [x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) for x in pooled]

    def pooled_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Shared by every configuration: (1, B, sum of D'_s)."""
        return torch.cat(self.stage_features(tokens), -1).unsqueeze(0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # each stage's mask entry over its features, from views of the buffer: no host-to-device
        # copy inside a step (a CUDA graph cannot capture one)
        mask = torch.cat([self.stage_mask[s:s + 1].expand(width) for s, width in enumerate(self.stage_widths)])
        x = (self.pooled_features(tokens) - self.feature_mean) / self.feature_scale * mask
        return torch.matmul(x, self.head_weight) + self.head_bias[:, None, :]

    def penalty(self) -> torch.Tensor | None:
        if not self.group_lasso:
            return None
        by_stage = self.head_weight.split(self.stage_widths, dim=1)  # (K, D'_s, C) each
        return self.group_lasso * sum(group.flatten(1).norm(dim=-1) for group in by_stage)

    @torch.no_grad()
    def fit_standardizer(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The feature statistics, and with `top_stages` the stages kept (scored on the same pass)."""
        kept = list(batches)
        super().fit_standardizer(kept)
        if not self.top_stages:
            return
        features = torch.cat([self.pooled_features(tokens)[0].double() for tokens, _ in kept])  # (N, sum D'_s)
        labels = torch.cat([labels for _, labels in kept])
        overall = features.mean(0)
        between, within = torch.zeros_like(overall), torch.zeros_like(overall)
        for label in labels.unique():
            members = features[labels == label]
            between += len(members) * (members.mean(0) - overall) ** 2
            within += ((members - members.mean(0)) ** 2).sum(0)
        fisher = between / within.clamp_min(1e-12)
        scores = torch.stack([part.mean() for part in fisher.split(self.stage_widths)])  # per stage
        self.stage_mask.zero_()
        self.stage_mask[scores.topk(self.top_stages).indices] = 1.0
