"""A results directory: the run's configuration, tables as markdown and CSV, where plots go, and
one fingerprinted directory per training run.

A training run's directory is named by its label and a fingerprint of every setting its result
depends on (:func:`run_settings`, :meth:`Results.run_dir`): run again with a changed learning
rate or pruning ratio, an experiment trains into a new directory instead of reusing runs that
other settings produced, and changed back it finds the old ones again.

Example:
  >>> import tempfile
  >>> results = Results(tempfile.mkdtemp())
  >>> rows = [{"method": "LSVT", "accuracy": 0.9712}]
  >>> print(results.table("demo", rows, [Column("method"), Column("accuracy", "acc", ".3f")]))
  | method | acc |
  |:--|--:|
  | LSVT | 0.971 |
  >>> sorted(p.name for p in results.path.iterdir())
  ['demo.csv', 'demo.md']
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["PLACEMENT", "Column", "Results", "markdown_table", "run_settings", "value_range"]

PLACEMENT = frozenset({"parallel"})
"""Config fields that say where a run's work runs, not what it computes: not in fingerprints."""


class Column(NamedTuple):
    """A table column.

    Attributes:
      key: the row dict's key.
      header: the heading (default: ``key``).
      format: a format spec for numbers, e.g. ``".3f"`` or ``".1%"`` (default: ``str``).
    """

    key: str
    header: str | None = None
    format: str = ""


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if spec and isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as a GitHub markdown table; text columns left-aligned, numbers right-aligned."""
    header = "| " + " | ".join(c.header or c.key for c in columns) + " |"
    numeric = [any(isinstance(r.get(c.key), int | float) for r in rows) for c in columns]
    rule = "|" + "|".join("--:" if n else ":--" for n in numeric) + "|"
    body = ["| " + " | ".join(_cell(r.get(c.key), c.format) for c in columns) + " |"
            for r in rows]
    return "\n".join([header, rule, *body])


def value_range(values: Sequence[float], spec: str = ".3f") -> str:
    """``"low to high"`` of ``values`` formatted with ``spec`` (one number when they are equal).

    Example:
      >>> value_range([0.91, 0.934, 0.92])
      '0.910 to 0.934'
      >>> value_range([0.5, 0.5], ".1%")
      '50.0%'
    """
    low, high = min(values), max(values)
    return format(low, spec) if low == high else f"{format(low, spec)} to {format(high, spec)}"


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {k: _jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return repr(value)


def run_settings(config: Any, *, exclude: Sequence[str] = (), **identity: Any) -> dict[str, Any]:
    """The settings a training run's result depends on, as JSON values: every field of the
    experiment's ``config`` (a dataclass) except those in ``exclude``, and the run's own
    ``identity`` (its N, weight decay, model, ...; these win over a field of the same name).

    Fields are left out only by name, so a field added to a config later counts for every run
    until it is excluded where it does not matter: a run may be retrained needlessly, never
    reused wrongly. The fields of :data:`PLACEMENT` (where the work runs, e.g. ``parallel``:
    the same result up to the order of floating-point sums) never count.

    Example:
      >>> @dataclasses.dataclass(frozen=True)
      ... class Config:
      ...     learning_rate: float = 0.1
      ...     budgets: tuple[float, ...] = (0.5, 0.1)
      >>> run_settings(Config(), exclude=["budgets"], N=3)
      {'learning_rate': 0.1, 'N': 3}

    Raises:
      TypeError: if ``config`` is not a dataclass instance.
      ValueError: if ``exclude`` names a field ``config`` does not have.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}.")
    names = [f.name for f in dataclasses.fields(config)]
    if isinstance(exclude, str):
        raise TypeError(f"exclude must be a sequence of field names, got the string {exclude!r}.")
    unknown = sorted(set(exclude) - set(names))
    if unknown:
        raise ValueError(f"exclude names fields {type(config).__name__} does not have: "
                         f"{unknown}; its fields are {names}.")
    dropped = set(exclude) | PLACEMENT
    settings = {name: getattr(config, name) for name in names if name not in dropped}
    settings.update(identity)
    return _jsonable(settings)


def _fingerprint(settings: Mapping[str, Any]) -> str:
    text = json.dumps(_jsonable(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


class Results:
    """A directory of one experiment's outputs (created if missing).

    Args:
      path: the directory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        """The path of ``name`` in the directory (for plots, checkpoints, metrics)."""
        return self.path / name

    def run_dir(self, label: str, settings: Mapping[str, Any]) -> Path:
        """The directory of one training run: ``runs/{label}-{fingerprint}``, the fingerprint a
        hash of ``settings`` (:func:`run_settings`), which are written beside the run as
        ``settings.json``. The same settings give the same directory (a finished run is found
        again); any change gives another.

        Example:
          >>> import tempfile
          >>> results = Results(tempfile.mkdtemp())
          >>> a = results.run_dir("fcn_N3", {"learning_rate": 0.001})
          >>> a == results.run_dir("fcn_N3", {"learning_rate": 0.001})
          True
          >>> a == results.run_dir("fcn_N3", {"learning_rate": 0.01})
          False
          >>> a.name.startswith("fcn_N3-")
          True
        """
        if not isinstance(settings, Mapping):
            raise TypeError(f"settings must be a mapping, got {type(settings).__name__}.")
        name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(label)).strip("_") or "run"
        path = self.path / "runs" / f"{name}-{_fingerprint(settings)}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "settings.json").write_text(
            json.dumps(_jsonable(settings), indent=2, sort_keys=True) + "\n")
        return path

    def json(self, name: str, value: Any) -> Path:
        """Writes ``value`` (dataclasses and NamedTuples as objects) to ``name.json``."""
        path = self.path / f"{name}.json"
        path.write_text(json.dumps(_jsonable(value), indent=2) + "\n")
        return path

    def table(
        self,
        name: str,
        rows: Sequence[Mapping[str, Any]],
        columns: Sequence[Column],
        caption: str = "",
    ) -> str:
        """Writes ``name.md`` (the markdown table, after ``caption``) and ``name.csv`` (every
        column, unformatted); returns the markdown table."""
        table = markdown_table(rows, columns)
        (self.path / f"{name}.md").write_text((f"{caption}\n\n" if caption else "") + table + "\n")
        with (self.path / f"{name}.csv").open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow([c.key for c in columns])
            writer.writerows([[r.get(c.key) for c in columns] for r in rows])
        return table
