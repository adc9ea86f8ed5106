"""The side networks' options as command-line flags, generated from what each side network
declares (`option_help` in its own file, merged by `sidetune.declarations.declared_options`, which
reads them without importing torch): a new
option of a method is a flag of `train` (one value) and of `sweep` (comma-separated values)
without an edit here."""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import typer

from sidetune.declarations import DeclaredOption, declared_options


def with_method_options(kind: str) -> Callable[[Callable], Callable]:
    """Give a command (whose signature ends in **options) one flag per declared method option,
    right after its `method` parameter. `kind` "train": typed single values (booleans as
    --x/--no-x); "sweep": comma-separated lists, as text (booleans are not swept). The command
    receives the options given, by name; those left out are not passed."""
    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)  # real types: the wrapper has other globals
        fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        options = [o for o in declared_options().values() if kind == "train" or o.kind is not bool]
        generated = [_parameter(option, kind) for option in options]
        at = next(i for i, p in enumerate(fixed) if p.name == "method") + 1
        parameters = fixed[:at] + generated + fixed[at:]

        @functools.wraps(command)
        def command_with_options(**given):
            chosen = {o.name: given.pop(o.name) for o in options if given.get(o.name) is not None}
            for option in options:
                given.pop(option.name, None)
            return command(**given, **chosen)

        command_with_options.__signature__ = signature.replace(parameters=parameters)
        command_with_options.__annotations__ = {p.name: p.annotation for p in parameters}
        del command_with_options.__wrapped__  # typer must read the generated signature, not the original's
        return command_with_options

    return decorate


def _parameter(option: DeclaredOption, kind: str) -> inspect.Parameter:
    flag = "--" + option.name.replace("_", "-")
    if kind == "sweep":
        info = typer.Option(None, help=f"{option.describe()} Comma-separated values.")
        annotation = Optional[str]
    elif option.kind is bool:
        info = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=option.describe())
        annotation = Optional[bool]
    else:
        bounds = {} if option.minimum is None else {"min": option.minimum}
        info = typer.Option(None, **bounds, help=option.describe())
        annotation = Optional[option.kind]
    return inspect.Parameter(option.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=info, annotation=annotation)


def call_with_defaults(command: Callable, **given) -> object:
    """Call a typer command from Python with every parameter not given at its command-line
    default (as `sidetune demo` calls `train`)."""
    values = {}
    for name, parameter in inspect.signature(command).parameters.items():
        default = parameter.default
        values[name] = given.pop(name) if name in given else getattr(default, "default", default)
    if given:
        raise TypeError(f"{command.__name__} has no parameter {', '.join(given)}")
    return command(**values)
