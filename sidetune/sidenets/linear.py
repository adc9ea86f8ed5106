"""Linear probe: the frozen final norm on the last stage, pool (CLS or mean), per-feature
standardisation (statistics of the training split; on by default), a linear layer."""

from __future__ import annotations

import torch

from sidetune.sidenets.base import FeatureLayout, SideNet


class LinearProbe(SideNet):
    name = "linear"
    summary = "linear probe on the pooled, standardised last stage"
    token_selections = ("all", "cls", "mean")
    default_lr = 0.1  # standardised features and a convex loss take a large step
    default_grid = {"lr": [0.03, 0.1, 0.3], "weight_decay": [0.0, 1e-4, 1e-3]}

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "auto", standardize: bool = True):
        super().__init__(layout, num_configs, pool, standardize)

    def stages_needed(self) -> list[int]:
        return [self.layout.depth]

    def pooled_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Shared by every configuration: (1, B, D), computed once."""
        return self.head_features(self.stage_tokens(tokens)[-1].float().unsqueeze(0))
