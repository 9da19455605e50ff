"""Eager whole-tree decompositions on the CPU run side by side (``jaxlr.svd._side_by_side``): the
SVDs as programs of their own from a pool of Python threads, the ``auto`` fallbacks after one
program has run every Gram path. Results are checked against float64 numpy, against the one
program the call ran before, and the programs that ran against the matrices whose Gram error
estimates numpy says are too large."""

from __future__ import annotations

import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlr
from jaxlr import svd, threads

TOLERANCE = 2e-5  # auto's threshold on the estimated relative Frobenius error (jaxlr.svd)


def with_spectrum(rows: int, cols: int, spectrum: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    return (u * spectrum) @ v.T


def mixed_tree() -> tuple[dict, dict[str, int]]:
    """Four matrices with a clear gap at their rank, which auto keeps on the Gram path, and three
    with singular values ``0.4**i``, steep enough for it to fall back to the SVD (numpy decides
    below), of different shapes; two of them wide."""
    shapes = [(96, 64), (120, 48), (40, 72), (64, 64), (80, 32), (30, 90), (48, 48)]
    tree, ranks = {}, {}
    for i, (rows, cols) in enumerate(shapes):
        k, rank = min(rows, cols), min(rows, cols) * 2 // 5
        if i % 2:
            spectrum = 0.4 ** np.arange(k)
        else:
            spectrum = np.where(np.arange(k) < rank, 1 + np.arange(k)[::-1] / k, 0.01)
        tree[f"Dense_{i}"] = {"kernel": jnp.asarray(with_spectrum(rows, cols, spectrum, i),
                                                    jnp.float32)}
        ranks[f"Dense_{i}/kernel"] = rank
    return tree, ranks


def numpy_projection(w: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    alpha = np.sqrt(np.sum(s**2) / np.sum(s[:rank] ** 2))  # energy transfer
    return (u[:, :rank] * (alpha * s[:rank])) @ vt[:rank]


def gram_rejected(w: np.ndarray, rank: int) -> bool:
    """auto's Davis-Kahan estimate, from the float64 spectrum."""
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    estimate = np.finfo(np.float32).eps * s[0] ** 2 / ((s[rank - 1] - s[rank]) *
                                                       np.linalg.norm(s))
    assert not TOLERANCE / 10 < estimate < TOLERANCE * 10, "too close to call"
    return estimate > TOLERANCE


def relative_error(got: jax.Array, want: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


@pytest.fixture
def lanes(monkeypatch):
    """Sets how many LAPACK calls run side by side, whatever this machine's cores, and lets the
    small matrices here take programs of their own (``test_only_large_fallbacks_...`` checks
    jaxlr's own threshold)."""
    def set_lanes(count: int, own_program_cost: float = 0.0) -> None:
        monkeypatch.setattr(threads, "workers", lambda: count)
        monkeypatch.setattr(svd, "_OWN_PROGRAM_COST", own_program_cost)
    return set_lanes


@pytest.fixture
def programs(monkeypatch):
    """``(name, shapes of the leaves, method, thread name)`` of every jitted whole-tree program
    an eager call runs."""
    runs: list[tuple[str, tuple, str | None, str]] = []
    for name, by_method in (("_jit_project_leaves", True), ("_jit_first_projections", False),
                            ("_jit_factor_leaves", True), ("_jit_first_factors", False),
                            ("_jit_spectra", False)):
        original = getattr(svd, name)

        def spy(*args, original=original, name=name, by_method=by_method):
            shapes = tuple(tuple(leaf.shape) for leaf in args[0])
            runs.append((name, shapes, args[1].method if by_method else None,
                         threading.current_thread().name))
            return original(*args)

        monkeypatch.setattr(svd, name, spy)
    return runs


def test_auto_runs_the_gram_paths_once_then_the_fallbacks_side_by_side(lanes, programs):
    tree, ranks = mixed_tree()
    lanes(2)
    out = jaxlr.project(tree, ranks)
    rejected = {tuple(tree[k.split("/")[0]]["kernel"].shape) for k, r in ranks.items()
                if gram_rejected(np.asarray(tree[k.split("/")[0]]["kernel"]), r)}
    assert len(rejected) == 3  # the three decayed matrices, and only they
    first = [run for run in programs if run[0] == "_jit_first_projections"]
    again = [run for run in programs if run[0] == "_jit_project_leaves"]
    assert len(first) == 1 and len(first[0][1]) == 7
    assert sorted(run[1][0] for run in again) == sorted(rejected)
    assert all(len(run[1]) == 1 and run[2] == "svd" for run in again)
    assert all(run[3].startswith("jaxlr-lapack") for run in again)
    for key, rank in ranks.items():
        name = key.split("/")[0]
        want = numpy_projection(np.asarray(tree[name]["kernel"]), rank)
        assert relative_error(out[name]["kernel"], want) < 1e-4, name


def test_side_by_side_gives_the_one_programs_results(lanes):
    tree, ranks = mixed_tree()
    for method in ("auto", "svd"):
        options = jaxlr.ProjectionOptions(method=method)
        lanes(1)
        one = jaxlr.project(tree, ranks, options=options)
        lanes(3)
        many = jaxlr.project(tree, ranks, options=options)
        for name in tree:
            np.testing.assert_allclose(many[name]["kernel"], one[name]["kernel"], rtol=1e-5,
                                       atol=1e-6, err_msg=f"{method} {name}")


def test_svd_splits_the_tree_into_balanced_groups(lanes, programs):
    tree, ranks = mixed_tree()
    lanes(3)
    out = jaxlr.project(tree, ranks, options=jaxlr.ProjectionOptions(method="svd"))
    groups = [run[1] for run in programs]
    assert len(groups) == 3 and all(run[2] == "svd" for run in programs)
    assert sorted(itertools.chain(*groups)) == sorted(tuple(t["kernel"].shape)
                                                      for t in tree.values())
    for key, rank in ranks.items():
        name = key.split("/")[0]
        want = numpy_projection(np.asarray(tree[name]["kernel"]), rank)
        assert relative_error(out[name]["kernel"], want) < 1e-5, name


@pytest.mark.parametrize("method", ["svd", "auto"])
def test_compress_side_by_side_matches_numpy(lanes, programs, method):
    tree, ranks = mixed_tree()
    lanes(2)
    compressed, report = jaxlr.compress(
        tree, ranks, options=jaxlr.ProjectionOptions(method=method))
    assert len(programs) >= 2  # groups, or the Gram program and the fallbacks
    for key, rank in ranks.items():
        name = key.split("/")[0]
        w = np.asarray(tree[name]["kernel"], np.float64)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        node = compressed[name]["kernel"]
        got = np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)
        want = (u[:, :rank] * s[:rank]) @ vt[:rank]
        assert relative_error(got, want) < 1e-4, name
        assert report.layers[key].rank == rank


def test_spectra_side_by_side_match_numpy(lanes, programs):
    tree, _ = mixed_tree()
    lanes(2)
    spectra = jaxlr.svd.singular_values(tree, filter="all")
    assert len(programs) == 2
    for name, t in tree.items():
        want = np.linalg.svd(np.asarray(t["kernel"], np.float64), compute_uv=False)
        np.testing.assert_allclose(spectra[f"{name}/kernel"], want, rtol=0,
                                   atol=2e-6 * want[0])


@pytest.mark.parametrize("entry", ["project_auto", "project_svd", "compress", "spectra"])
def test_a_nonfinite_matrix_is_named_side_by_side(lanes, entry):
    tree, ranks = mixed_tree()
    tree["Dense_4"]["kernel"] = tree["Dense_4"]["kernel"].at[3, 5].set(jnp.nan)
    lanes(2)
    with pytest.raises(ValueError, match="Dense_4/kernel") as raised:
        if entry == "compress":
            jaxlr.compress(tree, ranks)
        elif entry == "spectra":
            jaxlr.svd.singular_values(tree, filter="all")
        else:
            method = entry.split("_")[1]
            jaxlr.project(tree, ranks, options=jaxlr.ProjectionOptions(method=method))
    assert "Dense_3" not in str(raised.value)


def test_only_large_fallbacks_get_programs_of_their_own(lanes, programs):
    """Of two matrices that fall back, the one whose SVD costs ``m n min(m, n) >= 2**23`` runs as
    a program of its own, the small one inline in the Gram program; a tree of small matrices runs
    as one program."""
    tree = {"small": {"kernel": jnp.asarray(with_spectrum(96, 64, 0.4 ** np.arange(64), 0),
                                            jnp.float32)},
            "large": {"kernel": jnp.asarray(with_spectrum(700, 128, 0.4 ** np.arange(128), 1),
                                            jnp.float32)}}
    ranks = {"small/kernel": 20, "large/kernel": 20}
    assert 96 * 64 * 64 < 2**23 <= 700 * 128 * 128
    assert all(gram_rejected(np.asarray(t["kernel"]), 20) for t in tree.values())
    lanes(2, float(2**23))
    out = jaxlr.project(tree, ranks)
    assert [(run[0], run[1]) for run in programs] == [
        ("_jit_first_projections", ((700, 128), (96, 64))),  # in the tree's (sorted) order
        ("_jit_project_leaves", ((700, 128),))]
    for name, t in tree.items():
        want = numpy_projection(np.asarray(t["kernel"]), 20)
        assert relative_error(out[name]["kernel"], want) < 1e-4, name
    programs.clear()
    small, _ = mixed_tree()
    jaxlr.project(small, {f"{k}/kernel": 4 for k in small})
    jaxlr.project(small, {f"{k}/kernel": 4 for k in small},
                  options=jaxlr.ProjectionOptions(method="svd"))
    assert [(run[0], len(run[1]), run[2]) for run in programs] == [
        ("_jit_project_leaves", 7, "auto"), ("_jit_project_leaves", 7, "svd")]


def test_gram_and_one_matrix_stay_one_program(lanes, programs):
    tree, ranks = mixed_tree()
    lanes(4)
    jaxlr.project(tree, ranks, options=jaxlr.ProjectionOptions(method="gram"))
    jaxlr.project({"Dense_0": tree["Dense_0"]}, {"Dense_0/kernel": 5})
    assert [(run[0], len(run[1]), run[2]) for run in programs] == [
        ("_jit_project_leaves", 7, "gram"), ("_jit_project_leaves", 1, "auto")]


# --- the pieces in jaxlr.threads ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_balanced_groups_are_within_grahams_bound_of_the_best(seed):
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 100, size=int(rng.integers(1, 9))).astype(float).tolist()
    bins = int(rng.integers(1, 5))
    groups = threads.balanced(costs, bins)
    assert sorted(itertools.chain(*groups)) == list(range(len(costs)))
    assert 1 <= len(groups) <= min(bins, len(costs)) and all(groups)
    assert all(g == sorted(g) for g in groups)
    totals = [sum(costs[i] for i in g) for g in groups]
    assert totals == sorted(totals, reverse=True)
    best = min(max(sum(c for c, b in zip(costs, assign, strict=True) if b == k)
                   for k in range(bins))
               for assign in itertools.product(range(bins), repeat=len(costs)))
    assert max(totals) <= (4 / 3 - 1 / (3 * bins)) * best + 1e-9  # Graham's bound for LPT


def test_concurrently_runs_the_calls_at_once_and_keeps_their_order():
    meeting = threading.Barrier(3, timeout=10)  # only met if three calls run at the same time

    def call(i: int) -> jax.Array:
        meeting.wait()
        return jnp.full((2,), i)

    done = threads.concurrently([lambda i=i: call(i) for i in range(3)], 3)
    assert [int(x[0]) for x in done] == [0, 1, 2]
    assert [int(x[0]) for x in threads.concurrently([lambda: jnp.ones(1)] * 2, 1)] == [1, 1]


def test_concurrently_raises_a_calls_exception_after_all_finished():
    finished = []

    def slow() -> int:
        threading.Event().wait(0.2)
        finished.append(True)
        return 1

    def bad() -> int:
        raise RuntimeError("call failed")

    with pytest.raises(RuntimeError, match="call failed"):
        threads.concurrently([bad, slow], 2)
    assert finished == [True]


def test_workers_are_the_cores_over_the_threads_per_call():
    with jaxlr.threads.lapack_threads(1):
        assert threads.workers() == threads.cores()
    with jaxlr.threads.lapack_threads(2):
        assert threads.workers() == max(1, threads.cores() // 2)
    with jaxlr.threads.lapack_threads(threads.cores() + 1):
        assert threads.workers() == 1
