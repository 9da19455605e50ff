"""Soak tests of this jaxlib's CPU decompositions: batched (vmapped) ``eigh`` and ``svd``, and
decompositions run at the same time from several Python threads.

jaxlr decomposes a tree's matrices one by one inside a ``jit`` because batched ``eigh`` once
deadlocked on a CPU build of jaxlib (``jaxlr.svd``'s module notes), and its eager calls run SVDs
as programs of their own from a pool of threads (``jaxlr.svd._side_by_side``). These tests run
thousands of calls of each kind in a subprocess bounded by a timeout, so a hang fails the suite
instead of stopping it, and check the results against numpy.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SOAK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    rng = np.random.default_rng(0)
    stacks = {n: rng.standard_normal((6, 2 * n, n)).astype(np.float32) for n in (16, 27, 64)}
    grams = {n: np.einsum("bij,bik->bjk", s, s) for n, s in stacks.items()}
    eigh = jax.jit(jax.vmap(jnp.linalg.eigh))
    svd = jax.jit(jax.vmap(lambda m: jnp.linalg.svd(m, full_matrices=False)))

    @jax.jit
    def loop(g):  # batched eigh inside a traced loop, as a whole-tree projection would run it
        return jax.lax.fori_loop(0, 20, lambda i, acc: acc + jnp.linalg.eigh(g)[0], 0 * g[..., 0])

    worst = 0.0
    for call in range(400):
        for n in stacks:
            w, v = eigh(grams[n])
            s = svd(stacks[n])[1]
            if call % 50 == 0:
                want_w = np.linalg.eigvalsh(grams[n].astype(np.float64))
                want_s = np.linalg.svd(stacks[n].astype(np.float64), compute_uv=False)
                worst = max(worst, float(np.max(np.abs(np.asarray(w) - want_w) / want_w.max())),
                            float(np.max(np.abs(np.asarray(s) - want_s) / want_s.max())))
                back = np.einsum("bij,bj,bkj->bik", np.asarray(v), np.asarray(w), np.asarray(v))
                worst = max(worst, float(np.max(np.abs(back - grams[n]) / want_w.max())))
    for n in stacks:
        total = np.asarray(loop(grams[n]))
        want = 20 * np.linalg.eigvalsh(grams[n].astype(np.float64))
        worst = max(worst, float(np.max(np.abs(total - want) / want.max())))
    print("CALLS", 400 * len(stacks) * 2 + 20 * len(stacks), "WORST", worst)
""")


def soak(script: str) -> dict[str, str]:
    """Runs ``script`` in a fresh interpreter under a timeout; the ``NAME value`` pairs it
    prints."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    words = done.stdout.split()
    return dict(zip(words[::2], words[1::2], strict=True))


def test_thousands_of_batched_eigh_and_svd_calls_finish_and_agree_with_numpy():
    printed = soak(SOAK)
    calls, worst = int(printed["CALLS"]), float(printed["WORST"])
    assert calls == 2460
    assert worst < 1e-4


CONCURRENT = textwrap.dedent("""
    from concurrent import futures
    import jax, jax.numpy as jnp, numpy as np, jaxlr
    from jaxlr import threads
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((3 * n, n)).astype(np.float32) for n in (8, 16, 27, 48, 64)]
    eigh = jax.jit(lambda g: jnp.linalg.eigh(g)[0])
    svd = jax.jit(lambda m: jnp.linalg.svd(m, full_matrices=False)[1])
    qr = jax.jit(lambda m: jnp.linalg.qr(m, mode="r"))

    def soak(seed):  # raw LAPACK calls of every kind, four threads at a time
        worst = 0.0
        for k in range(250):
            m = mats[(seed + k) % len(mats)]
            w, s, r = eigh(m.T @ m), svd(m), qr(m)
            if k % 25 == 0:
                want = np.linalg.svd(m.astype(np.float64), compute_uv=False)
                got_r = np.linalg.svd(np.asarray(r, np.float64), compute_uv=False)
                worst = max(worst, float(np.max(np.abs(np.sqrt(np.asarray(w)[::-1].clip(0))
                                                       - want)) / want[0]),
                            float(np.max(np.abs(np.asarray(s) - want)) / want[0]),
                            float(np.max(np.abs(got_r - want)) / want[0]))
        return 3 * 250, worst

    with jaxlr.threads.lapack_threads(1), futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(soak, range(4)))
    calls = sum(c for c, _ in results)
    worst = max(w for _, w in results)

    # jaxlr's own eager calls, four programs side by side: steep spectra send every matrix of
    # the auto call to the SVD fallback, the svd call splits the tree in four groups.
    threads.workers = lambda: 4
    tree = {}
    for i, n in enumerate((8, 16, 24, 32, 40, 48)):
        u, _ = np.linalg.qr(rng.standard_normal((2 * n, n)))
        v, _ = np.linalg.qr(rng.standard_normal((n, n)))
        tree[f"Dense_{i}"] = {"kernel": jnp.asarray((u * 0.1 ** np.arange(n)) @ v.T,
                                                    jnp.float32)}
    ranks = {f"{name}/kernel": 4 for name in tree}
    want, rejected = {}, 0
    for name, t in tree.items():
        u, s, vt = np.linalg.svd(np.asarray(t["kernel"], np.float64), full_matrices=False)
        alpha = np.sqrt(np.sum(s**2) / np.sum(s[:4] ** 2))
        want[name] = (u[:, :4] * alpha * s[:4]) @ vt[:4]
        estimate = np.finfo(np.float32).eps * s[0] ** 2 / ((s[3] - s[4]) * np.linalg.norm(s))
        rejected += bool(estimate > 2e-5)  # auto's estimate and threshold (jaxlr.svd)
    for k in range(150):
        method = ("auto", "svd")[k % 2]
        out = jaxlr.project(tree, ranks, options=jaxlr.ProjectionOptions(method=method))
        calls += len(tree)
        if k % 15 == 0:
            for name in tree:
                got = np.asarray(out[name]["kernel"], np.float64)
                worst = max(worst, float(np.linalg.norm(got - want[name])
                                         / np.linalg.norm(want[name])))
    print("CALLS", calls, "WORST", worst, "REJECTED", rejected)
""")


def test_thousands_of_decompositions_from_several_threads_finish_and_agree_with_numpy():
    printed = soak(CONCURRENT)
    calls, worst = int(printed["CALLS"]), float(printed["WORST"])
    assert calls == 4 * 3 * 250 + 150 * 6
    assert printed["REJECTED"] == "6"
    assert worst < 1e-4
