"""experiments.stats (intervals, paired verdicts), experiments.truncation.curves and
experiments.evidence (its measurements, checked against independent computations, and its smoke
preset)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlr
from experiments import data as data_lib
from experiments import evidence, models, presets, stats, truncation
from experiments.results import Results
from experiments.train import evaluate

# Student's t quantiles from a printed table (two-sided 95%: 0.975 quantile).
T975 = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262}


@pytest.mark.parametrize("values", [[0.9, 0.92, 0.91, 0.93, 0.94], [1.0, 3.0], list(range(10))])
def test_summarize_against_a_hand_computed_interval(values):
    s = stats.summarize(values)
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T975[n - 1] * std / math.sqrt(n)
    assert s.n == n and s.mean == pytest.approx(mean) and s.std == pytest.approx(std)
    assert s.low == pytest.approx(mean - half, rel=1e-3, abs=1e-6)
    assert s.high == pytest.approx(mean + half, rel=1e-3, abs=1e-6)


def test_summarize_refuses_what_has_no_spread():
    with pytest.raises(ValueError, match="at least two"):
        stats.summarize([0.5])
    with pytest.raises(ValueError, match="finite"):
        stats.summarize([0.5, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        stats.summarize([0.5, 0.6], confidence=1.0)


def test_compare_decides_by_the_interval_of_the_paired_difference():
    base = np.array([0.90, 0.80, 0.95, 0.70, 0.85])  # a large spread between seeds
    # The same small gain on every seed: the seeds' spread cancels in the pairs.
    gain = stats.compare(base + 0.01, base, "greater")
    assert gain.verdict == "holds" and gain.agree == 5
    assert gain.difference.mean == pytest.approx(0.01)
    assert stats.compare(base - 0.01, base, "greater").verdict == "does not hold"
    assert stats.compare(base - 0.01, base, "less").verdict == "holds"
    # Differences +0.02, -0.01, +0.01, -0.02, +0.005: the interval contains 0.
    mixed = base + np.array([0.02, -0.01, 0.01, -0.02, 0.005])
    result = stats.compare(mixed, base, "greater")
    assert result.verdict == "not separable" and result.agree == 3
    # Equivalence: within +-0.01 held, shifted by 0.05 not.
    close = base + np.array([0.001, -0.001, 0.002, 0.0, -0.002])
    assert stats.compare(close, base, "equal", margin=0.01).verdict == "holds"
    assert stats.compare(base + 0.05, base, "equal", margin=0.01).verdict == "does not hold"
    assert stats.compare(mixed, base, "equal", margin=0.01).verdict == "not separable"


def test_compare_refuses_bad_arguments():
    with pytest.raises(ValueError, match="one number per seed"):
        stats.compare([1, 2, 3], [1, 2], "greater")
    with pytest.raises(ValueError, match="claim"):
        stats.compare([1, 2], [1, 2], "bigger")
    with pytest.raises(ValueError, match="margin"):
        stats.compare([1, 2], [1, 2], "equal")
    with pytest.raises(ValueError, match="margin"):
        stats.compare([1, 2], [1, 2], "greater", margin=0.1)


def test_smallest_budget_needs_every_larger_budget_within_the_tolerance():
    rows = [{"policy": "none", "retained": 1.0, "test": 0.950},
            {"policy": "GSVT", "retained": 0.4, "test": 0.951},
            {"policy": "GSVT", "retained": 0.2, "test": 0.946},
            {"policy": "GSVT", "retained": 0.1, "test": 0.930},
            {"policy": "GSVT", "retained": 0.05, "test": 0.949},  # a lucky dip is not taken
            {"policy": "LSVT", "retained": 0.4, "test": 0.90}]
    assert truncation.smallest_budget(rows, "GSVT", "test", 0.005) == 0.2
    assert truncation.smallest_budget(rows, "GSVT", "test", 0.03) == 0.05
    assert truncation.smallest_budget(rows, "LSVT", "test", 0.005) == 1.0


def test_energy_fraction_by_hand():
    # 16 + 9 + 1 + 0 = 26: 16 is 61.5%, 25 is 96.2% of it.
    assert evidence.energy_fraction(np.array([3.0, 4.0, 1.0, 0.0])) == 0.5
    assert evidence.energy_fraction(np.ones(10)) == pytest.approx(0.9)
    assert evidence.energy_fraction(np.array([1.0, 0.0, 0.0, 0.0, 0.0])) == 0.2


def test_matrix_view_round_trip_of_a_convolution_kernel():
    kernel = np.arange(3 * 3 * 2 * 4, dtype=np.float32).reshape(3, 3, 2, 4)
    leaf = jaxlr.selection.matrix_leaves({"conv": {"kernel": kernel}})["conv/kernel"]
    matrix = truncation._matrix(leaf, kernel)
    np.testing.assert_array_equal(matrix, kernel.reshape(18, 4))
    np.testing.assert_array_equal(truncation._kernel(leaf, matrix), kernel)


@pytest.fixture(scope="module")
def digits():
    return data_lib.load("digits")


def test_truncation_curves_agree_with_jaxlr_compress(digits):
    model = models.FCN(4, 24)
    variables = model.init(jax.random.key(1), jnp.ones((1, 8, 8, 1)))
    hidden = jaxlr.kernel_filter(exclude="head")
    rows = truncation.curves(model, variables, digits, (0.5, 0.2), filter=hidden,
                             policies=("GSVT", "LSVT"))
    assert [(r["policy"], r["budget"]) for r in rows] == [
        ("none", 1.0), ("GSVT", 0.5), ("GSVT", 0.2), ("LSVT", 0.5), ("LSVT", 0.2)]
    for row in rows:
        if row["policy"] == "none":
            ranks, params = None, variables["params"]
        elif row["policy"] == "GSVT":
            ranks = jaxlr.gsvt_ranks(variables["params"], keep=row["budget"], filter=hidden)
        else:
            ranks = jaxlr.lsvt_ranks(variables["params"], keep=row["budget"], filter=hidden)
        if ranks is not None:
            params = jaxlr.collapse(jaxlr.compress(variables["params"], ranks).compressed)
            assert row["retained"] == pytest.approx(jaxlr.policies.retained_fraction(ranks))
        for split in ("validation", "test"):
            expected = evaluate(model, {"params": params}, digits, split)["accuracy"]
            assert abs(row[split] - expected) <= 1 / len(digits.split(split))


def test_config_refuses_settings_that_cannot_give_evidence():
    with pytest.raises(presets.SettingsError, match="depths must hold 1"):
        evidence.Config(depths=(2, 3))
    with pytest.raises(presets.SettingsError, match="seeds"):
        evidence.Config(seeds=(0,))
    with pytest.raises(presets.SettingsError, match="seeds"):
        evidence.Config(seeds=(1, 1))
    with pytest.raises(presets.SettingsError, match="ratios"):
        evidence.Config(ratios=(0.5, 1.0))
    with pytest.raises(presets.SettingsError, match="margin"):
        evidence.Config(margin=0.0)
    with pytest.raises(presets.SettingsError, match="confidence"):
        evidence.Config(confidence=1.5)


def test_smoke_preset(tmp_path):
    config = evidence.PRESETS["smoke"]
    out = evidence.run(config, Results(tmp_path), progress=False)
    seeds, ratios = len(config.seeds), len(config.ratios)
    assert len(out["lorita"]) == seeds * len(config.fcn_depths) * len(config.depths)
    assert len(out["lrpet"]) == seeds * (1 + ratios * (1 + len(evidence.ABLATION)))
    claims = len(evidence.LORITA_CLAIMS) * len(config.fcn_depths) * (len(config.depths) - 1)
    assert len(out["lorita_verdicts"]) == claims
    assert len(out["lrpet_verdicts"]) == ratios * len(evidence.LRPET_CLAIMS)
    for row in out["lorita_verdicts"] + out["lrpet_verdicts"]:
        assert row["verdict"] in stats.VERDICTS
    # One epoch of LRP is one epoch of plain SGD projected once at its end: the baseline
    # truncated to the same ranks, up to the decomposition's rounding.
    for seed in config.seeds:
        for ratio in config.ratios:
            by = {r["method"]: r for r in out["lrpet"]
                  if r["seed"] == seed and r["ratio"] == ratio}
            assert abs(by["LRP"]["test"] - by[evidence.TRUNCATED]["test"]) <= 1.5 / 359
    # A verdict row's numbers are its seeds' numbers.
    first = out["lrpet_verdicts"][0]
    tests = {m: [r["test"] for r in out["lrpet"] if r["method"] == m
                 and r["ratio"] == config.ratios[0]] for m in ("LRP+ET", "LRP")}
    assert first["a"] == pytest.approx(np.mean(tests["LRP+ET"]))
    assert first["difference"] == pytest.approx(np.mean(tests["LRP+ET"]) - np.mean(tests["LRP"]))
    for name in ("report.md", "accuracy_drop.png", "spectra.png", "lrpet.png",
                 "lorita_verdicts.csv", "lrpet_summary.md"):
        assert (tmp_path / name).stat().st_size > 0


def test_smoke_preset_runs_from_the_command_line(tmp_path):
    out = evidence.main(["--preset", "smoke", "--no-progress", "--output-dir", str(tmp_path),
                         "--set", "seeds=(3, 4)", "--set", "ratios=(0.5,)"])
    assert {r["seed"] for r in out["lrpet"]} == {3, 4}
    assert dataclasses.asdict(evidence.PRESETS["smoke"])["seeds"] == (0, 1)


def test_readme_blocks_word_each_verdict_as_its_row_says(tmp_path):
    from experiments import figures

    config = evidence.PRESETS["smoke"]
    out = evidence.run(config, Results(tmp_path), progress=False)
    readme, docs = figures.evidence_blocks(out, config, "this machine")
    verdicts = list(out["lorita_verdicts"]) + list(out["lrpet_verdicts"])
    words = {line for line in readme.splitlines() if line.startswith("* ")}
    for row in verdicts:
        (line,) = [w for w in words if w.startswith(f"* {row['what']}:")]
        part = line.split(f"**{row['verdict']}** for ")[1].split(";")[0]
        assert row["where"] in part, (row, line)
    for name in figures.EVIDENCE_FIGURES.values():
        assert f"]({name.name})" in readme
    # Every seed's run is in the docs block.
    assert docs.count("\n| FCN-3 |") >= len(config.seeds) * len(config.depths)
