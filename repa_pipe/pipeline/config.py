"""Config dataclasses: one frozen dataclass per command, whose fields are the command's options.

A field is declared with `option(default, help)`; its metadata carries the help text (and a metavar), and
the CLI builds each command's options from the fields, so a name, its default and its help live in one place.
Checks raise ConfigError naming the option as the user typed it (`flag(name)`).

This module imports nothing heavy: the CLI reads the config classes to build `--help`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

from repa_pipe.pipeline.errors import ConfigError


def option(default: Any = dataclasses.MISSING, help: str = "", *, metavar: str | None = None,
           choices: Iterable[Any] | None = None, choices_text: str | None = None, argument: bool = False) -> Any:
    """A config field that is also a command-line option (`argument=True`: a positional argument).

    `choices` (from a registry) are checked by `check_choices` and listed in --help, as `choices_text` says when
    given (e.g. a pattern for a long list), else one by one."""
    choices = tuple(choices) if choices is not None else None
    if choices_text is None and choices is not None:
        choices_text = ", ".join(map(str, choices))
    meta = {"help": help, "metavar": metavar, "argument": argument, "choices": choices, "choices_text": choices_text}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The command-line spelling of a config field: `global_batch_size` -> `--global-batch-size`."""
    return "--" + name.replace("_", "-")


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-able dict of a config dataclass (paths become strings, tuples lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def check_choice(value: Any, choices: Iterable[Any], name: str) -> None:
    """ConfigError unless `value` is one of `choices` (`name` is the field: the message names its flag)."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{flag(name)} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_choices(cfg: Any) -> None:
    """ConfigError for the first field (or item of a tuple field) outside its declared choices; None passes."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices is None or value is None:
            continue
        for v in value if isinstance(value, tuple) else (value,):
            check_choice(v, choices, f.name)


def check_at_least(cfg: Any, names: Iterable[str], low: int) -> None:
    """ConfigError naming the first of `names` whose value (when not None) is below `low`."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and v < low:
            raise ConfigError(f"{flag(name)} must be >= {low}, got {v}")


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed and numpy's SeedSequence take unsigned 64-bit seeds


def check_seed(cfg: Any, name: str = "seed") -> None:
    """ConfigError unless the field is an integer seed in [0, 2^64 - 1]."""
    v = getattr(cfg, name)
    if not 0 <= v <= SEED_MAX:
        raise ConfigError(f"{flag(name)} must be in [0, 2^64 - 1], got {v}")


def check_fraction(cfg: Any, names: Iterable[str]) -> None:
    """ConfigError naming the first of `names` outside [0, 1)."""
    for name in names:
        v = getattr(cfg, name)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"{flag(name)} must be in [0, 1), got {v}")
