"""What decides a CPU run's numbers, so committed figures can say where they were computed.

XLA compiles every program for the host's processor: its model (LLVM tunes for it) and the
vector instructions it may use, capped by ``XLA_FLAGS=--xla_cpu_max_isa=...``. Float reductions
then round differently from one machine to another, and a training run of a few thousand steps
ends a few test images apart. The CPU's marketing name does not tell such machines apart ("AMD
EPYC" names processors with and without AVX-512), so :func:`describe` names the processor's
family, model and stepping, the instruction set XLA compiles for, the core count (XLA's thread
pool splits work by it), jax and jaxlib, and matplotlib (a figure's bytes).

Two machines whose :func:`describe` strings are equal compute the committed figures bit for bit
(``tests/test_readme.py`` checks it); elsewhere the figures move within the spread that
``python -m experiments.figures`` measures and writes next to them.

Example:
  >>> from experiments import machine
  >>> machine.isa(flags={"sse4_2", "avx", "avx2", "fma", "avx512f"}, xla_flags="")
  'AVX512'
  >>> machine.isa(flags={"sse4_2", "avx", "avx2", "fma", "avx512f"},
  ...             xla_flags="--xla_cpu_max_isa=AVX2")
  'AVX2'
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ISAS", "cores", "cpu_flags", "cpu_id", "describe", "isa"]

# XLA's names for the instruction sets ``--xla_cpu_max_isa`` accepts, oldest first, each with the
# /proc/cpuinfo flag that says the processor has it (x86).
ISAS: tuple[tuple[str, str], ...] = (
    ("SSE4_2", "sse4_2"), ("AVX", "avx"), ("AVX2", "avx2"), ("AVX512", "avx512f"),
    ("AVX512_VNNI", "avx512_vnni"), ("AVX512_BF16", "avx512_bf16"), ("AMX", "amx_tile"),
    ("AMX_FP16", "amx_fp16"))
_NAMES = [name for name, _ in ISAS]
_MAX_ISA = re.compile(r"--xla_cpu_max_isa=(\S+)")


def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_flags() -> frozenset[str]:
    """The processor's feature flags (/proc/cpuinfo's ``flags``; empty where unreadable)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_id() -> str:
    """The processor's name with its family, model and stepping where /proc/cpuinfo gives them,
    e.g. ``"AMD EPYC family 25 model 1 stepping 1"``."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or "unknown CPU"
    numbers = [f"{key} {info[key]}" for key in ("cpu family", "model", "stepping") if key in info]
    return " ".join([name, *(n.replace("cpu family", "family") for n in numbers)])


def isa(flags: Iterable[str] | None = None, xla_flags: str | None = None) -> str:
    """The newest instruction set XLA compiles CPU programs for on this machine.

    Args:
      flags: the processor's feature flags; default :func:`cpu_flags`.
      xla_flags: the ``XLA_FLAGS`` setting; default the environment's. Its last
        ``--xla_cpu_max_isa=NAME`` caps the result (names as :data:`ISAS`, any case); XLA warns
        about an unknown name and ignores it, and so does this function.

    Returns:
      One of :data:`ISAS`' names, or ``"none"`` where the processor reports none of them (not
      x86, or no /proc/cpuinfo).
    """
    flags = cpu_flags() if flags is None else frozenset(flags)
    xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    level = -1
    for index, (_, flag) in enumerate(ISAS):
        if flag not in flags:
            break
        level = index
    caps = _MAX_ISA.findall(xla_flags)
    if caps and caps[-1].upper() in _NAMES:
        level = min(level, _NAMES.index(caps[-1].upper()))
    return _NAMES[level] if level >= 0 else "none"


def cores() -> int:
    """The cores this process may run on (its CPU affinity): XLA sizes its CPU thread pool by
    them, and how a matrix product splits over the threads changes the order of its sums, so a
    training run's numbers depend on this count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def describe() -> str:
    """One line naming everything that decides this machine's CPU numbers, e.g.
    ``"x86_64 AMD EPYC family 25 model 1 stepping 1, XLA for AVX2, 2 cores, jax 0.10.2, jaxlib
    0.10.2 (cpu), matplotlib 3.11.2"``."""
    import jax  # noqa: PLC0415 - callers may set XLA_FLAGS before jax starts
    import jaxlib  # noqa: PLC0415
    import matplotlib  # noqa: PLC0415

    return (f"{platform.machine()} {cpu_id()}, XLA for {isa()}, {cores()} cores, "
            f"jax {jax.__version__}, jaxlib {jaxlib.__version__} ({jax.default_backend()}), "
            f"matplotlib {matplotlib.__version__}")
