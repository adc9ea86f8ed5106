"""Side networks: one file per method and a small registry (`create_sidenet`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

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

__all__ = ["SIDENETS", "DeclaredOption", "FeatureLayout", "SideNet", "create_sidenet", "declared_options", "describe_methods", "method_options",
           "resolve_options"]


def method_options(method: str) -> dict[str, object]:
    """A method's options and their defaults, e.g. {"pool": "auto", "rank": 16, ...}."""
    _check_method(method)
    parameters = list(inspect.signature(SIDENETS[method].__init__).parameters.values())[3:]  # self, layout, K
    return {p.name: p.default for p in parameters}


@dataclass(frozen=True)
class DeclaredOption:
    """One method option as every side network having it declares it: its type, each method's
    default and help line, and the least value it takes."""

    name: str
    kind: type
    defaults: dict[str, object]  # method -> default
    help: dict[str, str]  # method -> its help line
    minimum: float | None

    def describe(self) -> str:
        """One help text: "attentive: ...; last, mist: attention rank r (default attentive 64, ...)."."""
        by_text: dict[str, list[str]] = {}
        for method, text in self.help.items():
            by_text.setdefault(text, []).append(method)
        if len(self.defaults) == len(SIDENETS) and len(by_text) == 1:
            lines = next(iter(by_text))  # every method has it, with one meaning
        else:
            lines = "; ".join(f"{', '.join(methods)}: {text}" for text, methods in by_text.items())
        values = set(map(repr, self.defaults.values()))
        default = (f"default {next(iter(self.defaults.values()))}" if len(values) == 1
                   else "default " + ", ".join(f"{m} {v}" for m, v in self.defaults.items()))
        return f"{lines} ({default})."


def declared_options() -> dict[str, DeclaredOption]:
    """Every option of every side network, merged by name: what the command line's method
    flags are generated from. Each option's type and least value must agree between methods."""
    merged: dict[str, DeclaredOption] = {}
    for method, cls in SIDENETS.items():
        helps = {k: v for klass in reversed(cls.__mro__) for k, v in vars(klass).get("option_help", {}).items()}
        minimums = {k: v for klass in reversed(cls.__mro__) for k, v in vars(klass).get("option_minimum", {}).items()}
        for name, default in method_options(method).items():
            if name not in helps:
                raise TypeError(f"{cls.__name__} declares no option_help for its option {name!r}")
            kind = type(default)
            minimum = minimums.get(name, 1 if kind is int else 0.0 if kind is float else None)
            known = merged.get(name)
            if known is not None and (known.kind is not kind or known.minimum != minimum):
                raise TypeError(f"option {name!r} of {method} differs in type or minimum from {', '.join(known.defaults)}")
            merged[name] = DeclaredOption(name, kind, {**(known.defaults if known else {}), method: default},
                                          {**(known.help if known else {}), method: helps[name]}, minimum)
    return merged


def describe_methods() -> list[dict]:
    """Every registered method as it declares itself: its name, one-line summary, default
    learning rate, options (default and help line) and the grid `sweep` tries when given none."""
    described = []
    for method, cls in SIDENETS.items():
        declared = declared_options()
        options = [{"name": name, "default": default, "help": declared[name].help[method]}
                   for name, default in method_options(method).items()]
        described.append({"method": method, "summary": cls.summary, "default_lr": cls.default_lr,
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
