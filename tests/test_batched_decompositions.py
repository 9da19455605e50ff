"""Soak test of batched (vmapped) ``eigh`` and ``svd`` on this jaxlib's CPU backend.

jaxlr decomposes a tree's matrices one by one inside a ``jit`` because batched ``eigh`` once
deadlocked on a CPU build of jaxlib (``jaxlr.svd``'s module notes). This test runs thousands of
batched calls, and batched calls inside a jitted loop over same-shape stacks, in a subprocess
bounded by a timeout, so a hang fails the suite instead of stopping it, and checks every result
against numpy.
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


def test_thousands_of_batched_eigh_and_svd_calls_finish_and_agree_with_numpy():
    done = subprocess.run([sys.executable, "-c", SOAK], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    words = done.stdout.split()
    calls, worst = int(words[words.index("CALLS") + 1]), float(words[words.index("WORST") + 1])
    assert calls == 2460
    assert worst < 1e-4
