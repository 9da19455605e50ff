"""Tests of jaxlr.ranks against hand-worked examples and brute-force references."""

from decimal import Decimal

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxlr
from jaxlr.ranks import Ranks


def tree_of(*shapes):
    return {f"layer{i}": {"kernel": jnp.zeros(s), "bias": jnp.zeros(s[-1])}
            for i, s in enumerate(shapes)}


# ----------------------------------------------------------------------------------------------
# Shape-only policies.


def test_ratio_ranks_follow_the_lrpet_formula_by_hand():
    tree = tree_of((3, 3, 16, 16), (3, 3, 32, 64), (64, 10))
    # n = min(m, n) = 16, 64, 10; p = 0.55: 16 - 8.8 = 7.2 -> 7; 64 - 35.2 = 28.8 -> 28;
    # 10 - 5.5 = 4.5 -> 4.
    assert dict(jaxlr.ratio_ranks(tree, 0.55)) == {
        "layer0/kernel": 7, "layer1/kernel": 28, "layer2/kernel": 4}
    # p = 0.99 would give 0 (NaN weights in the reference code): the floor is 1.
    assert set(jaxlr.ratio_ranks(tree, 0.99).values()) == {1}
    assert dict(jaxlr.ratio_ranks(tree, 0.0)) == {
        "layer0/kernel": 16, "layer1/kernel": 64, "layer2/kernel": 10}


@given(n=st.integers(1, 2048), hundredths=st.integers(0, 99))
def test_ratio_ranks_read_the_ratio_as_a_decimal(n, hundredths):
    ratio = hundredths / 100
    expected = max(1, int(Decimal(n) - Decimal(n) * Decimal(hundredths) / 100))
    assert jaxlr.ratio_ranks({"w": {"kernel": jnp.zeros((n, 2048))}}, ratio)["w/kernel"] == expected


def test_lsvt_ranks_by_hand():
    tree = tree_of((100, 100), (10, 7), (3, 3, 1, 4))
    # floor(0.29 * 100) = 29 (binary floating point gives 28.999...), floor(0.29 * 7) = 2,
    # floor(0.29 * 4) = 1.
    assert dict(jaxlr.lsvt_ranks(tree, 0.29)) == {
        "layer0/kernel": 29, "layer1/kernel": 2, "layer2/kernel": 1}
    assert dict(jaxlr.lsvt_ranks(tree, 0.01)) == {
        "layer0/kernel": 1, "layer1/kernel": 1, "layer2/kernel": 1}
    assert dict(jaxlr.lsvt_ranks(tree, 1.0)) == {
        "layer0/kernel": 100, "layer1/kernel": 7, "layer2/kernel": 4}


def test_fixed_ranks_and_their_limits():
    tree = tree_of((8, 6), (3, 3, 2, 5))
    assert dict(jaxlr.fixed_ranks(tree, 5)) == {"layer0/kernel": 5, "layer1/kernel": 5}
    with pytest.raises(ValueError, match=r"'layer0/kernel' is 7; allowed 1 <= rank <= .* = 6"):
        jaxlr.fixed_ranks(tree, 7)
    with pytest.raises(ValueError, match="is 0"):
        jaxlr.fixed_ranks(tree, 0)


# ----------------------------------------------------------------------------------------------
# Spectral policies.


def test_energy_ranks_by_hand():
    spectra = {"a": [3.0, 2.0, 1.0, 1.0], "b": [1.0, 0.0, 0.0], "zero": [0.0, 0.0]}
    # a: energies 9, 13, 14, 15 of 15. b: everything in the first value.
    assert dict(jaxlr.energy_ranks(spectra, 0.6)) == {"a": 1, "b": 1, "zero": 1}
    assert dict(jaxlr.energy_ranks(spectra, 0.8)) == {"a": 2, "b": 1, "zero": 1}
    assert dict(jaxlr.energy_ranks(spectra, 0.9)) == {"a": 3, "b": 1, "zero": 1}
    assert dict(jaxlr.energy_ranks(spectra, 1.0)) == {"a": 4, "b": 1, "zero": 1}


def test_gsvt_ranks_by_hand_with_pools_and_normalisation():
    spectra = {
        "conv1": [8.0, 4.0, 2.0, 1.0],
        "conv2": [6.0, 0.5],
        "fc": [100.0, 50.0, 1.0],
    }
    # One pool of 9 values, keep floor(0.5 * 9) = 4: 100, 50, 8, 6.
    assert dict(jaxlr.gsvt_ranks(spectra, 0.5)) == {"conv1": 1, "conv2": 1, "fc": 2}
    # Separate pools: convs keep floor(0.5 * 6) = 3 of {8, 4, 2, 1, 6, 0.5}: 8, 6, 4; fc keeps 1.
    pools = {"conv1": "conv", "conv2": "conv", "fc": "dense"}
    assert dict(jaxlr.gsvt_ranks(spectra, 0.5, pools=pools)) == {"conv1": 2, "conv2": 1, "fc": 1}
    # Normalised: conv1 1, .5, .25, .125; conv2 1, .083; keep 3: 1, 1, .5.
    assert dict(jaxlr.gsvt_ranks(spectra, 0.5, pools=pools, normalize="max")) == {
        "conv1": 2, "conv2": 1, "fc": 1}
    # A callable works like the mapping.
    by_name = jaxlr.gsvt_ranks(spectra, 0.5, pools=lambda path: path.rstrip("0123456789"))
    assert dict(by_name) == {"conv1": 2, "conv2": 1, "fc": 1}


@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    ratio_pct=st.integers(1, 100),
    seed=st.integers(0, 2**31 - 1),
)
def test_gsvt_ranks_match_a_brute_force_threshold(sizes, ratio_pct, seed):
    rng = np.random.default_rng(seed)
    spectra = {f"m{i}": np.sort(rng.uniform(0, 10, n))[::-1] for i, n in enumerate(sizes)}
    ranks = jaxlr.gsvt_ranks(spectra, ratio_pct / 100)
    everything = np.sort(np.concatenate(list(spectra.values())))[::-1]
    keep = (ratio_pct * everything.size) // 100
    threshold = everything[keep - 1] if keep else np.inf
    for name, values in spectra.items():
        assert ranks[name] == max(1, int(np.sum(values >= threshold)))
    assert ranks.full == {name: len(v) for name, v in spectra.items()}


def test_retained_fraction_and_overrides():
    ranks = Ranks({"a": 1, "b": 4, "c": 3}, full={"a": 4, "b": 4, "c": 6})
    assert jaxlr.retained_fraction(ranks) == pytest.approx((0.25 + 1.0 + 0.5) / 3)
    changed = ranks.with_overrides({"a": 2})
    assert dict(changed) == {"a": 2, "b": 4, "c": 3} and dict(ranks)["a"] == 1
    assert "retained singular values" in ranks.table() and "b" in ranks.table()
    with pytest.raises(ValueError, match=r"overrides name paths without a rank: \['d'\]"):
        ranks.with_overrides({"d": 1})
    with pytest.raises(ValueError, match="'c' is 7; allowed 1 <= rank <= min"):
        ranks.with_overrides({"c": 7})
    with pytest.raises(TypeError, match="needs a Ranks"):
        jaxlr.retained_fraction({"a": 1})


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
    with pytest.raises(ValueError, match=r"ratio must lie in \[0.0, 1.0\), got 1.0"):
        jaxlr.ratio_ranks(tree, 1.0)
    with pytest.raises(ValueError, match=r"ratio must lie in \[0.0, 1.0\), got -0.1"):
        jaxlr.ratio_ranks(tree, -0.1)
    with pytest.raises(ValueError, match=r"ratio must lie in \(0.0, 1.0\], got 0.0"):
        jaxlr.lsvt_ranks(tree, 0.0)
    with pytest.raises(ValueError, match=r"fraction must lie in \(0.0, 1.0\], got 1.5"):
        jaxlr.energy_ranks({"a": [1.0]}, 1.5)
    with pytest.raises(ValueError, match="fraction must lie"):
        jaxlr.energy_ranks({"a": [1.0]}, float("nan"))
    with pytest.raises(TypeError, match="ratio must be a number"):
        jaxlr.gsvt_ranks({"a": [1.0]}, "half")
    with pytest.raises(ValueError, match="normalize must be 'none' or 'max'"):
        jaxlr.gsvt_ranks({"a": [1.0]}, 0.5, normalize="sum")
    with pytest.raises(ValueError, match=r"pools assign no pool to \['b'\]"):
        jaxlr.gsvt_ranks({"a": [1.0], "b": [1.0]}, 0.5, pools={"a": "x"})
    with pytest.raises(ValueError, match="must be finite"):
        jaxlr.gsvt_ranks({"a": [1.0, np.nan]}, 0.5)
    with pytest.raises(ValueError, match="singular_values is empty"):
        jaxlr.energy_ranks({}, 0.5)
