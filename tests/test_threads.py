"""jaxlr.threads: LAPACK threads limited for the length of a whole-tree decomposition, restored
after, and left alone where the user says so. Thread counts are read with threadpoolctl itself."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl

import jaxlr
from jaxlr import svd

jnp.linalg.eigh(jnp.eye(2))  # jaxlib's LAPACK (SciPy's) is loaded from here on


def blas_threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpoolctl.threadpool_info()
            if lib["user_api"] == "blas"}


@pytest.fixture
def three_threads():
    """Every BLAS library at 3 threads (distinct from 1 and from this machine's default)."""
    with threadpoolctl.threadpool_limits(3, user_api="blas"):
        assert blas_threads() == {3}
        yield


@pytest.fixture
def seen(monkeypatch):
    """The BLAS thread counts in force while jaxlr's jitted whole-tree functions run."""
    counts: list[set[int]] = []
    for name in ("_jit_project_leaves", "_jit_first_projections", "_jit_factor_leaves",
                 "_jit_first_factors", "_jit_spectra"):
        original = getattr(svd, name)

        def spy(*args, original=original):
            counts.append(blas_threads())
            return original(*args)

        monkeypatch.setattr(svd, name, spy)
    return counts


def tree(count: int) -> dict:
    rng = np.random.default_rng(0)
    return {f"Dense_{i}": {"kernel": jnp.asarray(rng.standard_normal((12, 8)), jnp.float32)}
            for i in range(count)}


def four(params: dict) -> dict:
    return {f"{name}/kernel": 4 for name in params}


def test_block_sets_and_restores(three_threads):
    with jaxlr.threads.lapack_threads(1):
        assert blas_threads() == {1}
        with jaxlr.threads.lapack_threads(2):
            assert blas_threads() == {2}
        assert blas_threads() == {1}
    assert blas_threads() == {3}
    with pytest.raises(RuntimeError, match="inside"), jaxlr.threads.lapack_threads(1):
        raise RuntimeError("inside")
    assert blas_threads() == {3}


@pytest.mark.parametrize("entry", ["project", "compress", "spectra"])
def test_eager_tree_calls_use_one_thread_then_restore(three_threads, seen, entry):
    params = tree(3)
    if entry == "project":
        out = jaxlr.project(params, four(params))
        assert int(jnp.linalg.matrix_rank(out["Dense_1"]["kernel"])) == 4
    elif entry == "compress":
        jaxlr.compress(params, jaxlr.policies.fixed_ranks(params, 3))
    else:
        jaxlr.svd.singular_values(params)
    assert seen and all(counts == {1} for counts in seen)
    assert blas_threads() == {3}


def test_left_alone_for_one_matrix_traced_calls_and_user_blocks(three_threads, seen):
    jaxlr.project(tree(1), four(tree(1)))  # one matrix: both threads help a single decomposition
    jax.jit(lambda p: jaxlr.project(p, four(p)))(tree(3))  # traced: runs after jaxlr returns
    with jaxlr.threads.lapack_threads(None):
        jaxlr.project(tree(3), four(tree(3)))
    with jaxlr.threads.lapack_threads(2):
        jaxlr.project(tree(3), four(tree(3)))
    assert seen == [{3}, {3}, {2}]  # the jitted call does not go through the eager functions
    assert blas_threads() == {3}


def test_results_do_not_depend_on_threads():
    params = tree(4)
    limited = jaxlr.project(params, four(params))
    with jaxlr.threads.lapack_threads(None):
        free = jaxlr.project(params, four(params))
    for name in params:
        np.testing.assert_allclose(limited[name]["kernel"], free[name]["kernel"], rtol=1e-5,
                                   atol=1e-6)


def test_scopes_closed_out_of_order_in_threads_end_at_the_baseline(three_threads):
    opened, release = threading.Event(), threading.Event()

    def other() -> None:
        with jaxlr.threads.lapack_threads(2):
            opened.set()
            release.wait(10)

    worker = threading.Thread(target=other)
    block = jaxlr.threads.lapack_threads(1)
    block.__enter__()
    worker.start()
    assert opened.wait(10)
    block.__exit__(None, None, None)  # closes first, while the other thread's block is open
    release.set()
    worker.join(10)
    assert blas_threads() == {3}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="threads must be None or an integer >= 1"):
        jaxlr.threads.lapack_threads(bad).__enter__()
