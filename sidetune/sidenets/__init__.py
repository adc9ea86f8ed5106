"""Side networks: one file per method and a small registry (`create_sidenet`)."""

from __future__ import annotations

import inspect

from sidetune.errors import SidetuneError
from sidetune.sidenets.attentive import AttentiveProbe
from sidetune.sidenets.base import FeatureLayout, SideNet
from sidetune.sidenets.evl import EVLProbe
from sidetune.sidenets.head2toe import Head2Toe
from sidetune.sidenets.knn import KNNProbe
from sidetune.sidenets.last import LAST
from sidetune.sidenets.linear import LinearProbe
from sidetune.sidenets.losa import LoSA
from sidetune.sidenets.lst import LST
from sidetune.sidenets.mist import MIST
from sidetune.sidenets.restuning import ResTuning
from sidetune.sidenets.ridge import RidgeProbe

SIDENETS: dict[str, type[SideNet]] = {cls.name: cls for cls in (LinearProbe, RidgeProbe, KNNProbe, AttentiveProbe, Head2Toe,
                                                            LAST, LoSA, MIST, LST, ResTuning, EVLProbe)}

__all__ = ["SIDENETS", "FeatureLayout", "SideNet", "create_sidenet", "describe_methods", "method_options", "resolve_options"]


def method_options(method: str) -> dict[str, object]:
    """A method's options and their defaults, e.g. {"pool": "auto", "rank": 16, ...}."""
    _check_method(method)
    parameters = list(inspect.signature(SIDENETS[method].__init__).parameters.values())[3:]  # self, layout, K
    return {p.name: p.default for p in parameters}


def describe_methods() -> list[dict]:
    """Every registered method as it declares itself: its name, one-line summary, default
    learning rate, epochs and weight decay, whether it is solved in closed form, its options (type, default, help line,
    least value) and the grid `sweep` tries when given none. `sidetune.declarations` reads these
    records without importing torch."""
    described = []
    for method, cls in SIDENETS.items():
        helps = {k: v for klass in reversed(cls.__mro__) for k, v in vars(klass).get("option_help", {}).items()}
        minimums = {k: v for klass in reversed(cls.__mro__) for k, v in vars(klass).get("option_minimum", {}).items()}
        options = []
        for name, default in method_options(method).items():
            if name not in helps:
                raise TypeError(f"{cls.__name__} declares no option_help for its option {name!r}")
            kind = type(default)
            minimum = minimums.get(name, 1 if kind is int else 0.0 if kind is float else None)
            options.append({"name": name, "kind": kind.__name__, "default": default, "help": helps[name],
                            "minimum": minimum})
        described.append({"method": method, "summary": cls.summary, "default_lr": cls.default_lr,
                          "default_epochs": cls.default_epochs, "default_weight_decay": cls.default_weight_decay,
                          "closed_form": cls.closed_form, "options": options,
                          "default_grid": {name: list(values) for name, values in cls.default_grid.items()}})
    return described


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
