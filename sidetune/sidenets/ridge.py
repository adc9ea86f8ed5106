"""Ridge regression on the pooled, standardised last-stage features, solved in closed form for
every stacked configuration's L2 strength λ (its weight decay) from one eigendecomposition, as
big_vision's few-shot linear evaluator does (big_vision/evaluators/fewshot_lsr.py):

    X: standardised features with a constant column of 100 (a bias almost free of the penalty)
    Y: 2 · one-hot − 1 (or one-hot minus the class frequencies, `targets="centred"`)
    n ≥ D + 1: XᵀX = Q diag(e) Qᵀ,  W(λ) = Q diag(1 / (e + λ)) Qᵀ XᵀY
    n < D + 1: XXᵀ = Q diag(e) Qᵀ,  W(λ) = XᵀQ diag(1 / (e + λ)) QᵀY

in float64. W's first D rows are the head, its last row times 100 the bias: the same head as the
linear probe's, so evaluation, `predict` and saved runs work unchanged. No epochs are run."""

from __future__ import annotations

from typing import Iterable

import torch

from sidetune.errors import SidetuneError
from sidetune.sidenets.base import FeatureLayout, SideNet

BIAS_COLUMN = 100.0
TARGETS = ("signed", "centred")


class RidgeProbe(SideNet):
    name = "ridge"
    summary = "ridge regression probe, every L2 strength solved from one eigendecomposition"
    option_help = {"targets": "signed (2 one-hot - 1) or centred one-hot regression targets"}
    token_selections = ("all", "cls", "mean")
    closed_form = True
    default_lr = 0.0  # unused: no gradient steps
    default_weight_decay = 1024.0  # big_vision's λ; best on real features (benchmarks/defaults.py)
    # λ from 1e-3 to 1e6 in steps of 4x (big_vision's single choice, 1024, among them): all from one eigh.
    default_grid = {"weight_decay": [4.0 ** k for k in range(-5, 11)]}

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "auto", standardize: bool = True,
                 targets: str = "signed"):
        super().__init__(layout, num_configs, pool, standardize)
        if targets not in TARGETS:
            raise SidetuneError(f"Unknown ridge targets '{targets}'. Choose one of: {', '.join(TARGETS)}.")
        self.targets = targets

    def stages_needed(self) -> list[int]:
        return [self.layout.depth]

    def pooled_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Shared by every configuration: (1, B, D), computed once."""
        return self.head_features(self.stage_tokens(tokens)[-1].float().unsqueeze(0))

    @torch.no_grad()
    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], penalties: torch.Tensor) -> None:
        """Set every configuration's head to the ridge solution for its penalty λ (penalties[k]),
        from the training split given as (tokens, labels) batches."""
        features, labels = [], []
        for tokens, batch_labels in batches:
            pooled = (self.pooled_features(tokens)[0] - self.feature_mean) / self.feature_scale
            features.append(pooled.double().cpu())
            labels.append(batch_labels.cpu())
        x = torch.cat(features)
        x = torch.cat([x, torch.full((len(x), 1), BIAS_COLUMN, dtype=torch.float64)], 1)
        onehot = torch.nn.functional.one_hot(torch.cat(labels), self.layout.num_classes).double()
        y = 2 * onehot - 1 if self.targets == "signed" else onehot - onehot.mean(0)
        n, width = x.shape
        if n >= width:
            eigenvalues, q = torch.linalg.eigh(x.T @ x)
            left, right = q, q.T @ (x.T @ y)
        else:
            eigenvalues, q = torch.linalg.eigh(x @ x.T)
            left, right = x.T @ q, q.T @ y
        for k, penalty in enumerate(penalties.tolist()):
            w = left @ (right / (eigenvalues + penalty)[:, None])
            self.head_weight[k].copy_(w[:-1].float())
            self.head_bias[k].copy_((BIAS_COLUMN * w[-1]).float())
