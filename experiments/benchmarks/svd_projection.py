"""Benchmark: LRPET projection with energy transfer of every conv matrix of VGG-16 and ResNet-56.

jaxlr's tree-level call (:func:`jaxlr.project`: jitted programs for the whole tree) against
per-layer loops, all timed in this process on the same weights:

* ``torch reference``: what both reference implementations do per layer: the kernel in torch's
  layout as a ``cout x (cin*kh*kw)`` matrix, ``torch.linalg.svd(full_matrices=False)``, energy
  transfer on ``S``, and ``U @ diag(S) @ V^T`` rebuilt with the tail of ``S`` set to zero.
* ``torch tuned``: the same SVD on the tall ``(kh*kw*cin) x cout`` matrix, rebuilt from the kept
  ``r`` triplets only (the fastest torch loop we found).
* ``numpy``: ``np.linalg.svd`` per layer, rebuilt from the kept triplets.

Weights are He-normal (a network at the start of LRPET training: flat spectra), "projected" (the
He-normal matrix projected to the rank at hand plus 5% He-normal noise: what LRPET sees at every
projection after the first, a clear gap at the cut) or "decayed" (singular values ``s_i = 0.97^i``
with no gap anywhere: the worst case for the Gram path, where ``auto`` mostly falls back to the
SVD). Errors are relative Frobenius errors against a float64 numpy reference, the largest over the
tree's matrices. Times are medians of at least ``--repeats`` calls, and of more for short calls,
until 0.2 s of them (:func:`block_medians`: each method in a block of its own).

The arithmetic floor is measured here too: the Gram products and rank-``r`` rebuilds at this
machine's float32 GEMM rate (a jitted 2048-cubed product) plus, per matrix, the time of an
``eigh`` of its size without the cost of a call (:func:`eigh_seconds`: batched below 256, one
LAPACK thread or the default). jaxlr's eager call runs its decompositions
with one LAPACK thread each (:mod:`jaxlr.threads`) and its SVDs side by side, from a pool of
threads (``jaxlr.svd._side_by_side``); the same call with LAPACK's own thread count, and as one
program (:func:`one_program`: its SVDs one after the other), are timed as well.

Run (torch comes with the ``compare`` extra)::

    python -m experiments.benchmarks.svd_projection --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxlr
from experiments.benchmarks import write_rows
from jaxlr import threads as jaxlr_threads

VGG16_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def vgg16_conv_shapes() -> dict[str, tuple[int, ...]]:
    """Conv kernel shapes of VGG-16 for CIFAR (13 convolutions, 3x3), Flax layout."""
    shapes, cin = {}, 3
    for i, cout in enumerate(VGG16_CHANNELS):
        shapes[f"Conv_{i}"] = (3, 3, cin, cout)
        cin = cout
    return shapes


def resnet56_conv_shapes() -> dict[str, tuple[int, ...]]:
    """Conv kernel shapes of ResNet-56 for CIFAR (option-A shortcuts: 55 convolutions)."""
    shapes = {"conv_init": (3, 3, 3, 16)}
    cin = 16
    for stage, width in enumerate((16, 32, 64)):
        for block in range(9):
            shapes[f"stage{stage}_block{block}/conv1"] = (3, 3, cin, width)
            shapes[f"stage{stage}_block{block}/conv2"] = (3, 3, width, width)
            cin = width
    return shapes


def make_tree(
    shapes: dict[str, tuple[int, ...]], kind: str, ratio: float = 0.6, seed: int = 0
) -> dict[str, Any]:
    """A params tree ``{module: {'kernel': array}}`` of float32 kernels ('/' in names nests)."""
    rng = np.random.default_rng(seed)
    tree: dict[str, Any] = {}
    for name, shape in shapes.items():
        m, n = int(np.prod(shape[:-1])), shape[-1]
        if kind == "he":
            matrix = rng.standard_normal((m, n)) * np.sqrt(2.0 / m)
        elif kind == "projected":
            he = rng.standard_normal((m, n)) * np.sqrt(2.0 / m)
            rank = jaxlr.policies.local_rank(min(m, n), prune=ratio)
            u, s, vt = np.linalg.svd(he, full_matrices=False)
            noise = rng.standard_normal((m, n)) * np.sqrt(2.0 / m)
            matrix = (u[:, :rank] * s[:rank]) @ vt[:rank] + 0.05 * noise
        elif kind == "decayed":
            k = min(m, n)
            u, _ = np.linalg.qr(rng.standard_normal((m, k)))
            v, _ = np.linalg.qr(rng.standard_normal((n, k)))
            matrix = (u * 0.97 ** np.arange(k)) @ v.T
        else:
            raise ValueError(f"kind must be 'he', 'projected' or 'decayed', got {kind!r}.")
        node = tree
        *parents, leaf = name.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = {"kernel": jnp.asarray(matrix.reshape(shape), jnp.float32)}
    return tree


def _median_seconds(run: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def block_medians(runs: dict[str, Callable[[], Any]], repeats: int, min_seconds: float = 0.2,
                  max_calls: int = 200, pause: float = 0.5) -> dict[str, float]:
    """The median time of each of ``runs``, each timed in a block of its own after one call that
    sizes it: ``repeats`` calls, or more (up to ``max_calls``) until the block has taken
    ``min_seconds``, so the few-millisecond calls of a small network are not judged on five
    samples. Blocks, not alternated calls: libraries with thread pools of their own slow each
    other down when alternated (torch's OpenMP threads keep spinning after a call; alternated
    with jaxlr's calls, ResNet-56's torch loop took 3 to 5 times as long), and each block starts
    after a ``pause`` of that many seconds, for the threads of the previous one to go idle. The
    runs must be warm (compiled) already."""
    if repeats < 1 or not runs:
        raise ValueError(f"need repeats >= 1 and at least one run, got {repeats} and {list(runs)}.")
    medians = {}
    for name, run in runs.items():
        time.sleep(pause)
        first = _seconds(run)
        calls = max(repeats, min(max_calls, math.ceil(min_seconds / max(first, 1e-9))))
        medians[name] = float(np.median([_seconds(run) for _ in range(calls)]))
    return medians


def _reference(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    kept = s[:rank] * np.sqrt(np.sum(s**2) / np.sum(s[:rank] ** 2))
    return (u[:, :rank] * kept) @ vt[:rank]


def _max_error(results: list[np.ndarray], references: list[np.ndarray]) -> float:
    return max(
        float(np.linalg.norm(r.astype(np.float64) - t) / np.linalg.norm(t))
        for r, t in zip(results, references, strict=True)
    )


def gemm_rate(repeats: int, size: int = 2048) -> float:
    """This machine's float32 matrix-product rate (flop/s): a jitted ``size``-cubed product,
    XLA's threads, the fastest of ``repeats`` runs."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    jax.block_until_ready(product(a))
    best = min(_seconds(lambda: jax.block_until_ready(product(a))) for _ in range(repeats))
    return 2 * size**3 / best


def eigh_seconds(size: int, repeats: int) -> float:
    """The time of one ``eigh`` of a ``size`` x ``size`` Gram matrix with as little as can be
    measured around it: the least of the medians of one call on one matrix and, below size 256,
    of one call on ``copies = 256 // size`` of them divided by ``copies`` (jaxlib's CPU ``eigh``
    runs LAPACK once per matrix of a batch, so this takes the cost of a call away where it
    counts), each with one LAPACK thread and with the library's default."""
    w = np.random.default_rng(size).standard_normal((9 * size, size))
    eigh = jax.jit(jnp.linalg.eigh)
    times = []
    for copies in sorted({1, max(1, 256 // size)}):
        gram = jnp.asarray(np.broadcast_to(w.T @ w, (copies, size, size)), jnp.float32)
        jax.block_until_ready(eigh(gram))
        for threads in (1, None):
            with jaxlr.threads.lapack_threads(threads):
                jax.block_until_ready(eigh(gram))
                run = lambda gram=gram: jax.block_until_ready(eigh(gram))  # noqa: E731
                times.append(_median_seconds(run, repeats) / copies)
    return min(times)


def floor_seconds(shapes: list[tuple[int, int]], ranks: list[int], rate: float,
                  eigh_s: dict[int, float]) -> float:
    """The arithmetic floor of a whole-tree projection on the Gram path: per matrix, the Gram
    product (``2 m n^2`` flops for ``m >= n``), ``W V_r`` and the rank-``r`` rebuild (``4 m n r``)
    at ``rate``, plus one ``eigh`` of its ``n`` (``eigh_s``, :func:`eigh_seconds`)."""
    total = 0.0
    for (rows, cols), rank in zip(shapes, ranks, strict=True):
        m, n = max(rows, cols), min(rows, cols)
        total += (2 * m * n * n + 4 * m * n * rank) / rate + eigh_s[n]
    return total


def _seconds(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


@contextlib.contextmanager
def one_program() -> Iterator[None]:
    """jaxlr's eager calls as one program each, their SVDs one after the other (what they did
    before 2026-11-24), instead of side by side (``jaxlr.svd._side_by_side``)."""
    saved = jaxlr_threads.workers
    jaxlr_threads.workers = lambda: 1
    try:
        yield
    finally:
        jaxlr_threads.workers = saved


def bench_tree(name: str, tree: dict[str, Any], ratio: float, repeats: int,
               rate: float | None = None) -> dict[str, Any]:
    ranks = jaxlr.lsvt_ranks(tree, prune=ratio, filter="all")
    leaves = jaxlr.selection.matrix_leaves(tree, filter="all")
    flat = jax.tree_util.tree_leaves(tree)
    kernels = {path: np.asarray(flat[leaf.index]) for path, leaf in leaves.items()}
    tall = {path: k.reshape(-1, k.shape[-1]) for path, k in kernels.items()}
    references = [_reference(tall[p], ranks[p]) for p in kernels]
    row: dict[str, Any] = {"model": name, "matrices": len(kernels), "ratio": ratio}
    if rate is not None:
        sizes = sorted({min(m.shape) for m in tall.values()})
        eigh_s = {n: eigh_seconds(n, repeats) for n in sizes}
        row["gemm_gflops"] = rate / 1e9
        row["eigh_s"] = eigh_s
        row["floor_s"] = floor_seconds([m.shape for m in tall.values()],
                                       [ranks[p] for p in tall], rate, eigh_s)

    # How many matrices `auto` keeps on the Gram path (its error estimate under the tolerance).
    estimate = jax.jit(jaxlr._linalg.gram_subspace, static_argnums=1)  # noqa: SLF001 - diagnostics
    tolerance = jaxlr._linalg.GRAM_TOLERANCE  # noqa: SLF001
    row["gram_accepted"] = sum(
        float(estimate(jnp.asarray(tall[p]), ranks[p])[1]) <= tolerance for p in kernels
    )

    runs: dict[str, Callable[[], Any]] = {}  # timed at the end, each in a block of its own
    for method in ("auto", "gram", "svd"):

        def run(method: str = method) -> Any:
            return jax.block_until_ready(
                jaxlr.project(tree, ranks, options=jaxlr.ProjectionOptions(method=method))
            )

        start = time.perf_counter()
        out = run()
        row[f"jaxlr_{method}_first_call_s"] = time.perf_counter() - start
        runs[f"jaxlr_{method}_s"] = run
        flat_out = jax.tree_util.tree_leaves(out)
        results = [
            np.asarray(flat_out[leaf.index]).reshape(tall[p].shape) for p, leaf in leaves.items()
        ]
        row[f"jaxlr_{method}_max_rel_error"] = _max_error(results, references)

    def free_threads() -> Any:  # the same call with LAPACK's own thread count
        with jaxlr.threads.lapack_threads(None):
            return jax.block_until_ready(jaxlr.project(tree, ranks))

    runs["jaxlr_auto_free_threads_s"] = free_threads
    for method in ("auto", "svd"):

        def in_one(method: str = method) -> Any:
            with one_program():
                return jax.block_until_ready(
                    jaxlr.project(tree, ranks, options=jaxlr.ProjectionOptions(method=method)))

        runs[f"jaxlr_{method}_one_program_s"] = in_one

    def numpy_loop() -> list[np.ndarray]:
        out = []
        for path, matrix in tall.items():
            rank = ranks[path]
            u, s, vt = np.linalg.svd(matrix, full_matrices=False)
            kept = s[:rank] * np.sqrt(np.sum(s**2) / np.sum(s[:rank] ** 2))
            out.append((u[:, :rank] * kept) @ vt[:rank])
        return out

    runs["numpy_s"] = numpy_loop
    row["numpy_max_rel_error"] = _max_error(numpy_loop(), references)

    try:
        import torch
    except ImportError:
        row["torch"] = "not installed (pip install -e '.[compare]')"
        row.update(block_medians(runs, repeats))
        return row

    torch_wide = {  # torch's (cout, cin, kh, kw) layout, viewed as cout x (cin*kh*kw)
        p: torch.from_numpy(np.array(k.transpose(3, 2, 0, 1).reshape(k.shape[-1], -1), copy=True))
        for p, k in kernels.items()
    }
    torch_tall = {p: torch.from_numpy(np.array(m, copy=True)) for p, m in tall.items()}

    def torch_reference() -> list[Any]:
        out = []
        for path, matrix in torch_wide.items():
            rank = ranks[path]
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            alpha = torch.sqrt(s.pow(2).sum() / s[:rank].pow(2).sum())
            s = torch.cat([s[:rank] * alpha, torch.zeros_like(s[rank:])])
            out.append(u @ torch.diag(s) @ vh)
        return out

    def torch_tuned() -> list[Any]:
        out = []
        for path, matrix in torch_tall.items():
            rank = ranks[path]
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            kept = s[:rank] * torch.sqrt(s.pow(2).sum() / s[:rank].pow(2).sum())
            out.append((u[:, :rank] * kept) @ vh[:rank])
        return out

    runs["torch_reference_s"], runs["torch_tuned_s"] = torch_reference, torch_tuned
    wide_results = [  # back from (cout, cin, kh, kw) to the tall (kh*kw*cin, cout) matrix
        r.numpy()
        .reshape(k.shape[3], k.shape[2], k.shape[0], k.shape[1])
        .transpose(2, 3, 1, 0)
        .reshape(tall[p].shape)
        for r, (p, k) in zip(torch_reference(), kernels.items(), strict=True)
    ]
    row["torch_reference_max_rel_error"] = _max_error(wide_results, references)
    row["torch_tuned_max_rel_error"] = _max_error([r.numpy() for r in torch_tuned()], references)
    row["torch_threads"] = torch.get_num_threads()
    row["torch_version"] = torch.__version__
    row.update(block_medians(runs, repeats))
    return row


def decomposition_parts(rows: int = 4608, cols: int = 512, ratio: float = 0.6,
                        repeats: int = 5) -> dict[str, Any]:
    """Where one ``rows x cols`` matrix with ``decayed`` spectrum (``0.97^i``, the worst case of
    the Gram path) spends its time: jaxlr's steps (the Gram product, its ``eigh``, the QR
    reduction and the SVD of its ``cols x cols`` factor that the SVD path runs) against torch's
    (``torch.linalg.qr``, the SVD of that factor, the SVD of the whole matrix), and the whole
    projection by each; and four QR reductions of it in one jitted program against one call each
    from four Python threads (XLA runs the LAPACK calls of one program one after the other).
    Medians in seconds (:func:`block_medians`), the decompositions with one LAPACK thread on
    both sides, matrix products with each library's own threads."""
    rank = max(1, math.floor(cols - ratio * cols))
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    matrix = (u * 0.97 ** np.arange(cols)) @ v.T
    a = jnp.asarray(matrix, jnp.float32)
    gram = jax.jit(lambda x: jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST))
    eigh = jax.jit(jnp.linalg.eigh)
    qr = jax.jit(lambda x: jnp.linalg.qr(x, mode="r"))
    square_svd = jax.jit(lambda r: jaxlr._linalg.thin_svd(r))
    project = {method: jax.jit(lambda x, method=method: jaxlr.svd.project_matrix(x, rank,
                                                                             method=method))
               for method in ("svd", "auto", "gram")}
    g, r = gram(a), qr(a)
    calls = {"jaxlr_gram_product_s": lambda: gram(a), "jaxlr_eigh_s": lambda: eigh(g),
             "jaxlr_qr_s": lambda: qr(a), "jaxlr_square_svd_s": lambda: square_svd(r),
             **{f"jaxlr_project_{m}_s": lambda fn=fn: fn(a) for m, fn in project.items()}}
    runs = {name: lambda call=call: jax.block_until_ready(call()) for name, call in calls.items()}
    # Four QR reductions: in one jitted program, and one call each from four Python threads.
    four = jax.jit(lambda *xs: [jnp.linalg.qr(x, mode="r") for x in xs])
    copies = [a + i for i in range(4)]

    def four_threads() -> None:
        workers = [threading.Thread(target=lambda x=x: jax.block_until_ready(qr(x)))
                   for x in copies]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    runs["jaxlr_4_qr_one_program_s"] = lambda: jax.block_until_ready(four(*copies))
    runs["jaxlr_4_qr_four_threads_s"] = four_threads
    for run in runs.values():
        run()  # compile
    with jaxlr.threads.lapack_threads(1):
        medians = block_medians(runs, repeats)
    out = {"shape": f"{rows} x {cols}", "rank": rank, **medians}
    try:
        import torch
    except ImportError:
        return out
    t = torch.from_numpy(np.asarray(matrix, np.float32))
    t_r, t_gram = torch.linalg.qr(t, mode="r")[1], t.T @ t

    def torch_project() -> Any:
        tu, ts, tvh = torch.linalg.svd(t, full_matrices=False)
        kept = ts[:rank] * torch.sqrt(ts.pow(2).sum() / ts[:rank].pow(2).sum())
        return (tu[:, :rank] * kept) @ tvh[:rank]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out.update(block_medians({
            "torch_qr_s": lambda: torch.linalg.qr(t, mode="r"),
            "torch_square_svd_s": lambda: torch.linalg.svd(t_r, full_matrices=False),
            "torch_eigh_s": lambda: torch.linalg.eigh(t_gram),
            "torch_tuned_project_s": torch_project}, repeats))
    finally:
        torch.set_num_threads(threads)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (median)")
    parser.add_argument("--ratio", type=float, default=0.6, help="LRPET pruning ratio p")
    parser.add_argument("--weights", nargs="+", default=["he", "projected", "decayed"],
                        choices=["he", "projected", "decayed"])
    parser.add_argument("--parts", action="store_true",
                        help="only time the steps of one 4608 x 512 matrix (decomposition_parts)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.parts:
        row = decomposition_parts(ratio=args.ratio, repeats=args.repeats)
        print(json.dumps(row, indent=1))
        write_rows(args.json, [row])
        return [row]

    rate = gemm_rate(args.repeats)
    print(f"float32 GEMM rate: {rate / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    for weights in args.weights:
        models = (("VGG-16", vgg16_conv_shapes()), ("ResNet-56", resnet56_conv_shapes()))
        for name, shapes in models:
            tree = make_tree(shapes, weights, args.ratio)
            row = bench_tree(name, tree, args.ratio, args.repeats, rate)
            row["weights"] = weights
            rows.append(row)
            print(json.dumps(row, indent=1), flush=True)

    print(f"\njax {jax.__version__}, {platform.processor() or platform.machine()}, "
          f"{jax.devices()[0].device_kind}, python {platform.python_version()}")
    header = ("| model | weights | jaxlr auto (s) | floor (s) | x floor | gram/all | "
              "torch reference (s) | speed-up | torch tuned (s) | speed-up | numpy (s) | "
              "speed-up | max rel. error jaxlr |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        auto = r["jaxlr_auto_s"]
        torch_ref, torch_tuned = r.get("torch_reference_s"), r.get("torch_tuned_s")
        print(
            f"| {r['model']} | {r['weights']} | {auto:.3f} | {r['floor_s']:.3f} | "
            f"{auto / r['floor_s']:.2f}x | {r['gram_accepted']}/{r['matrices']} | "
            + (f"{torch_ref:.3f} | {torch_ref / auto:.1f}x | {torch_tuned:.3f} | "
               f"{torch_tuned / auto:.1f}x | " if torch_ref else "n/a | | n/a | | ")
            + f"{r['numpy_s']:.3f} | {r['numpy_s'] / auto:.1f}x | "
            f"{r['jaxlr_auto_max_rel_error']:.1e} |"
        )
    print("\nThe other methods (s), the calls as one program (their SVDs one after the other), "
          "and auto with LAPACK's own thread count:")
    header = ("| model | weights | gram | svd | svd, one program | auto | auto, one program | "
              "auto, LAPACK's own threads | first call of auto |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        auto, svd = r["jaxlr_auto_s"], r["jaxlr_svd_s"]
        print(f"| {r['model']} | {r['weights']} | {r['jaxlr_gram_s']:.3f} (max error "
              f"{r['jaxlr_gram_max_rel_error']:.1e}) | {svd:.3f} | "
              f"{r['jaxlr_svd_one_program_s']:.3f} ({svd / r['jaxlr_svd_one_program_s']:.2f}x) | "
              f"{auto:.3f} | {r['jaxlr_auto_one_program_s']:.3f} "
              f"({auto / r['jaxlr_auto_one_program_s']:.2f}x) | "
              f"{r['jaxlr_auto_free_threads_s']:.3f} | {r['jaxlr_auto_first_call_s']:.1f} |")
    write_rows(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
