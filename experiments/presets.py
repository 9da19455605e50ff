"""Presets and the command line every experiment shares.

An experiment describes its settings as a frozen dataclass and names a few instances of it
(``smoke``: seconds, for tests; ``default``: the job as documented; ``paper``: the papers'
settings). :func:`parse_args` picks one, applies ``--set field=value`` overrides (checked against
the field's type) and returns it with the output directory.

Example:
  >>> import dataclasses
  >>> @dataclasses.dataclass(frozen=True)
  ... class Config:
  ...     epochs: int = 10
  ...     budgets: tuple[float, ...] = (0.5, 0.1)
  >>> config, _, _ = parse_args(["--preset", "smoke", "--set", "budgets=(0.3,)"],
  ...                           {"smoke": Config(epochs=1), "default": Config()}, "demo")
  >>> config
  Config(epochs=1, budgets=(0.3,))
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["override", "parse_args"]

ConfigT = TypeVar("ConfigT")


def _same_kind(old: Any, new: Any) -> bool:
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, int | float) and isinstance(new, int | float):
        return isinstance(old, float) or isinstance(new, int)
    return type(old) is type(new)


def override(config: ConfigT, assignments: Sequence[str]) -> ConfigT:
    """``config`` with ``field=value`` assignments applied (values are Python literals; a value
    that is not a literal is taken as a string).

    Raises:
      ValueError: for an unknown field, a malformed assignment or a value of another type.
    """
    fields = {f.name for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    changes = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set takes field=value with a field among {sorted(fields)}, "
                             f"got {assignment!r}.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        old = getattr(config, name)
        if not _same_kind(old, value):
            raise ValueError(f"--set {name}: expected a value like {old!r}, got {value!r}.")
        changes[name] = float(value) if isinstance(old, float) else value
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


def parse_args(
    argv: Sequence[str] | None,
    presets: Mapping[str, ConfigT],
    description: str,
    default_output: str = "results",
) -> tuple[ConfigT, Path, bool]:
    """``(config, output directory, show progress)`` from the command line.

    Options: ``--preset NAME`` (default ``default``, else the first), ``--set field=value``
    (repeatable), ``--output-dir DIR`` (default ``{default_output}/{preset}``), ``--no-progress``.
    """
    default = "default" if "default" in presets else next(iter(presets))
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=list(presets), default=default,
                        help=f"settings to start from (default: {default})")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one setting (repeatable), e.g. --set seed=1")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"results directory (default: {default_output}/PRESET)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        config = override(presets[args.preset], args.set)
    except ValueError as error:
        parser.error(str(error))
    output = args.output_dir or Path(default_output) / args.preset
    return config, output, not args.no_progress
