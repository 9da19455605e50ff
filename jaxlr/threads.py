"""Threads of the LAPACK library behind JAX's CPU decompositions.

On the CPU, ``jnp.linalg.eigh``, ``svd`` and ``qr`` run LAPACK (jaxlib calls the BLAS/LAPACK
library SciPy ships, OpenBLAS by default), which starts its own threads for every call. XLA runs
the Gram products on its own threads, on every core, and overlaps some decompositions with them,
so a projection of a whole tree ends up with more busy threads than cores, and takes longer with
more LAPACK threads than with one (``experiments/benchmarks/svd_projection.py``; the figures are
in BENCHMARKS.md). (The LAPACK calls of one jitted program mostly run one after the other, where
programs dispatched from several Python threads run side by side; ``svd_projection --parts``.)

jaxlr's eager entry points (:func:`jaxlr.project`, :func:`jaxlr.compress`,
:func:`jaxlr.gsvt_ranks`, ...) therefore run their decompositions with one
LAPACK thread when they decompose two matrices or more on CPU devices, and give the library its
previous setting back before they return (they wait for their results to do so). Nothing else is
changed, and nothing outside the call: the limit is not in force after it returns. Within the
call their SVDs run as several programs at once, from a pool of as many Python threads as there
are cores per LAPACK call's threads (:func:`workers`; ``jaxlr.svd``'s module notes).

Inside your own ``jax.jit`` (an LRPET training step) the decompositions run when the compiled step
runs, after jaxlr's code has returned; wrap the training loop in :func:`lapack_threads` to get the
same effect there. :func:`lapack_threads` with ``None`` turns jaxlr's automatic limit off inside
its block.

Example:
    >>> import jax, jaxlr
    >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (64, 32))},
    ...           "Dense_1": {"kernel": jax.random.normal(jax.random.key(1), (32, 16))}}
    >>> with jaxlr.threads.lapack_threads(1):  # e.g. around a CPU training loop that projects
    ...     low = jaxlr.project(params, {"Dense_0/kernel": 8, "Dense_1/kernel": 4})
    >>> [int(jax.numpy.linalg.matrix_rank(low[k]["kernel"])) for k in ("Dense_0", "Dense_1")]
    [8, 4]
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import jax

__all__ = ["lapack_threads"]

_lock = threading.RLock()
_controller: Any = None
_user_scopes = 0  # open lapack_threads blocks: jaxlr's automatic limit stays out of their way
_open = 0  # scopes of either kind open in any thread
_baseline: list[int] = []  # the thread counts before the first open scope


def _blas() -> Any:
    """The threadpoolctl controller of the BLAS libraries loaded in this process, built once
    (after SciPy's LAPACK, which jaxlib calls, is loaded)."""
    global _controller
    if _controller is None:
        import scipy.linalg  # noqa: F401, PLC0415  (jaxlib's LAPACK: load it before looking)
        import threadpoolctl  # noqa: PLC0415

        _controller = threadpoolctl.ThreadpoolController().select(user_api="blas")
    return _controller


def _check_threads(threads: Any) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
    return threads


@contextlib.contextmanager
def lapack_threads(threads: int | None = 1) -> Iterator[None]:
    """Runs its block with at most ``threads`` LAPACK/BLAS threads per call, then restores the
    previous setting.

    Use it around code whose decompositions run after jaxlr has returned: a jitted LRPET training
    step, your own ``jax.jit`` of :func:`jaxlr.project`. Inside the block jaxlr's eager entry
    points leave the setting alone (they otherwise limit it to 1 for the length of a call that
    decomposes two matrices or more, see :mod:`jaxlr.threads`). The setting is per process:
    other Python threads' NumPy/SciPy calls see it while the block runs. JAX's asynchronous
    dispatch means a step launched in the block may still run after it: call
    ``jax.block_until_ready`` on the last results inside it.

    Args:
        threads: the largest number of threads per LAPACK/BLAS call, ``>= 1``; ``None`` changes
            nothing and only turns jaxlr's automatic limit off inside the block.

    Raises:
        ValueError: ``threads`` is neither ``None`` nor an integer ``>= 1``.

    Example:
        >>> import jax.numpy as jnp, jaxlr
        >>> with jaxlr.threads.lapack_threads(1):
        ...     w = jnp.linalg.eigh(jnp.eye(3))[0].block_until_ready()
        >>> w.tolist()
        [1.0, 1.0, 1.0]
    """
    threads = _check_threads(threads)
    global _user_scopes
    with _lock:
        previous = _enter(threads)
        _user_scopes += 1
    try:
        yield
    finally:
        with _lock:
            _user_scopes -= 1
            _exit(previous)


def _enter(threads: int | None) -> list[int]:
    """Opens a scope limiting every BLAS library to ``threads`` (None: as they are); returns the
    counts it found."""
    global _open, _baseline
    libraries = _blas().lib_controllers
    previous = [lib.get_num_threads() for lib in libraries]
    if _open == 0:
        _baseline = previous
    _open += 1
    if threads is not None:
        for lib in libraries:
            lib.set_num_threads(threads)
    return previous


def _exit(previous: list[int]) -> None:
    """Closes a scope: the counts it found, or the baseline once no scope is open (scopes of
    several Python threads need not close in order)."""
    global _open
    _open -= 1
    for lib, count in zip(_blas().lib_controllers, _baseline if _open == 0 else previous,
                          strict=True):
        lib.set_num_threads(count)


def on_cpu(leaves: Sequence[Any]) -> bool:
    """Whether the decompositions of ``leaves`` run on CPU devices."""
    placed = [x for x in jax.tree.leaves(leaves)
              if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)]
    if not placed:
        return jax.default_backend() == "cpu"
    return all(d.platform == "cpu" for x in placed for d in x.devices())


@contextlib.contextmanager
def one_per_call(count: int, leaves: Sequence[Any]) -> Iterator[bool]:
    """jaxlr's automatic limit: one LAPACK thread per call while the block runs, where it
    decomposes ``count >= 2`` matrices on CPU devices and no :func:`lapack_threads` block is open.
    Yields whether it limits; if so, the block must wait for its results
    (``jax.block_until_ready``) before it ends."""
    with _lock:
        active = _user_scopes == 0 and count >= 2 and on_cpu(leaves)
        if active:
            previous = _enter(1)
    try:
        yield active
    finally:
        if active:
            with _lock:
                _exit(previous)


def run_limited(fn: Any, count: int, leaves: Sequence[Any], *args: Any) -> Any:
    """``fn(*args)`` under :func:`one_per_call` (``count`` matrices of ``leaves``), finished
    before the limit is lifted."""
    with one_per_call(count, leaves) as limited:
        out = fn(*args)
        return jax.block_until_ready(out) if limited else out


def cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def workers() -> int:
    """How many LAPACK calls fit side by side: the cores over the threads each call starts now
    (all the cores under jaxlr's automatic limit or ``lapack_threads(1)``)."""
    counts = [lib.get_num_threads() for lib in _blas().lib_controllers]
    return max(1, cores() // max(counts, default=1))


def balanced(costs: Sequence[float], bins: int) -> list[list[int]]:
    """The indices of ``costs`` in at most ``bins`` groups of about equal total cost (largest
    first, each into the group with the least so far), each group in index order, the costliest
    group first; no group is empty."""
    totals = [0.0] * max(1, min(bins, len(costs)))
    groups: list[list[int]] = [[] for _ in totals]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        least = min(range(len(totals)), key=lambda b: (totals[b], b))
        totals[least] += costs[i]
        groups[least].append(i)
    order = sorted(range(len(groups)), key=lambda b: (-totals[b], b))
    return [sorted(groups[b]) for b in order if groups[b]]


def concurrently(calls: Sequence[Callable[[], Any]], threads: int) -> list[Any]:
    """Each call's finished result (``jax.block_until_ready``), in the calls' order, running up
    to ``threads`` of them at once from a pool of Python threads, in the order given.

    XLA's CPU runtime runs the LAPACK calls of one program one after the other, and a program
    dispatched asynchronously runs before the next one starts; programs dispatched from separate
    Python threads run side by side (``experiments/benchmarks/svd_projection.py --parts`` times
    both ways; BENCHMARKS.md). The first exception of
    a call is raised here, once every call has finished."""
    def finished(call: Callable[[], Any]) -> Any:
        return jax.block_until_ready(call())

    if threads <= 1 or len(calls) <= 1:
        return [finished(call) for call in calls]
    with futures.ThreadPoolExecutor(min(threads, len(calls)),
                                    thread_name_prefix="jaxlr-lapack") as pool:
        running = [pool.submit(finished, call) for call in calls]
        return [job.result() for job in running]
