"""jaxlr.latency: what is timed, which ranks count as faster, and ranks chosen from the table.

Times themselves are never asserted (they belong to BENCHMARKS.md); the tests check the decisions
taken from given times against hand-worked cases and brute force, and that the timed factored
product computes the layer ``x A B``.
"""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlr
from jaxlr.latency import LatencyTable, LayerLatency, candidate_ranks, measure_latency
from jaxlr.policies import Ranks


def test_candidate_ranks_by_hand():
    # 576 x 64 saves while r * 640 < 36864, i.e. up to r = 57.
    assert candidate_ranks(576, 64) == (1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32, 40, 48, 56)
    # 27 x 16 saves up to r = 10 (10 * 43 = 430 < 432).
    assert candidate_ranks(27, 16) == (1, 2, 3, 4, 5, 6, 7, 8)
    assert candidate_ranks(2, 2) == ()  # no rank saves
    ranks = candidate_ranks(4608, 512)
    assert ranks[7:13] == (8, 16, 24, 32, 40, 48) and 64 in ranks and 80 in ranks
    assert all(r * (4608 + 512) < 4608 * 512 for r in ranks) and max(ranks) == 448
    steps = np.diff(ranks[7:])  # never coarser than a quarter of the rank
    assert all(step <= max(8, r / 4) for r, step in zip(ranks[7:], steps, strict=False))


def test_efficient_ranks_and_snap_by_hand():
    layer = LayerLatency((64, 64), 1.0, {4: 0.2, 8: 0.1, 16: 0.5, 24: 1.2}, margin=0.1)
    # 24 is slower than dense; 16 and 8 beat everything larger by > 10%; 4 is slower than 8.
    assert layer.efficient_ranks() == (8, 16)
    assert [layer.snap(r) for r in (1, 8, 9, 16, 17, 40)] == [8, 8, 16, 16, 64, 64]
    # A rank that saves 5% does not count with a 10% margin, and does with none.
    near = {8: 0.95}
    assert LayerLatency((64, 64), 1.0, near, margin=0.1).efficient_ranks() == ()
    assert LayerLatency((64, 64), 1.0, near, margin=0.0).efficient_ranks() == (8,)
    assert layer.seconds(64) == layer.seconds(40) == 1.0  # 40 * 128 >= 64 * 64: dense
    assert layer.seconds(8) == 0.1
    with pytest.raises(KeyError, match="rank 12 was not timed"):
        layer.seconds(12)


def _table():
    return LatencyTable({
        "a/kernel": LayerLatency((64, 64), 1.0, {4: 0.9, 8: 0.95}),  # never faster: whole
        "b/kernel": LayerLatency((128, 32), 1.0, {4: 0.1, 8: 0.2, 16: 0.4}),
    }, "test")


def test_table_snap_seconds_and_errors():
    table = _table()
    ranks = Ranks({"a/kernel": 3, "b/kernel": 5}, {"a/kernel": 64, "b/kernel": 32})
    snapped = table.snap(ranks)
    assert isinstance(snapped, Ranks) and snapped.full == ranks.full
    assert dict(snapped) == {"a/kernel": 64, "b/kernel": 8}
    assert table.snap({"b/kernel": 17}) == {"b/kernel": 32}
    assert table.seconds() == 2.0
    assert table.seconds({"b/kernel": 16}) == pytest.approx(1.4)
    with pytest.raises(ValueError, match="no layer 'c/kernel'"):
        table.snap({"c/kernel": 3})
    with pytest.raises(ValueError, match="full rank 16 in the ranks but 32"):
        table.snap(Ranks({"b/kernel": 3}, {"b/kernel": 16}))
    assert "none (stays dense)" in table.table() and "4: 100.000" in table.table()


def _lsvt_reference(table, shapes, unit, before, reduction):
    """Brute force: the largest LSVT budget on a fine grid whose snapped ranks cut enough."""
    best = None
    for budget in np.linspace(0, 1, 20001):
        ranks = {}
        saved = 0.0
        for key, (m, n) in shapes.items():
            rank = table.layers[key].snap(max(1, math.floor(budget * min(m, n))))
            ranks[key] = rank
            after = rank * (m + n) if rank * (m + n) < m * n else m * n
            saved += unit[key] * (m * n - after)
        if saved / before >= reduction:
            best = ranks
    return best


@pytest.mark.parametrize("reduction", [0.1, 0.25, 0.4])
def test_target_ranks_with_latency_against_brute_force(reduction):
    params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (64, 64))},
              "b": {"kernel": jax.random.normal(jax.random.key(1), (128, 32))}}
    table = _table()
    ranks = jaxlr.target_ranks(params, reduction=reduction, policy="lsvt", latency=table,
                               filter="all")
    shapes = {"a/kernel": (64, 64), "b/kernel": (128, 32)}
    before = 64 * 64 + 128 * 32
    expected = _lsvt_reference(table, shapes, dict.fromkeys(shapes, 1.0), before, reduction)
    assert dict(ranks) == expected
    assert ranks["a/kernel"] == 64  # the layer that never runs faster stays whole
    assert ranks["b/kernel"] in (4, 8, 16)


def test_target_ranks_with_latency_errors():
    params = {"a": {"kernel": jnp.ones((64, 64))}, "b": {"kernel": jnp.ones((128, 32))}}
    # Only b can be cut, down to 4 * 160 of 4096 numbers: 3456 of 8192 = 42%.
    with pytest.raises(ValueError, match="rounded up by the latency table, cuts 42.2%"):
        jaxlr.target_ranks(params, reduction=0.5, policy="lsvt", latency=_table(), filter="all")
    partial = LatencyTable({"a/kernel": _table().layers["a/kernel"]}, "test")
    with pytest.raises(ValueError, match="no layer 'b/kernel'"):
        jaxlr.target_ranks(params, reduction=0.2, policy="lsvt", latency=partial, filter="all")
    with pytest.raises(TypeError, match="latency must be a jaxlr.latency.LatencyTable"):
        jaxlr.target_ranks(params, reduction=0.2, latency={"a/kernel": 3}, filter="all")


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), name="conv")(x))
        x = nn.Conv(16, (3, 3), name="twin")(x)  # the same product as ``conv``'s: timed once
        x = nn.Conv(16, (3, 3), feature_group_count=4, name="grouped")(x)
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def test_measure_latency_times_every_matrix_at_the_ranks_that_save():
    model = _Net()
    x = jnp.ones((2, 8, 8, 16))
    params = model.init(jax.random.key(0), x)["params"]
    table = measure_latency(lambda p, x: model.apply({"params": p}, x), params, x,
                            ranks=[2, 4, 15, 16, 500], repeats=1, filter="all")
    leaves = jaxlr.selection.matrix_leaves(params, filter="all")
    assert list(table.layers) == list(leaves)
    for key, layer in table.layers.items():
        assert layer.matrix_shape == leaves[key].matrix_shape and layer.dense > 0
    # conv: 144 x 16 saves below r = 14.4; the grouped conv cannot run factored; the head
    # (1024 x 10) saves up to r = 9.
    assert sorted(table.layers["conv/kernel"].factored) == [2, 4]
    assert table.layers["conv/kernel"] == table.layers["twin/kernel"]
    assert table.layers["grouped/kernel"].factored == {}
    assert table.layers["grouped/kernel"].snap(1) == 16  # stays whole (36 x 16)
    assert sorted(table.layers["head/kernel"].factored) == [2, 4]
    assert table.device == jax.devices()[0].device_kind
    only = measure_latency(lambda p, x: model.apply({"params": p}, x), params, x,
                           ranks=lambda m, n: [3], repeats=1, filter="dense")
    assert list(only.layers) == ["head/kernel"] and list(only.layers["head/kernel"].factored) == [3]


@pytest.mark.parametrize("bad, match", [
    ({"repeats": 0}, "repeats must be an integer >= 1"),
    ({"margin": 1.0}, r"margin must be a number in \[0, 1\)"),
    ({"ranks": [0, 2]}, "ranks must be positive integers"),
    ({"ranks": []}, "ranks must be positive integers, at least one"),
    ({"ranks": lambda m, n: [-1]}, "ranks must be positive integers"),
])
def test_measure_latency_rejects_bad_arguments(bad, match):
    params = {"kernel": jnp.ones((8, 8))}
    with pytest.raises(ValueError, match=match):
        measure_latency(lambda p, x: x @ p["kernel"], params, jnp.ones((2, 8)), **bad)


def test_measure_latency_refuses_a_while_loop():
    def fn(p, x):
        return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ p["kernel"]),
                                  (0, x))[1]

    with pytest.raises(NotImplementedError, match="while loop"):
        measure_latency(fn, {"kernel": jnp.ones((8, 8))}, jnp.ones((2, 8)), repeats=1, filter="all")


def _products(fn, params, x):
    from jaxlr.cost import _products as walk
    from jaxlr.cost import _tagged_jaxpr
    from jaxlr.latency import _Product

    jaxpr, tags, _ = _tagged_jaxpr(fn, params, x)
    return [_Product(eqn, 1 if tags.get(eqn.invars[1]) == owner else 0)
            for eqn, owner, _ in walk(jaxpr, tags, 1) if owner is not None]


@pytest.mark.parametrize("kind", ["conv_strided", "conv_valid", "dense", "kernel_left"])
def test_the_timed_factored_product_is_the_layer_run_on_a_b(kind):
    from jaxlr.latency import _factored_fn

    rng = np.random.default_rng(0)
    if kind.startswith("conv"):
        module = nn.Conv(6, (3, 2), strides=2 if kind == "conv_strided" else 1,
                         padding="SAME" if kind == "conv_strided" else "VALID", use_bias=False)
        x = jnp.asarray(rng.standard_normal((2, 9, 7, 5)), jnp.float32)
        params = module.init(jax.random.key(0), x)["params"]

        def fn(p, x):
            return module.apply({"params": p}, x)
    elif kind == "dense":
        x = jnp.asarray(rng.standard_normal((3, 4, 12)), jnp.float32)
        params = {"kernel": jnp.zeros((12, 7))}

        def fn(p, x):
            return x @ p["kernel"]
    else:
        x = jnp.asarray(rng.standard_normal((7, 3)), jnp.float32)
        params = {"kernel": jnp.zeros((12, 7))}

        def fn(p, x):  # the kernel on the left: W^T x contracts its 7 output rows
            return jnp.einsum("mn,nb->mb", p["kernel"], x)
    (product,) = _products(fn, params, x)
    run, shapes = _factored_fn(product, 3)
    a = jnp.asarray(rng.standard_normal(shapes[1][0]), jnp.float32)
    b = jnp.asarray(rng.standard_normal(shapes[2][0]), jnp.float32)
    kernel_shape = product.eqn.invars[product.kernel].aval.shape
    # The kernel A B in the product's own layout, built with numpy.
    a_np, b_np = np.asarray(a), np.asarray(b)
    if kind.startswith("conv"):
        kernel = (a_np.reshape(-1, 3) @ b_np).reshape(kernel_shape)
        dense = fn({"kernel": jnp.asarray(kernel)}, x)
    elif kind == "dense":
        dense = np.asarray(x) @ (a_np @ b_np)
    else:  # the product contracts the kernel's columns: A is (7, r), B (r, 12); W = (A B)^T
        dense = np.einsum("nm,nb->mb", a_np @ b_np, np.asarray(x))
        dense = np.asarray(dense).T
        np.testing.assert_allclose(np.asarray(run(x, a, b)), dense, rtol=1e-5, atol=1e-5)
        return
    np.testing.assert_allclose(np.asarray(run(x, a, b)), np.asarray(dense), rtol=1e-5, atol=1e-5)


def test_compress_keeps_a_full_rank_matrix_exactly():
    params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))},
              "b": {"kernel": jax.random.normal(jax.random.key(1), (32, 32))}}
    result = jaxlr.compress(params, {"a/kernel": 8, "b/kernel": 4})
    assert result.compressed["a"]["kernel"] is params["a"]["kernel"]  # no decomposition
    layer = result.report.layers["a/kernel"]
    assert (layer.rank, layer.full_rank, layer.low_rank, layer.params_after) == (8, 8, False, 128)
    assert list(result.report.layers) == ["a/kernel", "b/kernel"]
    assert result.report.params_after == 128 + 4 * 64
    bad = {**params, "a": {"kernel": params["a"]["kernel"].at[0, 0].set(jnp.nan)}}
    with pytest.raises(ValueError, match=r"\['a/kernel'\] hold NaN"):
        jaxlr.compress(bad, {"a/kernel": 8, "b/kernel": 4})


def test_fastest_ranks_against_brute_force():
    from experiments.benchmarks.lowrank_inference import fastest_ranks

    table = LatencyTable({
        # rank 16 runs faster than rank 4 in both: meeting a high target costs time
        "a/kernel": LayerLatency((64, 64), 1.0, {4: 0.3, 16: 0.2}),
        "b/kernel": LayerLatency((64, 64), 2.0, {4: 1.5, 16: 1.0}),
    }, "test")
    cost = jaxlr.cost.ForwardCost({"a/kernel": jaxlr.cost.LayerCost(4096, 4096, 4096),
                              "b/kernel": jaxlr.cost.LayerCost(4096, 8192, 8192)}, 0, 0, 8192, None)
    options = (64, 4, 16)

    def reduction(ra, rb):
        macs = sum(cost.layers[k].macs * (r * 128 / 4096 if r < 64 else 1)
                   for k, r in (("a/kernel", ra), ("b/kernel", rb)))
        return 1 - macs / cost.macs

    # hand-worked optima, without and with an upper limit on the reduction
    for target, band, optimum in ((0.1, None, 1.2), (0.6, None, 1.3), (0.8, None, 1.8),
                                  (0.1, 0.2, 2.2), (0.3, 0.1, 2.0), (0.6, 0.3, 1.3)):
        ranks = fastest_ranks(table, cost, target, band)
        best = min((table.seconds({"a/kernel": ra, "b/kernel": rb}), ra, rb)
                   for ra, rb in itertools.product(options, options)
                   if target <= reduction(ra, rb) <= target + (band or 1))
        assert best[0] == pytest.approx(optimum)
        assert table.seconds(ranks) == pytest.approx(optimum)
        assert target <= reduction(ranks["a/kernel"], ranks["b/kernel"]) <= target + (band or 1)
    with pytest.raises(ValueError, match="no combination"):
        fastest_ranks(table, cost, 0.99)
