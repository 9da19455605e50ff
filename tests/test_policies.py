"""Tests of jaxlr.policies against hand-worked examples and brute-force references."""

import math
from decimal import Decimal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxlr
from jaxlr.policies import Ranks


def tree_of(*shapes):
    return {f"layer{i}": {"kernel": jnp.zeros(s), "bias": jnp.zeros(s[-1])}
            for i, s in enumerate(shapes)}


def diagonal(**spectra):
    """A tree whose kernel ``name/kernel`` is ``diag(values)``: exactly those singular values."""
    return {name: {"kernel": jnp.diag(jnp.asarray(values, jnp.float32))}
            for name, values in spectra.items()}


# ----------------------------------------------------------------------------------------------
# The one rank formula: keep = 1 - prune.


def test_lrpet_ratio_by_hand_through_prune():
    tree = tree_of((3, 3, 16, 16), (3, 3, 32, 64), (64, 10))
    # n = min(m, n) = 16, 64, 10; p = 0.55: 16 - 8.8 = 7.2 -> 7; 64 - 35.2 = 28.8 -> 28;
    # 10 - 5.5 = 4.5 -> 4.
    assert dict(jaxlr.lsvt_ranks(tree, prune=0.55, filter="all")) == {
        "layer0/kernel": 7, "layer1/kernel": 28, "layer2/kernel": 4}
    # p = 0.99 would give 0 (NaN weights in the reference code): the floor is 1.
    assert set(jaxlr.lsvt_ranks(tree, prune=0.99, filter="all").values()) == {1}
    assert dict(jaxlr.lsvt_ranks(tree, prune=0.0, filter="all")) == {
        "layer0/kernel": 16, "layer1/kernel": 64, "layer2/kernel": 10}


@given(n=st.integers(1, 2048), hundredths=st.integers(0, 99))
def test_prune_and_keep_are_read_as_decimals_and_mean_the_same(n, hundredths):
    prune = hundredths / 100
    expected = max(1, int(Decimal(n) - Decimal(n) * Decimal(hundredths) / 100))
    tree = {"w": {"kernel": jnp.zeros((n, 2048))}}
    assert jaxlr.lsvt_ranks(tree, prune=prune, filter="all")["w/kernel"] == expected
    assert jaxlr.policies.local_rank(n, prune=prune) == expected
    assert jaxlr.lsvt_ranks(tree, keep=(100 - hundredths) / 100,
                            filter="all")["w/kernel"] == expected


@given(n=st.integers(1, 1024), hundredths=st.integers(0, 99))
def test_traced_rank_agrees_with_the_decimal_rule(n, hundredths):
    kept = jnp.float32(1) - jnp.float32(hundredths / 100)  # as a schedule delivers it, traced
    traced = jax.jit(jaxlr.policies.traced_local_rank, static_argnums=0)(n, kept)
    assert int(traced) == jaxlr.policies.local_rank(n, prune=hundredths / 100)


def test_lsvt_ranks_by_hand():
    tree = tree_of((100, 100), (10, 7), (3, 3, 1, 4))
    # floor(0.29 * 100) = 29 (binary floating point gives 28.999...), floor(0.29 * 7) = 2,
    # floor(0.29 * 4) = 1.
    assert dict(jaxlr.lsvt_ranks(tree, keep=0.29, filter="all")) == {
        "layer0/kernel": 29, "layer1/kernel": 2, "layer2/kernel": 1}
    assert dict(jaxlr.lsvt_ranks(tree, keep=0.01, filter="all")) == {
        "layer0/kernel": 1, "layer1/kernel": 1, "layer2/kernel": 1}
    assert dict(jaxlr.lsvt_ranks(tree, keep=1.0, filter="all")) == {
        "layer0/kernel": 100, "layer1/kernel": 7, "layer2/kernel": 4}


def test_fixed_ranks_and_their_limits():
    tree = tree_of((8, 6), (3, 3, 2, 5))
    assert dict(jaxlr.policies.fixed_ranks(tree, 5,
                                  filter="all")) == {"layer0/kernel": 5, "layer1/kernel": 5}
    with pytest.raises(ValueError, match=r"'layer0/kernel' is 7; allowed 1 <= rank <= .* = 6"):
        jaxlr.policies.fixed_ranks(tree, 7, filter="all")
    with pytest.raises(ValueError, match="is 0"):
        jaxlr.policies.fixed_ranks(tree, 0, filter="all")


def test_a_variables_dict_and_its_params_give_the_same_keys():
    variables = {"params": tree_of((8, 6)), "batch_stats": {"bn": {"var": jnp.ones(6)}}}
    assert dict(jaxlr.lsvt_ranks(variables, keep=0.5, filter="all")) == dict(
        jaxlr.lsvt_ranks(variables["params"], keep=0.5, filter="all")) == {"layer0/kernel": 3}


# ----------------------------------------------------------------------------------------------
# Spectral policies take the same params.


def test_energy_ranks_by_hand():
    params = diagonal(a=[3.0, 2.0, 1.0, 1.0], b=[1.0, 0.0, 0.0], zero=[0.0, 0.0])
    # a: energies 9, 13, 14, 15 of 15. b: everything in the first value.
    assert dict(jaxlr.energy_ranks(params, 0.6, filter="all")) == {"a/kernel": 1, "b/kernel": 1,
                                                     "zero/kernel": 1}
    assert jaxlr.energy_ranks(params, 0.8, filter="all")["a/kernel"] == 2
    assert jaxlr.energy_ranks(params, 0.9, filter="all")["a/kernel"] == 3
    assert jaxlr.energy_ranks(params, 1.0, filter="all")["a/kernel"] == 4


def test_gsvt_ranks_by_hand_with_pools_and_normalisation():
    params = {"conv1": {"kernel": jnp.zeros((3, 3, 1, 4))},
              "conv2": {"kernel": jnp.zeros((3, 3, 1, 2))},
              "fc": {"kernel": jnp.diag(jnp.asarray([100.0, 50.0, 1.0]))}}
    spectra = {"conv1/kernel": [8.0, 4.0, 2.0, 1.0], "conv2/kernel": [6.0, 0.5],
               "fc/kernel": [100.0, 50.0, 1.0]}
    # One pool of 9 values, keep floor(0.5 * 9) = 4: 100, 50, 8, 6.
    assert dict(jaxlr.gsvt_ranks(params, keep=0.5, spectra=spectra, filter="all")) == {
        "conv1/kernel": 1, "conv2/kernel": 1, "fc/kernel": 2}
    # Pools by kind: convs keep floor(0.5 * 6) = 3 of {8, 4, 2, 1, 6, 0.5}: 8, 6, 4; fc keeps 1.
    by_kind = {"conv1/kernel": 2, "conv2/kernel": 1, "fc/kernel": 1}
    assert dict(jaxlr.gsvt_ranks(params, keep=0.5, pools="kind", spectra=spectra,
                                 filter="all")) == by_kind
    # The same pools as a mapping and as a function of (path, leaf).
    pools = {"conv1/kernel": "c", ("conv2", "kernel"): "c", "fc/kernel": "d"}
    assert dict(jaxlr.gsvt_ranks(params, keep=0.5, pools=pools, spectra=spectra,
                                 filter="all")) == by_kind
    assert dict(jaxlr.gsvt_ranks(params, prune=0.5, spectra=spectra,
                                 pools=lambda path, leaf: str(leaf.ndim), filter="all")) == by_kind
    # Normalised: conv1 1, .5, .25, .125; conv2 1, .083; keep 3: 1, 1, .5.
    assert dict(jaxlr.gsvt_ranks(params, keep=0.5, pools="kind", normalize="max",
                                 spectra=spectra, filter="all")) == by_kind
    # Without spectra they are computed from the params (fc's diagonal).
    assert jaxlr.gsvt_ranks(params, keep=0.5, filter=jaxlr.kernel_filter(include="fc"))[
        "fc/kernel"] == 1


@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    keep_pct=st.integers(1, 100),
    seed=st.integers(0, 2**31 - 1),
)
def test_gsvt_ranks_match_a_brute_force_threshold(sizes, keep_pct, seed):
    rng = np.random.default_rng(seed)
    spectra = {f"m{i}/kernel": np.sort(rng.uniform(0, 10, n))[::-1] for i, n in enumerate(sizes)}
    params = {f"m{i}": {"kernel": jnp.zeros((n, n))} for i, n in enumerate(sizes)}
    ranks = jaxlr.gsvt_ranks(params, keep=keep_pct / 100, spectra=spectra, filter="all")
    everything = np.sort(np.concatenate(list(spectra.values())))[::-1]
    keep = (keep_pct * everything.size) // 100
    threshold = everything[keep - 1] if keep else np.inf
    for name, values in spectra.items():
        assert ranks[name] == max(1, int(np.sum(values >= threshold)))
    assert ranks.full == {name: len(v) for name, v in spectra.items()}


# ----------------------------------------------------------------------------------------------
# Ranks to a cost target.

def test_gsvt_of_a_partly_collapsed_lorita_tree_pools_every_layer():
    """A LoRITa tree with some layers collapsed and some still products: every layer's spectrum
    (the product's, computed by numpy) enters the one global pool."""
    keys = jax.random.split(jax.random.key(3), 3)
    dense = {"conv": {"kernel": jax.random.normal(keys[0], (3, 3, 2, 5))},
             "fc1": {"kernel": jax.random.normal(keys[1], (5, 6))},
             "fc2": {"kernel": jax.random.normal(keys[2], (6, 3))}}
    factored = jaxlr.factorize(dense, 3, jax.random.key(4), filter="all")
    mixed = {**factored, "fc1": {"kernel": jaxlr.collapse(factored["fc1"]["kernel"])}}
    assert isinstance(mixed["conv"]["kernel"], jaxlr.Product)
    assert isinstance(mixed["fc2"]["kernel"], jaxlr.Product)

    def product(name):
        node = factored[name]["kernel"]
        out = np.asarray(node.factors[0], np.float64)
        for factor in node.factors[1:]:
            out = out @ np.asarray(factor, np.float64)
        return out

    expected = {"conv/kernel": product("conv"), "fc1/kernel": product("fc1"),
                "fc2/kernel": product("fc2")}
    spectra = jaxlr.svd.singular_values(mixed, filter="all")
    assert set(spectra) == set(expected)
    for name, matrix in expected.items():
        np.testing.assert_allclose(spectra[name], np.linalg.svd(matrix, compute_uv=False),
                                   rtol=1e-4, atol=1e-5)
    pooled = np.sort(np.concatenate([np.linalg.svd(m, compute_uv=False)
                                     for m in expected.values()]))[::-1]
    threshold = pooled[int(0.5 * pooled.size) - 1]
    ranks = jaxlr.gsvt_ranks(mixed, keep=0.5, filter="all")
    for name, matrix in expected.items():
        values = np.linalg.svd(matrix, compute_uv=False)
        assert ranks[name] == max(1, int(np.sum(values >= threshold * (1 - 1e-6))))



def test_target_ranks_meet_a_parameter_target_by_hand():
    params = {"fc1": {"kernel": jnp.zeros((64, 64))}, "fc2": {"kernel": jnp.zeros((64, 32))}}
    ranks = jaxlr.target_ranks(params, reduction=0.5, policy="lsvt", filter="all")
    # LSVT budget b: r1 = floor(64 b) (a pair of 128 r1), r2 = floor(32 b) (96 r2); half of the
    # 6144 numbers are cut while 128 r1 + 96 r2 <= 3072: b < 0.28125 gives (17, 8) = 2944, and
    # b = 0.28125 gives (18, 9) = 3168.
    assert dict(ranks) == {"fc1/kernel": 17, "fc2/kernel": 8}
    with pytest.raises(ValueError, match="one singular value per matrix cuts"):
        jaxlr.target_ranks(params, reduction=0.99, policy="lsvt", filter="all")


def test_target_ranks_meet_a_macs_target_counted_from_the_forward_pass():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
            x = nn.relu(nn.Conv(16, (3, 3), name="conv2")(x))
            return nn.Dense(10, name="head")(x.mean((1, 2)))

    model, x = Net(), jnp.ones((1, 8, 8, 3))
    params = model.init(jax.random.key(0), x)["params"]
    cost = jaxlr.forward_cost(lambda p, x: model.apply({"params": p}, x), params, x, xla=False)
    convs = jaxlr.kernel_filter(kinds="conv")
    for target in (0.3, 0.5, 0.7):
        ranks = jaxlr.target_ranks(params, reduction=target, cost=cost, filter=convs)
        compressed = jaxlr.compress(params, ranks).compressed
        after = jaxlr.forward_cost(lambda p, x: jaxlr.apply(model, {"params": p}, x),
                                   compressed, x, xla=False)
        assert 1 - after.macs / cost.macs >= target  # met, measured on the factored model
        kept = sum(ranks.values()) / sum(ranks.full.values())
        looser = jaxlr.gsvt_ranks(params, keep=kept + 0.05, filter=convs)
        bigger = jaxlr.compress(params, looser).compressed
        more = jaxlr.forward_cost(lambda p, x: jaxlr.apply(model, {"params": p}, x), bigger, x,
                                  xla=False)
        assert 1 - more.macs / cost.macs < target  # and the next budget misses it


# ----------------------------------------------------------------------------------------------
# Ranks.


def test_retained_fraction_overrides_and_tuple_keys():
    ranks = Ranks({"a": 1, ("params", "b"): 4, "c": 3}, full={"a": 4, "b": 4, "c": 6})
    assert jaxlr.policies.retained_fraction(ranks) == pytest.approx((0.25 + 1.0 + 0.5) / 3)
    assert ranks[("b",)] == ranks["b"] == ranks["params/b"] == 4 and ("b",) in ranks
    changed = ranks.with_overrides({("a",): 2})
    assert dict(changed) == {"a": 2, "b": 4, "c": 3} and dict(ranks)["a"] == 1
    assert "retained singular values" in ranks.table() and "b" in ranks.table()
    with pytest.raises(ValueError, match=r"overrides name paths without a rank: \['d'\]"):
        ranks.with_overrides({"d": 1})
    with pytest.raises(ValueError, match="'c' is 7; allowed 1 <= rank <= min"):
        ranks.with_overrides({"c": 7})
    with pytest.raises(TypeError, match="needs a Ranks"):
        jaxlr.policies.retained_fraction({"a": 1})


@pytest.mark.parametrize("multiple", [1, 3, 8])
def test_rounded_up_ranks_by_hand(multiple):
    ranks = Ranks({"a": 1, "b": 6, "c": 13, "d": 16}, full={"a": 4, "b": 16, "c": 14, "d": 64})
    rounded = ranks.rounded_up(multiple)
    for name, rank in ranks.items():
        expected = min(ranks.full[name], multiple * ((rank + multiple - 1) // multiple))
        assert rounded[name] == expected and rounded[name] >= rank
    assert dict(ranks.rounded_up(8)) == {"a": 4, "b": 8, "c": 14, "d": 16}
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="multiple must be a positive integer"):
            ranks.rounded_up(bad)


def test_policies_reject_bad_input_when_called():
    tree = tree_of((8, 6))
    with pytest.raises(ValueError, match=r"prune must lie in \[0, 1\), got 1.0"):
        jaxlr.lsvt_ranks(tree, prune=1.0, filter="all")
    with pytest.raises(ValueError, match=r"prune must lie in \[0, 1\), got -0.1"):
        jaxlr.lsvt_ranks(tree, prune=-0.1, filter="all")
    with pytest.raises(ValueError, match=r"keep must lie in \(0, 1\], got 0.0"):
        jaxlr.lsvt_ranks(tree, keep=0.0, filter="all")
    with pytest.raises(ValueError, match="exactly one of"):
        jaxlr.lsvt_ranks(tree, keep=0.5, prune=0.5, filter="all")
    with pytest.raises(ValueError, match="exactly one of keep"):
        jaxlr.gsvt_ranks(tree, filter="all")
    with pytest.raises(ValueError, match=r"energy must lie in \(0, 1\], got 1.5"):
        jaxlr.energy_ranks(tree, 1.5, filter="all")
    with pytest.raises(ValueError, match="energy must lie"):
        jaxlr.energy_ranks(tree, math.nan, filter="all")
    with pytest.raises(TypeError, match="keep must be a number"):
        jaxlr.gsvt_ranks(tree, keep="half", filter="all")
    with pytest.raises(TypeError, match="keep must be a number"):
        jaxlr.lsvt_ranks(tree, keep=True, filter="all")
    with pytest.raises(ValueError, match="normalize must be 'none' or 'max'"):
        jaxlr.gsvt_ranks(tree, keep=0.5, normalize="sum", filter="all")
    with pytest.raises(ValueError, match=r"pools assign no pool to \['layer1/kernel'\]"):
        jaxlr.gsvt_ranks(tree_of((4, 4), (4, 4)), keep=0.5, pools={"layer0/kernel": "x"},
                         filter="all")
    with pytest.raises(ValueError, match="must be finite"):
        jaxlr.gsvt_ranks(tree, keep=0.5, spectra={"layer0/kernel": [1.0, np.nan, 0, 0, 0, 0]},
                         filter="all")
    with pytest.raises(ValueError, match="spectra lack"):
        jaxlr.gsvt_ranks(tree, keep=0.5, spectra={}, filter="all")
    with pytest.raises(ValueError, match=r"reduction must lie in \(0, 1\)"):
        jaxlr.target_ranks(tree, reduction=1.0, filter="all")
    with pytest.raises(ValueError, match="policy must be 'gsvt' or 'lsvt'"):
        jaxlr.target_ranks(tree, reduction=0.5, policy="prune", filter="all")


def test_fractions_are_named_never_positional():
    """keep, prune and reduction mean three things: each entry point takes them by name only."""
    tree = tree_of((8, 6), (6, 4))
    for call in (lambda: jaxlr.lsvt_ranks(tree, 0.3), lambda: jaxlr.gsvt_ranks(tree, 0.3),
                 lambda: jaxlr.target_ranks(tree, 0.3), lambda: jaxlr.low_rank_projection(0.3),
                 lambda: jaxlr.with_low_rank_projection(optax.sgd(0.1), 0.3),
                 lambda: jaxlr.project(tree, 0.3)):
        with pytest.raises(TypeError, match="positional argument|keep=0.3"):
            call()
    # By name, keep and prune are complements, by LSVT's rank floor(keep * n) on both sides.
    every = {"filter": "all"}
    assert dict(jaxlr.lsvt_ranks(tree, keep=0.5, **every)) == dict(
        jaxlr.lsvt_ranks(tree, prune=0.5, **every)) == {"layer0/kernel": 3, "layer1/kernel": 2}
