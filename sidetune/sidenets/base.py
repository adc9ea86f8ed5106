"""What every side network shares: stacked parameters with a leading config axis K, seeded
per-config initialisation, the frozen final norm, pooling and the classifier head.

A side network sees a batch of cached tokens (B, S, T, D) — the stages it declared, in
increasing order, in their stored 16-bit type (each network casts what it reads) — and returns
logits (K, B, C): one set per stacked configuration."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sidetune.cache.layout import StageShape, unpack_stages
from sidetune.errors import SidetuneError

# cuDNN's attention backward returned NaN and then faulted (illegal memory access) on r-wide heads
# on an H100 (torch 2.11, cuDNN 9, head dim 16); flash, memory-efficient and math attention are
# exact there, so cuDNN is left out.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
PLAIN_NORM_EPS = 1e-6
TEMPORAL_KERNEL = 3  # frames a temporal convolution spans
TEMPORAL_RANK = 4  # the rank of a temporal head's mixing across frames
STAGE_EMBEDDING_SEED = 1_000_000  # + the stage index: the fixed maps of stages onto one width
POOLS = ("cls", "mean", "both")  # both: CLS and the mean of the patch tokens, concatenated (2D features)


def auto_pool(layout: "FeatureLayout") -> str:
    """What `pool auto` is on a cache of `layout`: the CLS token where the backbone has one (or
    the cache keeps a single token per stage), else the mean of the patch tokens (a CNN)."""
    return "cls" if layout.num_prefix_tokens > 0 or layout.token_selection != "all" else "mean"


@dataclass(frozen=True)
class FeatureLayout:
    """What a side network needs to know about the cached features (all from the manifest)."""

    depth: int
    width: int
    num_tokens: int
    num_prefix_tokens: int
    num_classes: int
    stages: tuple[int, ...]  # the stages the cache stores
    token_selection: str
    # each stored stage's shape, in `stages` order; empty: all (num_tokens, width), as a ViT's
    stage_shapes: tuple[StageShape, ...] = ()
    # the backbone's first stage: 0 for a ViT (the tokens entering block 1), 1 for a model read
    # through forward_intermediates (sidetune/backbones.py)
    first_stage: int = 0
    # frames per clip in a video cache (1: images): each stage's tokens are its frames' tokens,
    # frame after frame, so `num_tokens` and the stage shapes count every frame's
    frames: int = 1

    @property
    def frame_tokens(self) -> int:
        """The tokens of one frame of the last stage (of one image when `frames` is 1)."""
        return self.num_tokens // self.frames

    def shape(self, stage: int) -> tuple[int, int]:
        """(tokens, width) of a stored stage."""
        if not self.stage_shapes:
            return self.num_tokens, self.width
        shape = self.stage_shape(stage)
        return shape.num_tokens, shape.width

    def stage_shape(self, stage: int) -> StageShape:
        """The full shape (grid, prefix tokens) of a stored stage of a cache that records them."""
        return self.stage_shapes[self.stages.index(stage)]

    @property
    def uniform(self) -> bool:
        return len({self.shape(stage) for stage in self.stages}) <= 1

    @property
    def sums(self) -> tuple[StageShape, ...]:
        """The stored sums of stages (a summed cache), in group order; empty for other caches."""
        return tuple(shape for shape in self.stage_shapes if shape.summed)

    @property
    def backbone_stages(self) -> tuple[int, ...]:
        """The stored backbone stages, a summed cache's sums left out."""
        return tuple(stage for stage in self.stages if stage >= 0)


def param_generator(seed: int, name: str) -> torch.Generator:
    """One generator per (config seed, parameter name): a parameter's initial value never
    depends on which other configs or parameters exist."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))


def uniform_fan_in(fan_in: int) -> Callable[[torch.Tensor, torch.Generator], None]:
    """nn.Linear's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda tensor, generator: tensor.uniform_(-bound, bound, generator=generator)


def small_normal(tensor: torch.Tensor, generator: torch.Generator, std: float = 0.02) -> None:
    """Normal(0, 0.02) cut at two standard deviations: the truncated-normal initialisation of
    ViT-style code (V-JEPA's queries, LST's side blocks)."""
    tensor.normal_(0.0, std, generator=generator).clamp_(-2 * std, 2 * std)


@dataclass(frozen=True)
class Parts:
    """The initialiser of a parameter that stacks parts (one per module, say): each part is
    drawn as a parameter of its own would be, from the generator of its own name, so stacking
    changes no initial value. `parts`: (index into one configuration's tensor, name, init)."""

    parts: tuple[tuple[tuple, str, Callable[[torch.Tensor, torch.Generator], None]], ...]

    def fill(self, tensor: torch.Tensor, seed: int) -> None:
        for index, name, init in self.parts:
            value = torch.empty(tensor[index].shape)  # contiguous: drawn in the order a parameter's are
            init(value, param_generator(seed, name))
            tensor[index].copy_(value)


def zeros(tensor: torch.Tensor, generator: torch.Generator) -> None:
    tensor.zero_()


def ones(tensor: torch.Tensor, generator: torch.Generator) -> None:
    tensor.fill_(1.0)


class SideNet(nn.Module):
    """Base class. Subclasses call `self.stacked(name, shape, init, decay)` to create
    parameters and implement `stages_needed` and `represent`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: what the method is (`sidetune methods`)
    token_selections: ClassVar[tuple[str, ...]] = ("all",)
    # Training defaults where none is given (benchmarks/defaults.py measures them; docs/methods.md)
    default_lr: ClassVar[float] = 1e-3  # the side-tuning papers' AdamW default
    default_epochs: ClassVar[int] = 100
    default_weight_decay: ClassVar[float] = 1e-4
    closed_form: ClassVar[bool] = False  # True: `fit` sets the parameters (no epochs)
    # options whose values may differ within a stack (they shape nothing; `set_stacked_options`
    # sets each configuration's): k-NN's neighbours and temperature, all scored from one pass
    stacked_options: ClassVar[tuple[str, ...]] = ()
    # True: on a video cache, the frames' pooled features are mixed across frames (a low-rank
    # residual MLP over the frame axis, zero-initialised, as LoSA's temporal mixer) before they
    # are averaged: the step that lets a network that mixes every frame's tokens alike (LAST),
    # blind to their order, tell it
    temporal_head: ClassVar[bool] = False
    reads_sums: ClassVar[bool] = False  # True: reads a summed cache's sums (MIST)
    # True: without a backbone final norm, a plain LayerNorm stands in for it (`set_final_norm`)
    norm_without_final_norm: ClassVar[bool] = False
    # What `sidetune sweep` tries when given no values (docs/methods.md says where each comes from).
    default_grid: ClassVar[dict[str, list]] = {"lr": [3e-4, 1e-3, 3e-3], "weight_decay": [1e-4, 1e-3]}
    # One line of help per option of __init__ (merged over the class hierarchy): the command line's
    # --flags are generated from these (cli/method_options.py). Integer options take at least 1
    # and float ones at least 0 unless `option_minimum` says otherwise.
    option_help: ClassVar[dict[str, str]] = {
        "pool": "auto (cls where the backbone has a class token, else mean), cls, mean (of the patch tokens) or both "
                "(concatenated)",
        "standardize": "standardise pooled features with training-split statistics"}
    option_minimum: ClassVar[dict[str, float]] = {}

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "auto", standardize: bool = False,
                 feature_width: int | None = None):
        super().__init__()
        pool = auto_pool(layout) if pool == "auto" else pool
        if pool not in POOLS:
            raise SidetuneError(f"Unknown pooling '{pool}'. Choose one of: {', '.join(POOLS)}.")
        if pool == "both" and layout.token_selection != "all":
            raise SidetuneError(f"pool 'both' needs the CLS and the patch tokens; this cache keeps only "
                                f"'{layout.token_selection}'. Use --pool cls or mean, or a spec with every token.")
        self.layout = layout
        self.num_configs = num_configs
        self.fused = False  # True: the network's fused Triton kernels, where it has any (set by the engine)
        self.pool = pool
        self.standardize = standardize
        self.initialisers: dict[str, Callable] = {}
        self.no_decay: set[str] = set()
        self.config_buffers: set[str] = set()  # buffers with a leading config axis, saved per configuration
        # the head's input: the backbone's width (twice that for pool both), or the subclass's own
        d, c = feature_width or layout.width * (2 if pool == "both" else 1), layout.num_classes
        # Per-feature statistics of the frozen pooled features on the training split, applied
        # before the classifier when `standardize` is on (identity otherwise).
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_scale", torch.ones(d))
        self.stacked("head.weight", (d, c), uniform_fan_in(d))
        self.stacked("head.bias", (c,), uniform_fan_in(d), decay=False)
        if self.temporal_head and layout.frames > 1:
            frames, rank = layout.frames, min(TEMPORAL_RANK, layout.frames)
            self.stacked("temporal.w1", (frames, rank), uniform_fan_in(frames))
            self.stacked("temporal.b1", (rank,), uniform_fan_in(frames), decay=False)
            self.stacked("temporal.w2", (rank, frames), zeros)
            self.stacked("temporal.b2", (frames,), zeros, decay=False)

    def set_stacked_options(self, values: list[dict[str, object]]) -> None:
        """Each configuration's values of `stacked_options`, in stack order (the network was built
        with the first's)."""
        if self.stacked_options:
            raise NotImplementedError(f"{type(self).__name__} declares stacked_options but does not set them")

    def stacked(self, name: str, shape: tuple[int, ...], init: Callable | Parts, decay: bool = True) -> nn.Parameter:
        key = name.replace(".", "_")  # module attribute names cannot contain dots
        parameter = nn.Parameter(torch.empty(self.num_configs, *shape))
        self.register_parameter(key, parameter)
        self.initialisers[key] = init
        if not decay:
            self.no_decay.add(key)
        return parameter

    def reset_parameters(self, seeds: list[int]) -> None:
        if len(seeds) != self.num_configs:
            raise ValueError(f"{len(seeds)} seeds for {self.num_configs} configs")
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                init = self.initialisers[name]
                for k, seed in enumerate(seeds):
                    if isinstance(init, Parts):
                        init.fill(parameter[k], seed)
                    else:
                        init(parameter[k], param_generator(seed, name))

    def set_final_norm(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> None:
        """The backbone's frozen final LayerNorm, read from the cache. Where the backbone has
        none (ConvNeXt, EfficientNet, ResNet), networks that read tokens through it
        (`norm_without_final_norm`) get a LayerNorm without affine parameters; the others none."""
        if weight is None and self.norm_without_final_norm:
            weight, bias, eps = torch.ones(self.layout.width), torch.zeros(self.layout.width), PLAIN_NORM_EPS
        self.register_buffer("final_norm_weight", weight)
        self.register_buffer("final_norm_bias", bias)
        self.final_norm_eps = eps

    def stage_tokens(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """A batch of the stages `stages_needed` names -> their (B, T_s, D_s) tokens, in order."""
        return unpack_stages(tokens, [self.layout.shape(stage) for stage in self.stages_needed()])

    def build_stage_embeddings(self) -> None:
        """For side networks that add stages together (LAST, LoSA) on a cache whose stages differ
        in shape: a fixed matrix per stage that maps its width onto the last stage's, with
        orthonormal columns (an exact isometry where the stage is narrower), drawn from a seeded
        generator and shared by every configuration (`uniform_stages` applies them)."""
        if self.layout.uniform:
            return
        shapes = [self.layout.stage_shape(stage) for stage in self.stages_needed()]
        if len({shape.num_prefix_tokens for shape in shapes}) > 1:
            raise SidetuneError(f"Method {self.name} needs one number of prefix tokens in every stage it reads; this "
                                f"cache's stages have {sorted({s.num_prefix_tokens for s in shapes})}.")
        target = self.layout.width
        for shape in shapes:
            generator = torch.Generator().manual_seed(STAGE_EMBEDDING_SEED + shape.stage)
            gaussian = torch.randn(max(shape.width, target), min(shape.width, target), generator=generator)
            q = torch.linalg.qr(gaussian).Q  # orthonormal columns
            matrix = q.T if shape.width < target else q  # (D_s, D)
            self.register_buffer(f"stage_embedding_{shape.stage}", matrix if shape.width != target else None)

    def uniform_stages(self, tokens: torch.Tensor) -> torch.Tensor:
        """The batch as (B, S, T, D) tokens of the last needed stage's grid and width: as it is
        when the stages share a shape; otherwise each stage's grid average-pooled (or, when
        smaller, bilinearly resized) to the last stage's grid, its prefix tokens kept, and its
        channels mapped by its stage embedding."""
        if tokens.dim() == 4:
            return tokens
        stages = self.stages_needed()
        last = self.layout.stage_shape(stages[-1])
        frames = self.layout.frames
        outputs = []
        for stage, x in zip(stages, self.stage_tokens(tokens)):
            shape = self.layout.stage_shape(stage)
            per_frame = x.float().reshape(-1, x.shape[1] // frames, x.shape[2])  # a clip's frames resampled one by one
            x = resample_grid(per_frame, shape.num_prefix_tokens, shape.grid, last.grid)
            x = x.reshape(-1, x.shape[1] * frames, x.shape[2])
            matrix = getattr(self, f"stage_embedding_{stage}")
            outputs.append(x if matrix is None else x @ matrix)
        return torch.stack(outputs, 1)

    # --- to implement: stages_needed, and represent or pooled_features --------------------
    def stages_needed(self) -> list[int]:
        raise NotImplementedError

    def represent(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S, T, D) cached tokens -> (K, B, T, D) float32 representation before the final norm."""
        raise NotImplementedError

    def pooled_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S, T, D) cached tokens -> (K, B, D) (or (1, B, D) when shared by every config):
        the representation through the frozen final norm and pooling."""
        return self.head_features(self.represent(tokens))

    # --- shared --------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = (self.pooled_features(tokens) - self.feature_mean) / self.feature_scale
        return torch.matmul(pooled, self.head_weight) + self.head_bias[:, None, :]

    def penalty(self) -> torch.Tensor | None:
        """(K,) terms added to each configuration's loss (a structured penalty), or None."""
        return None

    def head_features(self, y: torch.Tensor) -> torch.Tensor:
        """(K, B, T, D) representation -> (K, B, D): the frozen final norm, then pooling (a
        clip's frames pooled, through the temporal step where the network has one, averaged)."""
        if self.final_norm_weight is not None:
            y = F.layer_norm(y, (y.shape[-1],), self.final_norm_weight, self.final_norm_bias, self.final_norm_eps)
        if self.temporal_head and self.layout.frames > 1:
            frames = self.frame_features(y)  # (K, B, F, D)
            mixed = F.gelu(torch.einsum("kbfd,kfr->kbdr", frames, self.temporal_w1) + self.temporal_b1[:, None, None])
            mixed = torch.einsum("kbdr,krf->kbfd", mixed, self.temporal_w2) + self.temporal_b2[:, None, :, None]
            return (frames + mixed).mean(2)
        return self.pool_tokens(y)

    @torch.no_grad()
    def fit_standardizer(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set the feature statistics from the training split, given as (tokens, labels) batches:
        the pooled features as the network starts (for LAST and LoSA, with their zero-initialised
        outputs, the frozen features); a no-op unless `standardize` is on."""
        if not self.standardize:
            return
        total = torch.zeros(len(self.feature_mean), dtype=torch.float64, device=self.feature_mean.device)
        total_sq, count = torch.zeros_like(total), 0
        for tokens, _ in batches:
            pooled = self.pooled_features(tokens)[0].double()
            total += pooled.sum(0)
            total_sq += (pooled * pooled).sum(0)
            count += len(pooled)
        mean = total / count
        variance = (total_sq / count - mean * mean).clamp_min(0)
        self.feature_mean.copy_(mean.float())
        self.feature_scale.copy_(variance.sqrt().clamp_min(1e-6).float())

    def config_state(self, index: int) -> dict[str, torch.Tensor]:
        """The trained state of one configuration: its slice of every parameter, plus the
        frozen final norm and the feature statistics; `load_config_state` restores it."""
        state = {name: p[index] for name, p in self.named_parameters()}
        state.update((name, buffer[index] if name in self.config_buffers else buffer)
                     for name, buffer in self.named_buffers() if buffer is not None)
        return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}

    def upgrade_state(self, state: dict[str, torch.Tensor], stacked: bool) -> dict[str, torch.Tensor]:
        """A state by parameter name as an earlier version of this network saved it, in today's
        names and shapes (`stacked`: with the leading config axis). The identity unless a
        network changed how it stores its parameters."""
        return state

    @torch.no_grad()
    def load_config_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a `config_state` into every configuration of this network."""
        state = self.upgrade_state(state, stacked=False)
        expected = {name for name, _ in self.named_parameters()} | {n for n, b in self.named_buffers() if b is not None}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise SidetuneError(f"Side-network state does not match the {self.name} network built from the run's "
                                f"config (missing {missing}, unexpected {unexpected}); was the run's model file replaced?")
        for name, parameter in self.named_parameters():
            parameter.copy_(state[name].unsqueeze(0).expand_as(parameter))
        for name, buffer in self.named_buffers():
            if buffer is not None:
                buffer.copy_(state[name].expand_as(buffer) if name in self.config_buffers else state[name])

    def pool_tokens(self, y: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """(K, B, T, D) -> (K, B, D) by the network's pooling (or `pool`); a clip's frames pooled
        one by one, then averaged (`frame_features` keeps them apart)."""
        return self.frame_features(y, pool).mean(2)

    def frame_features(self, y: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """(K, B, F·T, D) -> (K, B, F, D): each frame's tokens pooled (F = 1 for images)."""
        k, b, tokens, width = y.shape
        frames = self.layout.frames
        return self._pool(y.reshape(k, b * frames, tokens // frames, width), pool).reshape(k, b, frames, -1)

    def _pool(self, y: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        pool = pool or self.pool
        if self.layout.token_selection != "all" or y.shape[2] == 1:
            return y[:, :, 0]
        if pool in ("cls", "both") and self.layout.num_prefix_tokens < 1:
            raise SidetuneError(f"pool '{pool}' needs a CLS token, but the backbone has none; use --pool mean.")
        if pool == "cls":
            return y[:, :, 0]
        mean = y[:, :, self.layout.num_prefix_tokens:].mean(dim=2)
        return mean if pool == "mean" else torch.cat([y[:, :, 0], mean], -1)

    def decay_mask(self, name: str) -> bool:
        return name not in self.no_decay

    def trainable_parameters_per_config(self) -> int:
        return sum(p[0].numel() for p in self.parameters())


def resample_grid(x: torch.Tensor, prefix: int, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """(B, P + h*w, D) tokens on an h x w grid -> (B, P + H*W, D) on the target grid: average
    pooling where the grid is at least as large in both directions, bilinear resizing otherwise."""
    if tuple(grid) == tuple(target):
        return x
    b, _, d = x.shape
    patches = x[:, prefix:].transpose(1, 2).reshape(b, d, *grid)
    if grid[0] >= target[0] and grid[1] >= target[1]:
        patches = F.adaptive_avg_pool2d(patches, target)
    else:
        patches = F.interpolate(patches, size=tuple(target), mode="bilinear", align_corners=False)
    return torch.cat([x[:, :prefix], patches.flatten(2).transpose(1, 2)], dim=1)


def temporal_convolution(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The temporal step's residual: GELU of a depthwise convolution over frames. x (K, B, F, D),
    per-configuration weights (K, D, k) (k odd), frames zero-padded at both ends:
    out_f = GELU(sum_j w_j * x_(f + j - k // 2)). (Without the GELU, averaging the frames
    afterwards would undo the convolution but at the clip's two ends.)"""
    k = weight.shape[-1]
    padded = F.pad(x, (0, 0, k // 2, k // 2))
    frames = x.shape[2]
    return F.gelu(sum(padded[:, :, j:j + frames] * weight[:, None, None, :, j] for j in range(k)))


def layer_norm_stacked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last axis with per-config affine parameters (K, D); x is (K, ..., D)."""
    x = F.layer_norm(x, (x.shape[-1],), eps=eps)
    shape = (weight.shape[0],) + (1,) * (x.dim() - 2) + (weight.shape[1],)
    return x * weight.view(shape) + bias.view(shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention (batch, heads, tokens, head width), without cuDNN's kernels."""
    with sdpa_kernel(ATTENTION_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v)


def shared_product(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), shared by every configuration, times per-configuration (K, D, n) weights:
    one (B*T, D) x (D, K*n) product, returned as (K, B, T, n)."""
    b, t, d = x.shape
    k, _, n = weights.shape
    out = x.reshape(b * t, d) @ weights.permute(1, 0, 2).reshape(d, k * n)
    return out.view(b, t, k, n).permute(2, 0, 1, 3)


def per_config(a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(K, B, T, j) times per-configuration (K, j, n) weights: (K, B, T, n), one batched product."""
    k, b, t, j = a.shape
    return torch.bmm(a.reshape(k, b * t, j), weights).view(k, b, t, -1)
