"""Side networks: one file per method and a small registry (`create_sidenet`)."""

from __future__ import annotations

import inspect

from sidetune.errors import SidetuneError
from sidetune.sidenets.attentive import AttentiveProbe
from sidetune.sidenets.base import FeatureLayout, SideNet
from sidetune.sidenets.head2toe import Head2Toe
from sidetune.sidenets.last import LAST
from sidetune.sidenets.linear import LinearProbe
from sidetune.sidenets.losa import LoSA
from sidetune.sidenets.lst import LST
from sidetune.sidenets.mist import MIST
from sidetune.sidenets.restuning import ResTuning
from sidetune.sidenets.ridge import RidgeProbe

SIDENETS: dict[str, type[SideNet]] = {cls.name: cls for cls in (LinearProbe, RidgeProbe, AttentiveProbe, Head2Toe, LAST, LoSA, MIST,
                                                            LST, ResTuning)}

__all__ = ["SIDENETS", "FeatureLayout", "SideNet", "create_sidenet", "method_options", "resolve_options"]


def method_options(method: str) -> dict[str, object]:
    """A method's options and their defaults, e.g. {"pool": "cls", "rank": 16, ...}."""
    _check_method(method)
    parameters = list(inspect.signature(SIDENETS[method].__init__).parameters.values())[3:]  # self, layout, K
    return {p.name: p.default for p in parameters}


def resolve_options(method: str, options: dict[str, object]) -> tuple[tuple[str, object], ...]:
    """Every option of `method`, the given ones over the defaults, as sorted (name, value) pairs;
    an option the method does not have is refused with the list of those it has."""
    defaults = method_options(method)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise SidetuneError(f"Method {method} has no option {', '.join(unknown)}; its options are "
                            f"{', '.join(f'{k} (default {v})' for k, v in defaults.items())}.")
    resolved = {**defaults, **options}
    return tuple(sorted((name, type(defaults[name])(value)) for name, value in resolved.items()))


def _check_method(method: str) -> None:
    if method not in SIDENETS:
        raise SidetuneError(f"Unknown method '{method}'. Choose one of: {', '.join(SIDENETS)}.")


def create_sidenet(method: str, layout: FeatureLayout, num_configs: int, **options) -> SideNet:
    """Build a side network for `num_configs` stacked configurations sharing `options`."""
    _check_method(method)
    return SIDENETS[method](layout, num_configs, **options)
