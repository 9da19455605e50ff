"""A results directory: the run's configuration, tables as markdown and CSV, and where plots go.

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
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["Column", "Results", "markdown_table"]


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
