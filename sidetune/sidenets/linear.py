"""Linear probe: the frozen final norm on the last stage, pool (CLS or mean), per-feature
standardisation (statistics of the training split; on by default), a linear layer.

With `blocks` n > 1 it reads DINOv2's linear-evaluation input (facebookresearch/dinov2,
eval/linear.py, `create_linear_input`): the last n blocks, each through the frozen final norm,
their CLS tokens concatenated, and with `pool both` the mean of the last block's patch tokens
after them (`pool mean`: each block's patch mean, concatenated)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sidetune.errors import SidetuneError
from sidetune.sidenets.base import FeatureLayout, SideNet, auto_pool


class LinearProbe(SideNet):
    name = "linear"
    summary = "linear probe on the pooled, standardised last stage (or DINOv2's last n blocks)"
    token_selections = ("all", "cls", "mean")
    default_lr = 0.3  # standardised features and a convex loss take a large step (benchmarks/defaults.py)
    default_epochs = 30
    default_grid = {"lr": [0.03, 0.1, 0.3], "weight_decay": [0.0, 1e-4, 1e-3]}
    option_help = {"blocks": "n: the last n blocks' features, each through the final norm, concatenated (DINOv2's "
                             "linear protocol; with --pool both, the last block's patch mean after their CLS tokens)"}

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "auto", standardize: bool = True,
                 blocks: int = 1):
        pooling = auto_pool(layout) if pool == "auto" else pool
        if blocks > 1 and not layout.uniform:
            raise SidetuneError(f"--blocks {blocks} concatenates blocks of one width through the final norm (a ViT's); "
                                "this cache's stages differ in shape. Use --blocks 1, or head2toe for every stage.")
        if blocks > layout.depth:
            raise SidetuneError(f"--blocks {blocks} asks for more blocks than the backbone has ({layout.depth}).")
        width = layout.width * (blocks + (1 if pooling == "both" else 0))  # both: the last block's patch mean too
        super().__init__(layout, num_configs, pool, standardize, feature_width=width)
        self.blocks = blocks

    def stages_needed(self) -> list[int]:
        return list(range(self.layout.depth - self.blocks + 1, self.layout.depth + 1))

    def pooled_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Shared by every configuration: (1, B, D · width factor), computed once."""
        stages = [x.float().unsqueeze(0) for x in self.stage_tokens(tokens)]
        if self.blocks == 1:
            return self.head_features(stages[-1])
        normed = [x if self.final_norm_weight is None else
                  F.layer_norm(x, (x.shape[-1],), self.final_norm_weight, self.final_norm_bias, self.final_norm_eps)
                  for x in stages]
        if self.pool == "both":
            return torch.cat([self.pool_tokens(x, "cls") for x in normed] + [self.pool_tokens(normed[-1], "mean")], -1)
        return torch.cat([self.pool_tokens(x) for x in normed], -1)
