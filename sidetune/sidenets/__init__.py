"""Side networks: one file per method and a small registry (`create_sidenet`)."""

from __future__ import annotations

from sidetune.errors import SidetuneError
from sidetune.sidenets.base import FeatureLayout, SideNet
from sidetune.sidenets.last import LAST
from sidetune.sidenets.linear import LinearProbe
from sidetune.sidenets.losa import LoSA

SIDENETS: dict[str, type[SideNet]] = {cls.name: cls for cls in (LinearProbe, LAST, LoSA)}

__all__ = ["SIDENETS", "FeatureLayout", "SideNet", "create_sidenet"]


def create_sidenet(method: str, layout: FeatureLayout, num_configs: int, **options) -> SideNet:
    """Build a side network for `num_configs` stacked configurations sharing `options`."""
    if method not in SIDENETS:
        raise SidetuneError(f"Unknown method '{method}'. Choose one of: {', '.join(SIDENETS)}.")
    return SIDENETS[method](layout, num_configs, **options)
