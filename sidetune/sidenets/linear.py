"""Linear probe: the frozen final norm on the last stage, pool (CLS or mean), a linear layer."""

from __future__ import annotations

import torch

from sidetune.sidenets.base import SideNet


class LinearProbe(SideNet):
    name = "linear"
    token_selections = ("all", "cls", "mean")

    def stages_needed(self) -> list[int]:
        return [self.layout.depth]

    def represent(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, -1].unsqueeze(0).expand(self.num_configs, -1, -1, -1)
