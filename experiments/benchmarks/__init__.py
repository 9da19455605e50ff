"""Benchmarks: speed measured as ratios against baselines run in the same process."""

from __future__ import annotations

import json
import platform
from typing import Any

__all__ = ["machine_line", "write_rows"]


def machine_line() -> str:
    """``# processor, platform (device kind), jax version``: the first line a benchmark prints."""
    import jax  # noqa: PLC0415 - not at import: a benchmark may set XLA_FLAGS before jax starts
    device = jax.devices()[0]
    return (f"# {platform.processor() or platform.machine()}, {device.platform} "
            f"({device.device_kind}), jax {jax.__version__}")


def write_rows(path: str | None, rows: list[dict[str, Any]]) -> None:
    """Writes ``{"device": ..., "rows": rows}`` as JSON to ``path`` (nothing if it is None)."""
    if path:
        import jax  # noqa: PLC0415
        with open(path, "w") as handle:
            json.dump({"device": str(jax.devices()[0]), "rows": rows}, handle, indent=1)
