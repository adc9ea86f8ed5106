"""Every method as it declares itself (summary, default learning rate, closed form, options with
their type, defaults, help and least value, default sweep grid), read without importing torch:
the command line builds its method flags and `sidetune methods` from it, so `sidetune --help`
starts in a fraction of a second.

The side networks are the truth: each declares itself in its own file, and
`sidetune.sidenets.describe_methods` reads the registry. This module reads the same records
from the registry when it is already imported (a script that registered a method of its own
before calling the command line), else from declarations.json beside it, which
`python -m sidetune.declarations` writes from the registry (tests/test_cli.py fails while it is
stale)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

DECLARATIONS_FILE = Path(__file__).with_name("declarations.json")
KINDS: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}


@dataclass(frozen=True)
class DeclaredOption:
    """One method option as every side network having it declares it: its type, each method's
    default and help line, and the least value it takes."""

    name: str
    kind: type
    defaults: dict[str, object]  # method -> default
    help: dict[str, str]  # method -> its help line
    minimum: float | None
    every_method: bool = False  # every registered method has it

    def describe(self) -> str:
        """One help text: "attentive: ...; last, mist: attention rank r (default attentive 64, ...)."."""
        by_text: dict[str, list[str]] = {}
        for method, text in self.help.items():
            by_text.setdefault(text, []).append(method)
        if self.every_method and len(by_text) == 1:
            lines = next(iter(by_text))  # every method has it, with one meaning
        else:
            lines = "; ".join(f"{', '.join(methods)}: {text}" for text, methods in by_text.items())
        values = set(map(repr, self.defaults.values()))
        default = (f"default {next(iter(self.defaults.values()))}" if len(values) == 1
                   else "default " + ", ".join(f"{m} {v}" for m, v in self.defaults.items()))
        return f"{lines} ({default})."


def method_records() -> list[dict]:
    """Every registered method as `sidetune.sidenets.describe_methods` gives it: from the
    registry when it is imported, else from declarations.json."""
    registry = sys.modules.get("sidetune.sidenets")
    if registry is not None and hasattr(registry, "describe_methods"):
        return registry.describe_methods()
    if DECLARATIONS_FILE.is_file():
        return json.loads(DECLARATIONS_FILE.read_text())
    from sidetune.sidenets import describe_methods  # an install without the file: the slow way

    return describe_methods()


def declared_options(records: list[dict] | None = None) -> dict[str, DeclaredOption]:
    """Every option of every method, merged by name: what the command line's method flags are
    generated from. Each option's type and least value must agree between methods."""
    records = method_records() if records is None else records
    merged: dict[str, DeclaredOption] = {}
    for record in records:
        method = record["method"]
        for option in record["options"]:
            name, kind, minimum = option["name"], KINDS[option["kind"]], option["minimum"]
            known = merged.get(name)
            if known is not None and (known.kind is not kind or known.minimum != minimum):
                raise TypeError(f"option {name!r} of {method} differs in type or minimum from {', '.join(known.defaults)}")
            merged[name] = DeclaredOption(name, kind, {**(known.defaults if known else {}), method: option["default"]},
                                          {**(known.help if known else {}), method: option["help"]}, minimum)
    return {name: DeclaredOption(o.name, o.kind, o.defaults, o.help, o.minimum, len(o.defaults) == len(records))
            for name, o in merged.items()}


def option_flag(name: str, value: object) -> str:
    """A method option as `sidetune train` takes it: --rank 16, --zero-init-out / --no-zero-init-out."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def write_declarations() -> Path:
    """declarations.json, from the registry."""
    from sidetune.sidenets import describe_methods

    DECLARATIONS_FILE.write_text(json.dumps(describe_methods(), indent=1) + "\n")
    return DECLARATIONS_FILE


if __name__ == "__main__":
    print(f"wrote {write_declarations()}")
