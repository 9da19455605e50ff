"""Tests of jaxlr.cost: multiply-accumulates by hand and by brute force, and against XLA."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jaxlr
from jaxlr.cost import forward_cost
from jaxlr.matrices import MatrixView
from jaxlr.nodes import LowRank
from tests import models
from tests.models import IMAGES
from tests.test_inference import quarter_ranks


def brute_force_in_bounds(in_shape, window, strides, padding, lhs_dilation, rhs_dilation):
    """Counts (output position, tap) pairs that read a real input element, one by one."""
    dilated = [(n - 1) * d + 1 for n, d in zip(in_shape, lhs_dilation, strict=True)]
    spans = [(k - 1) * d + 1 for k, d in zip(window, rhs_dilation, strict=True)]
    outs = [(n + lo + hi - s) // st + 1
            for n, (lo, hi), s, st in zip(dilated, padding, spans, strides, strict=True)]
    count = 0
    for out in itertools.product(*[range(o) for o in outs]):
        for tap in itertools.product(*[range(k) for k in window]):
            coords = [o * st - lo + t * d for o, st, (lo, _), t, d
                      in zip(out, strides, padding, tap, rhs_dilation, strict=True)]
            if all(0 <= c < n and c % ld == 0
                   for c, n, ld in zip(coords, dilated, lhs_dilation, strict=True)):
                count += 1
    return count, outs


def test_same_convolution_by_hand():
    model = nn.Conv(5, (3, 3))
    x = jnp.ones((2, 5, 5, 3))
    params = model.init(jax.random.key(0), x)["params"]
    cost = forward_cost(lambda p, x: model.apply({"params": p}, x), params, x, xla=False)
    layer = cost.layers["kernel"]
    assert layer.macs == 2 * 25 * (3 * 3 * 3) * 5  # every position, the whole window
    assert layer.macs_in_bounds == 2 * 13 * 13 * 3 * 5  # 3 * 5 - 2 = 13 taps per axis
    assert layer.params == 3 * 3 * 3 * 5 and cost.params == 3 * 3 * 3 * 5 + 5
    assert cost.other_macs == 0 and "bias" not in cost.layers


@pytest.mark.parametrize("strides,padding,lhs_dilation,rhs_dilation", [
    ((2, 1), ((1, 2), (0, 1)), (1, 1), (1, 2)),
    ((1, 3), ((2, 0), (3, 3)), (2, 1), (1, 1)),
    ((3, 2), ((0, 0), (1, 1)), (1, 2), (2, 1)),
])
def test_strided_dilated_padded_convolution_against_brute_force(strides, padding, lhs_dilation,
                                                                 rhs_dilation):
    x = jnp.ones((2, 7, 6, 3))
    w = jnp.ones((3, 2, 3, 4))

    def fn(w, x):
        return jax.lax.conv_general_dilated(x, w, strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    cost = forward_cost(fn, w, x)
    taps, outs = brute_force_in_bounds((7, 6), (3, 2), strides, padding, lhs_dilation,
                                       rhs_dilation)
    assert fn(w, x).shape == (2, *outs, 4)
    assert cost.layers[""].macs == 2 * outs[0] * outs[1] * 3 * 2 * 3 * 4
    assert cost.layers[""].macs_in_bounds == 2 * taps * 3 * 4
    # XLA counts exactly the in-bounds taps: 2 flops per multiply-accumulate.
    assert cost.xla_flops == 2 * cost.layers[""].macs_in_bounds


def test_factored_dense_layer_and_attention_by_hand():
    node = LowRank(jnp.ones((64, 3)), jnp.ones((3, 32)), (64, 32), MatrixView((0,), (1,)))
    model = nn.Dense(32)
    x = jnp.ones((4, 64))
    params = {"kernel": node, "bias": jnp.zeros(32)}
    cost = forward_cost(lambda p, x: jaxlr.apply(model, {"params": p}, x), params, x)
    assert cost.layers["kernel"] == (3 * (64 + 32), 4 * 3 * (64 + 32), 4 * 3 * (64 + 32))
    assert cost.params == 3 * 96 + 32

    attention = nn.MultiHeadDotProductAttention(4)
    tokens = jnp.ones((2, 16, 32))
    attention_params = attention.init(jax.random.key(0), tokens)["params"]
    cost = forward_cost(lambda p, x: attention.apply({"params": p}, x), attention_params, tokens)
    # Scores q k^T and weighted values: 2 products of batch * heads * L * L * head_dim.
    assert cost.other_macs == 2 * (2 * 4 * 16 * 16 * 8)
    assert cost.layers["query/kernel"].macs == 2 * 16 * 32 * 32
    assert set(cost.layers) == {f"{n}/kernel" for n in ("query", "key", "value", "out")}


def test_scan_multiplies_and_cond_takes_the_dearer_branch_and_while_is_refused():
    w = jnp.ones((8, 8))
    x = jnp.ones((2, 8))

    def scanned(w, x):
        return jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=5)[0]

    assert forward_cost(scanned, w, x, xla=False).layers[""].macs == 5 * 2 * 8 * 8

    def branching(w, x):
        return jax.lax.cond(x.sum() > 0, lambda: x @ w @ w @ w, lambda: x @ w)

    assert forward_cost(branching, w, x, xla=False).layers[""].macs == 3 * 2 * 8 * 8

    def looping(w, x):
        return jax.lax.while_loop(lambda h: h.sum() < 1e3, lambda h: h @ w, x)

    with pytest.raises(NotImplementedError, match="while loop"):
        forward_cost(looping, w, x)


@pytest.mark.parametrize("kind", ("mlp", "vgg", "resnet", "vit"))
def test_counts_agree_with_xla_on_dense_and_factored_models(kind):
    model, variables = models.linen_variables(kind)
    others = {k: v for k, v in variables.items() if k != "params"}
    result = jaxlr.compress(variables["params"], quarter_ranks(variables["params"]))
    params = result.compressed
    dense = forward_cost(lambda p, x: model.apply({**others, "params": p}, x),
                         jaxlr.collapse(params), IMAGES)
    factored = forward_cost(lambda p, x: jaxlr.apply(model, {**others, "params": p}, x), params,
                            IMAGES)
    # The dense model: XLA's flops / 2 within 5% of the in-bounds count (the rest is elementwise).
    assert 0 <= dense.xla_flops / 2 - dense.macs_in_bounds < 0.05 * dense.macs_in_bounds
    # Factoring leaves the elementwise work alone, so XLA sees exactly the products' change.
    assert dense.xla_flops - factored.xla_flops == pytest.approx(
        2 * (dense.macs_in_bounds - factored.macs_in_bounds), rel=1e-6)
    # Per layer: the factored count is the dense count times r (m + n) / (m n).
    for name, layer in result.report.layers.items():
        before, after = dense.layers[name], factored.layers[name]
        assert before.params == layer.params_before and after.params == layer.params_after
        m, n = layer.matrix_shape
        ratio = layer.rank * (m + n) / (m * n) if layer.low_rank else 1.0
        assert after.macs == pytest.approx(before.macs * ratio, rel=1e-9)
    assert factored.params == result.report.params_after
    assert dense.params == result.report.params_before
    assert factored.other_macs == dense.other_macs
    table = factored.table(dense)
    # One percent convention, as CompressionReport.table: the fraction kept.
    total = table.splitlines()[[line.split()[0] for line in table.splitlines()].index("total")]
    kept = f"({factored.macs / dense.macs:.1%})"
    assert total.endswith(f"{dense.macs} -> {factored.macs} {kept}"), total
    assert f"XLA flops kept {factored.xla_flops / dense.xla_flops:.1%}" in table
