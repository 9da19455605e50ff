"""Benchmarks: speed measured as ratios against baselines run in the same process."""

from __future__ import annotations

import json
import platform
from typing import Any

import jax

__all__ = ["machine_line", "write_rows"]


def machine_line() -> str:
    """``# processor, platform (device kind), jax version``: the first line a benchmark prints."""
    device = jax.devices()[0]
    return (f"# {platform.processor() or platform.machine()}, {device.platform} "
            f"({device.device_kind}), jax {jax.__version__}")


def write_rows(path: str | None, rows: list[dict[str, Any]]) -> None:
    """Writes ``{"device": ..., "rows": rows}`` as JSON to ``path`` (nothing if it is None)."""
    if path:
        with open(path, "w") as handle:
            json.dump({"device": str(jax.devices()[0]), "rows": rows}, handle, indent=1)
