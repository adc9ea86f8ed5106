"""Frozen backbones: name aliases, loading (hub, local folders, weight files), preprocessing,
and the per-stage forward pass that stage one stores.

Stage numbering follows the cache contract. For a timm ViT, run block by block, stage 0 is the
token sequence entering block 1 (patch embedding + position embedding + prefix tokens) and
stage i is the output of block i. Every other timm model goes through one forward_intermediates
pass: stage i is its i-th intermediate as tokens, and there is no stage 0.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from sidetune.cache.layout import StageShape
from sidetune.errors import SidetuneError

ALIASES: dict[str, str] = {
    "vit_b16": "vit_base_patch16_224.orig_in21k",  # the VTAB-1k backbone
    "vit_l16": "vit_large_patch16_224.orig_in21k",
    "vit_h14": "vit_huge_patch14_224.orig_in21k",
    "vit_g14": "vit_giant_patch14_dinov2.lvd142m",
    "vit_s16": "vit_small_patch16_224.augreg_in21k",
    "vit_ti16": "vit_tiny_patch16_224.augreg_in21k",
}

LOCAL_DIR_PREFIX = "local-dir:"
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class Backbone:
    """A frozen timm model and what the cache manifest records about it.

    Two ways through it (`path`): "vit" for timm VisionTransformers, stage 0 (the tokens
    entering block 1) to stage `depth` (block `depth`'s output), computed block by block; and
    "intermediates" for every other model with timm's `forward_intermediates` (Swin, ConvNeXt,
    EfficientNet, ResNet, EVA, BEiT, ...): stage i is its i-th intermediate (i = 1..n), plus a
    last stage holding the model's final features where a head convolution changes their width
    (EfficientNet's conv_head: what its classifier reads)."""

    model: nn.Module
    alias: str | None
    timm_name: str
    weights_source: str
    weights_sha256: str
    stages: tuple[StageShape, ...]
    path: str = "vit"
    notes: tuple[str, ...] = ()  # how its weights were read (a wrapper unwrapped, a classifier left out)

    @property
    def depth(self) -> int:
        return self.stages[-1].stage

    @property
    def stage_indices(self) -> list[int]:
        return [shape.stage for shape in self.stages]

    @property
    def width(self) -> int:
        return self.stages[-1].width

    @property
    def num_prefix_tokens(self) -> int:
        return self.stages[-1].num_prefix_tokens

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self.stages[-1].grid

    @property
    def num_tokens(self) -> int:
        return self.stages[-1].num_tokens

    def shape_of(self, stage: int) -> StageShape:
        return self.stages[self.stage_indices.index(stage)]

    def final_norm(self) -> nn.LayerNorm | None:
        """The backbone's final LayerNorm over the last stage's tokens (applied by stage two),
        or None if it has none."""
        norm = getattr(self.model, "norm", None)
        return norm if isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (self.width,) else None

    def forward(self, images: torch.Tensor, stages: Sequence[int]) -> Iterator[torch.Tensor]:
        """The (B, T, D) tokens of the requested stages, in increasing stage order (call under
        torch.inference_mode(); the final norm is left to stage two)."""
        if self.path == "vit":
            yield from forward_stages(self.model, images, stages)
            return
        outputs = dict(zip(self.stage_indices, _intermediate_tokens(self.model, images)))
        for stage in sorted(set(stages)):
            yield outputs[stage]

    def describe(self) -> dict:
        norm = self.final_norm()
        return {
            "alias": self.alias,
            "timm_name": self.timm_name,
            "architecture": type(self.model).__name__,
            "path": self.path,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "width": self.width,
            "depth": self.depth,
            "num_prefix_tokens": self.num_prefix_tokens,
            "patch_grid": list(self.patch_grid),
            "num_tokens": self.num_tokens,
            "stages": [shape.describe() for shape in self.stages],
            "final_norm": None if norm is None else {"type": "layernorm", "eps": float(norm.eps)},
        }


def _is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _vit_stages(model: nn.Module) -> tuple[StageShape, ...]:
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    prefix = int(model.num_prefix_tokens)
    return tuple(StageShape(i, prefix + grid[0] * grid[1], int(model.embed_dim), grid, prefix)
                 for i in range(len(model.blocks) + 1))


def _returns_tokens(model: nn.Module) -> bool:
    """Whether the model's intermediates are token sequences with prefix tokens (EVA, BEiT, ...)
    rather than feature maps (CNNs, Swin)."""
    return "return_prefix_tokens" in inspect.signature(model.forward_intermediates).parameters


def _intermediate_tokens(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """One pass of `forward_intermediates`: every intermediate as (B, T, D) tokens (prefix
    tokens first), then the final features when a head convolution changed their width."""
    token_layout = _returns_tokens(model)
    if token_layout:
        final, intermediates = model.forward_intermediates(images, output_fmt="NLC", return_prefix_tokens=True)
    else:
        final, intermediates = model.forward_intermediates(images, output_fmt="NCHW")
    outputs = [_as_tokens(x) for x in intermediates]
    last = intermediates[-1]
    if not token_layout and final.dim() == 4 and final.shape[2:] == last.shape[2:] and final.shape[1] != last.shape[1]:
        outputs.append(_as_tokens(final))
    return outputs


def _as_tokens(output) -> torch.Tensor:
    if isinstance(output, tuple):  # (patches (B, HW, D), prefix (B, P, D))
        patches, prefix = output
        return torch.cat([prefix, patches], dim=1) if prefix is not None else patches
    if output.dim() == 4:  # NCHW
        return output.flatten(2).transpose(1, 2)
    return output


def _intermediate_stages(model: nn.Module) -> tuple[StageShape, ...]:
    """The stage shapes of a `forward_intermediates` model, from one pass over a blank image."""
    size = tuple(int(s) for s in model.pretrained_cfg.get("input_size", (3, 224, 224)))
    with torch.inference_mode():
        outputs = _intermediate_tokens(model, torch.zeros(1, *size))
    token_layout = _returns_tokens(model)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0) if token_layout else 0
    stages = []
    for index, tokens in enumerate(outputs, start=1):
        grid = _grid(model, tokens.shape[1] - prefix, size, token_layout)
        stages.append(StageShape(index, int(tokens.shape[1]), int(tokens.shape[2]), grid, prefix))
    return tuple(stages)


def _grid(model: nn.Module, spatial: int, size: tuple[int, int, int], token_layout: bool) -> tuple[int, int]:
    """The (H, W) grid of `spatial` positions: the patch grid of a token model, else the
    factorisation matching the input's aspect ratio."""
    patch_embed = getattr(model, "patch_embed", None)
    if token_layout and patch_embed is not None and hasattr(patch_embed, "grid_size"):
        grid = tuple(int(g) for g in patch_embed.grid_size)
        if grid[0] * grid[1] == spatial:
            return grid
    height, width = size[1], size[2]
    scale = math.sqrt(height * width / spatial)
    return round(height / scale), round(width / scale)


def resolve_model_name(name: str) -> tuple[str | None, str]:
    """Map a user's `--model` to (alias or None, timm model name), or explain the choices."""
    if name in ALIASES:
        return name, ALIASES[name]
    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not (folder / "config.json").is_file():
            raise SidetuneError(
                f"Model folder {folder} has no config.json. A `local-dir:` model is a folder written "
                "by timm's save_for_hf (config.json plus model.safetensors); point --model at one."
            )
        return None, f"{LOCAL_DIR_PREFIX}{folder.resolve()}"
    import timm

    base = name.split(".", 1)[0]
    if timm.is_model(base):
        return None, name
    known = timm.list_models()
    close = difflib.get_close_matches(name, list(ALIASES) + known, n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise SidetuneError(
        f"Unknown model '{name}'. Use an alias ({', '.join(ALIASES)}), any timm model name "
        f"(e.g. vit_base_patch16_224.augreg_in21k), or local-dir:/path/to/folder.{hint}"
    )


def load_backbone(name: str, weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """Create a frozen, eval-mode timm VisionTransformer without its classifier head.

    `weights` (a .safetensors, torch .pth/.bin or original .npz file) overrides pretrained
    weights; `pretrained=False` gives a random initialisation seeded with RANDOM_INIT_SEED so
    that the same command always builds the same backbone.
    """
    import timm

    alias, timm_name = resolve_model_name(name)
    notes: list[str] = []
    if weights is not None:
        model = _create(timm_name, pretrained=False)
        weights_path = Path(weights).expanduser().resolve()
        notes = _load_weight_file(model, weights_path)
        source = f"file:{weights_path}"
    elif timm_name.startswith(LOCAL_DIR_PREFIX):
        model = _create(timm_name, pretrained=True)
        source = timm_name
    elif pretrained:
        try:
            model = _create(timm_name, pretrained=True)
        except SidetuneError:
            raise
        except Exception as error:  # hub unreachable, missing files, auth ...
            raise SidetuneError(
                f"Could not fetch pretrained weights for {timm_name} ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no detail'}). Without access to the "
                "Hugging Face hub, pass the weights yourself: --weights FILE (.safetensors, .pth or "
                "the original .npz), or --model local-dir:/folder (timm's save_for_hf layout); "
                "--no-pretrained gives random weights for testing."
            ) from error
        source = f"timm:{model.pretrained_cfg.get('hf_hub_id') or timm_name}"
    else:
        torch.manual_seed(RANDOM_INIT_SEED)
        model = _create(timm_name, pretrained=False)
        source = f"random(seed={RANDOM_INIT_SEED})"

    model.eval().requires_grad_(False)
    if _is_vit(model):
        return Backbone(model, alias, timm_name, source, state_dict_sha256(model), _vit_stages(model), "vit", tuple(notes))
    if not hasattr(model, "forward_intermediates"):
        raise SidetuneError(
            f"Model {timm_name} is a {type(model).__name__}, which has no forward_intermediates in timm "
            f"{timm.__version__}: sidetune reads per-stage outputs through it. Choose a model that has it "
            "(VisionTransformer, EVA, BEiT, Swin, ConvNeXt, EfficientNet, ResNet, MobileNet, ...)."
        )
    del timm  # imported lazily so that stage two never needs it
    return Backbone(model, alias, timm_name, source, state_dict_sha256(model), _intermediate_stages(model),
                    "intermediates", tuple(notes))


def load_recorded_backbone(record: dict, weights: str | Path | None = None) -> Backbone:
    """The backbone a cache manifest records (its `backbone` section), loaded the way it was
    loaded then, and checked against the recorded weight hash. `weights` points at the
    weights file when it has moved (or supplies hub weights offline)."""
    source, timm_name = record["weights_source"], record["timm_name"]
    if weights is not None:
        backbone = load_backbone(timm_name, weights=weights)
    elif source.startswith("file:"):
        path = Path(source[len("file:"):])
        if not path.is_file():
            raise SidetuneError(f"The cache was built with the weights file {path}, which is not there any more. "
                                "Pass its new location with --weights.")
        backbone = load_backbone(timm_name, weights=path)
    elif source.startswith("random("):
        backbone = load_backbone(timm_name, pretrained=False)
    else:  # timm:<hub id> or local-dir:<folder>
        backbone = load_backbone(timm_name, pretrained=True)
    if backbone.weights_sha256 != record["weights_sha256"]:
        raise SidetuneError(
            f"The weights loaded for {timm_name} ({backbone.weights_source}, sha256 {backbone.weights_sha256[:12]}) are "
            f"not the ones the cache was built with ({source}, sha256 {record['weights_sha256'][:12]}). Pass the "
            "original weights with --weights."
        )
    return backbone


def _create(timm_name: str, pretrained: bool) -> nn.Module:
    import timm

    try:
        return timm.create_model(timm_name, pretrained=pretrained, num_classes=0)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise SidetuneError(f"timm does not know the model {timm_name}: {error}.") from error
        raise


def _load_weight_file(model: nn.Module, path: Path) -> list[str]:
    """Load a weights file into `model` (built without a classifier); returns notes on what was
    unwrapped or left out."""
    if not path.is_file():
        raise SidetuneError(f"Weights file {path} does not exist. Pass --weights an existing file.")
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy"):
        try:
            model.load_pretrained(str(path))
        except Exception as error:
            raise SidetuneError(
                f"Could not load the original-format weights {path} into {type(model).__name__}: "
                f"{error}. The .npz must come from the same architecture (big_vision/jax ViT layout)."
            ) from error
        return []
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise SidetuneError(
            f"Could not read weights file {path} ({type(error).__name__}: {error}). Use a "
            ".safetensors file, a torch state dict (.pth/.pt/.bin) or the original .npz."
        ) from error
    notes = []
    state = unwrapped_state_dict(state, path, notes)
    expected = model.state_dict()
    dropped = sorted(key for key in state if key not in expected and key.startswith(classifier_prefixes(model)))
    if dropped:
        notes.append(f"--weights: left out the checkpoint's classifier, which the frozen backbone does not use "
                     f"({', '.join(dropped[:4])}{', ...' if len(dropped) > 4 else ''})")
        state = {key: value for key, value in state.items() if key not in dropped}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshapen = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or misshapen:
        raise SidetuneError(
            f"Weights file {path} does not fit {type(model).__name__}: missing {len(missing)} keys "
            f"(e.g. {missing[:3]}), unexpected {len(unexpected)} (e.g. {unexpected[:3]}), wrong shape "
            f"{len(misshapen)} (e.g. {misshapen[:3]}). Pass the --model these weights were trained as."
        )
    model.load_state_dict(state)
    return notes


CHECKPOINT_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")
KEY_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def unwrapped_state_dict(checkpoint: object, path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint as training code saves it: nested under `state_dict`,
    `model`, `state_dict_ema` ... (the first of those that holds tensors), with the prefixes
    DataParallel and torch.compile add removed; what was unwrapped is said in `notes`."""
    state = checkpoint
    while isinstance(state, dict) and not any(isinstance(value, torch.Tensor) for value in state.values()):
        key = next((key for key in CHECKPOINT_WRAPPERS if isinstance(state.get(key), dict)), None)
        if key is None:
            break
        notes.append(f"--weights: read the state dict under '{key}' in {path.name}")
        state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SidetuneError(f"Weights file {path} holds no state dict of tensors (found {type(state).__name__}"
                            f"{' with keys ' + ', '.join(map(str, list(state)[:5])) if isinstance(state, dict) else ''}). "
                            "Save the model's state_dict() (torch.save or safetensors) and pass that file.")
    for prefix in KEY_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The key prefixes of the classifier (and distillation head, pre-logits) a timm model of this
    architecture has when built with classes, from its pretrained_cfg: what a checkpoint saved
    with its classifier holds beyond the frozen backbone's (num_classes=0) keys."""
    names = (model.pretrained_cfg or {}).get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in (*names, "head", "head_dist", "pre_logits", "fc", "classifier"))


def state_dict_sha256(model: nn.Module) -> str:
    """Hash of every tensor (name, dtype, shape, bytes): identical weights give an identical
    hash whatever file format they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def forward_stages(model: nn.Module, images: torch.Tensor, stages: Sequence[int]) -> Iterator[torch.Tensor]:
    """Yield the (B, T, D) token tensors of the requested stages, in increasing stage order.

    Call it under torch.inference_mode(); it mirrors timm's VisionTransformer.forward_features
    without the final norm, which stage two applies from the cached parameters."""
    wanted = sorted(set(stages))
    last = wanted[-1]
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    if wanted[0] == 0:
        yield x
    for index, block in enumerate(model.blocks, start=1):
        if index > last:
            break
        x = block(x)
        if index in wanted:
            yield x


# ---------------------------------------------------------------------------------------------
# Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
PREPROCESSINGS = ("vtab", "timm", "inception")


@dataclass(frozen=True)
class Preprocessing:
    """Exactly how images become backbone input; recorded in the manifest, rebuilt from it."""

    name: str
    size: tuple[int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float | None = None
    crop_mode: str | None = None

    def transform(self):
        """The torchvision transform: PIL RGB image -> normalised float tensor (3, H, W)."""
        if self.name == "timm":
            from timm.data import create_transform

            return create_transform(
                input_size=(3, *self.size),
                interpolation=self.interpolation,
                mean=self.mean,
                std=self.std,
                crop_pct=self.crop_pct,
                crop_mode=self.crop_mode,
                is_training=False,
            )
        from torchvision import transforms as T

        return T.Compose([
            T.Resize(self.size, interpolation=T.InterpolationMode(self.interpolation)),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    def describe(self) -> dict:
        record = asdict(self)
        record["size"] = list(self.size)
        record["mean"] = list(self.mean)
        record["std"] = list(self.std)
        return record

    @classmethod
    def from_record(cls, record: dict) -> "Preprocessing":
        return cls(
            name=record["name"],
            size=tuple(record["size"]),
            interpolation=record["interpolation"],
            mean=tuple(record["mean"]),
            std=tuple(record["std"]),
            crop_pct=record.get("crop_pct"),
            crop_mode=record.get("crop_mode"),
        )


def resolve_preprocessing(name: str, backbone: Backbone) -> Preprocessing:
    """`vtab`: resize to the model's input size (224x224 for ViT-B/16), bicubic, no crop,
    ImageNet mean/std. `inception`: the same with mean = std = 0.5. `timm`: the model's own
    evaluation transform (resize, centre crop, its mean/std)."""
    size = tuple(int(s) for s in backbone.model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
    if name == "vtab":
        return Preprocessing("vtab", size, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
    if name == "inception":
        return Preprocessing("inception", size, "bicubic", INCEPTION_MEAN, INCEPTION_STD)
    if name == "timm":
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(backbone.model)
        return Preprocessing(
            "timm",
            tuple(int(s) for s in config["input_size"][1:]),
            str(config["interpolation"]),
            tuple(float(m) for m in config["mean"]),
            tuple(float(s) for s in config["std"]),
            float(config["crop_pct"]),
            str(config.get("crop_mode", "center")),
        )
    raise SidetuneError(f"Unknown preprocessing '{name}'. Choose one of: {', '.join(PREPROCESSINGS)}.")

