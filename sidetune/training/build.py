"""A side network for a cache: the layout it reads from the manifest, the check that the cache
stores what it reads (`sidenet_blueprint`), and a trained configuration restored from a run."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sidetune.cache.manifest import CacheManifest
from sidetune.cache.reader import Cache
from sidetune.cache.spec import specs_serving
from sidetune.errors import SidetuneError
from sidetune.sidenets import SIDENETS, FeatureLayout, SideNet, create_sidenet, resolve_options
from sidetune.sidenets.base import auto_pool
from sidetune.training.config import TrainConfig


def feature_layout(manifest: CacheManifest) -> FeatureLayout:
    """What a side network needs to know about a cache's features, from its manifest."""
    backbone_stages = manifest.backbone_stages
    return FeatureLayout(
        depth=manifest.depth,
        width=manifest.width,
        num_tokens=manifest.num_tokens,
        num_prefix_tokens=manifest.num_prefix_tokens,
        num_classes=len(manifest.class_names),
        stages=tuple(manifest.stages),
        token_selection=manifest.token_selection,
        stage_shapes=manifest.layout.shapes,
        first_stage=backbone_stages[0]["stage"] if backbone_stages else 0,
        frames=manifest.frames,
    )


@dataclass(frozen=True, eq=False)
class SideNetBlueprint:
    """A side network checked against one cache: the stages and tokens it reads are there, and
    the backbone's final norm has been read. `build(k)` makes the network for a stack of k
    configurations without reading the cache again, so a sweep checks each group once and hands
    the blueprint to stacking, the estimate and the training loop."""

    method: str
    options: tuple[tuple[str, object], ...]  # resolved, as TrainConfig.options
    layout: FeatureLayout
    final_norm: tuple[torch.Tensor, torch.Tensor, float] | None
    stages: tuple[int, ...]  # the stages the network reads

    def build(self, num_configs: int) -> SideNet:
        """The side network for `num_configs` stacked configurations, parameters not yet drawn."""
        net = create_sidenet(self.method, self.layout, num_configs, **dict(self.options))
        if self.final_norm is None:
            net.set_final_norm(None, None, 0.0)
        else:
            weight, bias, eps = self.final_norm
            net.set_final_norm(weight.clone(), bias.clone(), eps)
        return net


def sidenet_blueprint(cache: Cache, method: str, options: dict) -> SideNetBlueprint:
    """The blueprint of `method` with `options` for this cache, refusing a cache that lacks what
    it reads (naming the spec to extract with, or the methods that read this cache)."""
    layout = feature_layout(cache.info)
    net = create_sidenet(method, layout, 1, **options)
    missing = [s for s in net.stages_needed() if s not in layout.stages]
    if missing or layout.token_selection not in net.token_selections:
        backbone_stages = cache.info.backbone_stages or [{"num_tokens": 0, "width": 0}]
        one_shape = len({(stage["num_tokens"], stage["width"]) for stage in backbone_stages}) == 1
        serving = specs_serving(layout.depth, net.stages_needed(), net.token_selections, layout.first_stage, one_shape,
                                net.reads_sums)
        fix = (f"Extract with --spec {serving[0]}" + (f" (or {', '.join(serving[1:3])})" if serving[1:] else "")
               if serving else "Extract with a spec that keeps them")
        readers = [name for name in SIDENETS if name != method and _reads(name, layout)]
        raise SidetuneError(
            f"Method {method} reads stages {net.stages_needed()} with {'/'.join(net.token_selections)} "
            f"tokens; cache {cache.path} stores {cache.token_layout.describe_stages()} with "
            f"'{layout.token_selection}' tokens. {fix}"
            + (f", or train a method that reads this cache: {', '.join(readers)}." if readers else ".")
        )
    norm = cache.final_norm()
    final_norm = None if norm is None else (torch.from_numpy(norm["weight"]), torch.from_numpy(norm["bias"]), norm["eps"])
    return SideNetBlueprint(method, resolve_options(method, options), layout, final_norm, tuple(net.stages_needed()))


def _reads(method: str, layout: FeatureLayout) -> bool:
    """Whether `method`, at its default options, finds what it reads in a cache of `layout`."""
    try:
        net = create_sidenet(method, layout, 1)
    except SidetuneError:
        return False
    return layout.token_selection in net.token_selections and set(net.stages_needed()) <= set(layout.stages)


def config_for_cache(config: TrainConfig, cache: Cache) -> TrainConfig:
    """`config` with the options that depend on the cache decided, as runs and sweeps record
    them: pool `auto` becomes cls where the backbone has a class token, else mean."""
    options = dict(config.options)
    if options.get("pool") != "auto":
        return config
    options["pool"] = auto_pool(feature_layout(cache.info))
    return replace(config, options=tuple(sorted(options.items())))


def restore_sidenet(manifest: CacheManifest, config: TrainConfig, state: dict[str, torch.Tensor]) -> SideNet:
    """A one-config side network with a saved `config_state`, built from the cache's manifest
    alone (the state carries the frozen final norm)."""
    net = create_sidenet(config.method, feature_layout(manifest), 1, **dict(config.options))
    eps = manifest.final_norm_eps
    if eps is None:
        net.set_final_norm(None, None, 0.0)
    else:
        net.set_final_norm(torch.empty(manifest.width), torch.empty(manifest.width), eps)  # values: from the state
    net.load_config_state(state)
    return net.eval()
