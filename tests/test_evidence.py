"""experiments.stats (intervals, paired verdicts), experiments.truncation.curves and
experiments.evidence (its measurements, checked against independent computations, and its smoke
preset)."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlr
from experiments import data as data_lib
from experiments import evidence, models, presets, stats, truncation
from experiments.results import Results
from experiments.train import evaluate

ROOT = Path(__file__).resolve().parent.parent

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
        stats.compare([1, 2], [1, 2], "greater", margin=-0.1)


def test_a_margin_lets_a_directional_claim_fail():
    base = np.array([0.30, 0.25, 0.40, 0.35, 0.20])
    # Differences -0.004 .. +0.004 around 0: mean 0, sd 0.00316, t(0.975, 4) = 2.776.
    near = base + np.array([-0.004, 0.004, -0.002, 0.002, 0.0])
    half = 2.776 * np.std([-0.004, 0.004, -0.002, 0.002, 0.0], ddof=1) / math.sqrt(5)
    assert half == pytest.approx(0.003927, abs=1e-5)
    # A reduction of 0.03 is excluded (the interval lies above -0.03): the claim does not hold.
    assert stats.compare(near, base, "less", margin=0.03).verdict == "does not hold"
    # A margin inside the interval's reach cannot exclude it: not separable.
    assert stats.compare(near, base, "less", margin=0.003).verdict == "not separable"
    # Without a margin the same data is only "not separable" (the round-1 rule).
    assert stats.compare(near, base, "less").verdict == "not separable"
    assert stats.compare(near, base, "greater", margin=0.03).verdict == "does not hold"
    # A clear reduction holds whatever the margin.
    assert stats.compare(base - 0.1, base, "less", margin=0.03).verdict == "holds"


def test_detectable_effect_from_printed_t_quantiles():
    # t(0.975, 4) = 2.776, t(0.8, 4) = 0.941; t(0.975, 9) = 2.262, t(0.8, 9) = 0.883.
    assert stats.detectable_effect(0.01, 5) == pytest.approx((2.776 + 0.941) * 0.01 / math.sqrt(5),
                                                             rel=1e-3)
    assert stats.detectable_effect(2.0, 10) == pytest.approx((2.262 + 0.883) * 2 / math.sqrt(10),
                                                             rel=1e-3)
    comparison = stats.compare([1.0, 2.0, 4.0], [0.0, 0.0, 0.0], "greater")
    assert comparison.detectable == pytest.approx(
        stats.detectable_effect(comparison.difference.std, 3))
    with pytest.raises(ValueError, match="n must be"):
        stats.detectable_effect(1.0, 1)


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
        evidence.Config(seeds=(1,))
    with pytest.raises(presets.SettingsError, match="seeds"):
        evidence.Config(seeds=(1, 1))
    with pytest.raises(presets.SettingsError, match="tuning_seed 1 must not be"):
        evidence.Config(tuning_seed=1)
    with pytest.raises(presets.SettingsError, match="ratios"):
        evidence.Config(ratios=(0.5, 1.0))
    with pytest.raises(presets.SettingsError, match="energy_margin"):
        evidence.Config(energy_margin=0.0)
    with pytest.raises(presets.SettingsError, match="confidence"):
        evidence.Config(confidence=1.5)
    with pytest.raises(presets.SettingsError, match="arms"):
        evidence.Config(arms=("jaxlr", "mine"))
    with pytest.raises(presets.SettingsError, match="decay_ladder"):
        evidence.Config(weight_decays=(2e-3,))
    with pytest.raises(presets.SettingsError, match="consecutive"):
        evidence.Config(weight_decays=(1e-4, 1e-3))
    with pytest.raises(presets.SettingsError, match="drop_budgets"):
        evidence.Config(drop_budgets=(0.033,))


def test_tuning_rule_takes_the_largest_decay_within_the_margin():
    config = evidence.PRESETS["default"]  # decay_margin 0.005
    fits = {1e-4: 0.9700, 3e-4: 0.9650, 1e-3: 0.9645, 3e-3: 0.9600}
    # Best 0.97; within 0.5 points (>= 0.965): 1e-4 and 3e-4 (exactly at it), not 1e-3.
    assert evidence.tune(config, {d: {"final_validation": v} for d, v in fits.items()}) == 3e-4


def _fake_fits(monkeypatch, validation):
    trained = []

    def fake(config, arm, data, n, decay, seed, results, progress):
        trained.append(decay)
        return {"final_validation": validation(decay), "best_validation": validation(decay),
                "best_epoch": 1}

    monkeypatch.setattr(evidence, "fit_lorita", fake)
    return trained


def test_tuning_extends_the_grid_past_an_edge_until_the_choice_is_inside(monkeypatch):
    config = dataclasses.replace(evidence.PRESETS["default"], extend=2)  # grid 3e-4, 1e-3, 3e-3
    arm = evidence.ARMS["jaxlr"]
    # Flat up to 3e-3, worse at 1e-2: 3e-3 is at the top edge, one step up brackets it.
    trained = _fake_fits(monkeypatch, lambda d: 0.95 if d <= 3e-3 else 0.93)
    chosen, rows = evidence._tune_arm(config, arm, None, 3, None, False)
    assert trained == [3e-4, 1e-3, 3e-3, 1e-2] and chosen == 3e-3
    assert [r["chosen"] for r in rows] == ["", "", "yes", ""]
    # Smaller decays better: the bottom edge extends down twice, 1e-4 is then inside.
    values = {3e-5: 0.966, 1e-4: 0.97, 3e-4: 0.95, 1e-3: 0.94, 3e-3: 0.94}
    trained = _fake_fits(monkeypatch, values.get)
    chosen, rows = evidence._tune_arm(config, arm, None, 1, None, False)
    assert trained == [3e-4, 1e-3, 3e-3, 1e-4, 3e-5] and chosen == 1e-4
    # Every decay alike: the top edge extends twice and the choice stays at the edge, marked.
    trained = _fake_fits(monkeypatch, lambda d: 0.95)
    chosen, rows = evidence._tune_arm(config, arm, None, 1, None, False)
    assert trained == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2] and chosen == 3e-2
    assert rows[-1]["chosen"] == "yes (at the grid's edge)"
    # The default extends until the choice is inside: rising to 3e-1, lower at 1.0.
    trained = _fake_fits(monkeypatch, lambda d: 0.9 + d / 10 if d <= 0.3 else 0.9)
    chosen, rows = evidence._tune_arm(evidence.PRESETS["default"], arm, None, 1, None, False)
    assert trained == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0] and chosen == 3e-1
    assert [r["chosen"] for r in rows][-2:] == ["yes", ""]


def test_recomputed_batch_statistics_are_the_mean_of_each_batch_s(digits):
    model = models.FCN(2, 6, batch_norm=True)
    variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    variables = {**variables, "batch_stats": jax.tree.map(lambda x: x + 7.0,
                                                          variables["batch_stats"])}
    out = truncation.recompute_batch_stats(model, variables, digits, batch_size=256)
    kernel = np.asarray(variables["params"]["fc0"]["kernel"], np.float64)
    means, variances = [], []
    for start in range(0, len(digits.train) - 255, 256):
        x = digits.normalize(digits.train.images[start:start + 256]).reshape(256, -1)
        h = x.astype(np.float64) @ kernel  # fc0 has no bias before its BatchNorm
        means.append(h.mean(0))
        variances.append(h.var(0))
    assert len(means) == len(digits.train) // 256
    np.testing.assert_allclose(out["batch_stats"]["bn0"]["mean"], np.mean(means, 0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["batch_stats"]["bn0"]["var"], np.mean(variances, 0),
                               rtol=1e-4, atol=1e-5)


def test_fcn_head_norm_normalises_the_classifier_output():
    model = models.FCN(3, 8, batch_norm=True, head_norm=True)
    x = jax.random.normal(jax.random.key(0), (64, 8, 8, 1))
    variables = model.init(jax.random.key(1), x)
    assert "bias" not in variables["params"]["head"] and "bn_head" in variables["batch_stats"]
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.mean(np.asarray(logits), 0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.var(np.asarray(logits), 0), 1.0, atol=1e-3)


def test_check_factored_refuses_a_ranked_kernel_held_dense():
    params = {"a": {"kernel": jnp.ones((4, 3))}}
    pair = jaxlr.compress(params, {"a/kernel": 1}).compressed
    evidence._check_factored(pair, {"a/kernel": 1})
    with pytest.raises(ValueError, match="a/kernel"):
        evidence._check_factored(params, {"a/kernel": 1})


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    config = evidence.PRESETS["smoke"]
    path = tmp_path_factory.mktemp("smoke")
    return config, path, evidence.run(config, Results(path), progress=False)


def test_smoke_preset(smoke):
    config, path, out = smoke
    seeds, ratios = len(config.seeds), len(config.ratios)
    arms, depths = len(config.arms), len(config.depths)
    assert len(out["lorita"]) == arms * depths * seeds * 2  # final and best
    assert len(out["lorita_tuning"]) == arms * depths * len(config.weight_decays)
    assert len(out["lrpet"]) == seeds * (1 + ratios * (2 + len(evidence.ABLATION)))
    assert len(out["lorita_verdicts"]) == arms * 2 * (depths - 1) * len(evidence.endpoints(config))
    assert len(out["lrpet_verdicts"]) == ratios * len(evidence.LRPET_CLAIMS)
    for row in out["lorita_verdicts"] + out["lrpet_verdicts"]:
        assert row["verdict"] in stats.VERDICTS and row["detectable"] >= 0
    # A verdict row's numbers are its seeds' numbers.
    first = out["lrpet_verdicts"][0]
    tests = {m: [r["test"] for r in out["lrpet"] if r["method"] == m
                 and r["ratio"] == config.ratios[0]] for m in ("LRP+ET", "LRP")}
    assert first["a"] == pytest.approx(np.mean(tests["LRP+ET"]))
    assert first["difference"] == pytest.approx(np.mean(tests["LRP+ET"]) - np.mean(tests["LRP"]))
    energy = [v for v in out["lorita_verdicts"] if v["what"].startswith("singular values")][0]
    runs = {(r["N"], r["seed"]): r["energy"] for r in out["lorita"]
            if r["arm"] == config.arms[0] and r["at"] == "final"}
    assert energy["difference"] == pytest.approx(np.mean(
        [runs[2, s] - runs[1, s] for s in config.seeds]))
    # The released arm pools the classifier too; the jaxlr arm leaves it out.
    released = [r for r in out["lorita"] if r["arm"] == "released"][0]
    plain = [r for r in out["lorita"] if r["arm"] == "jaxlr"][0]
    assert any("head" in p for p in released["spectra"])
    assert not any("head" in p for p in plain["spectra"])
    for name in ("report.md", "accuracy_drop.png", "spectra.png", "lrpet.png",
                 "lorita_verdicts.csv", "lrpet_runs.md", "numbers.json"):
        assert (path / name).stat().st_size > 0


def test_the_same_command_twice_gives_the_same_numbers(smoke, tmp_path):
    # Each run a new process, as a user runs the command (both at once: two cores).
    command = [sys.executable, "-m", "experiments.evidence", "--preset", "smoke", "--no-progress"]
    runs = [subprocess.Popen([*command, "--output-dir", str(tmp_path / name)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name in ("first", "second")]
    for run in runs:
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output[-3000:]
    first, second = (json.loads((tmp_path / name / "numbers.json").read_text())
                     for name in ("first", "second"))
    assert first == second
    assert len(first["lorita"]) == len(smoke[2]["lorita"])
    # The digest is of these numbers, and sees a change in the last digit.
    numbers = {k: v for k, v in first.items() if k != "digest"}
    assert evidence.digest(numbers) == first["digest"]
    numbers["lrpet"][0]["test"] += 1e-12
    assert evidence.digest(numbers) != first["digest"]


def test_smoke_preset_runs_from_the_command_line(tmp_path):
    out = evidence.main(["--preset", "smoke", "--no-progress", "--output-dir", str(tmp_path),
                         "--set", "seeds=(3, 4)", "--set", "lrpet_seeds=(3, 5)",
                         "--set", "arms=('jaxlr',)",
                         "--set", "ratios=(0.5,)", "--set", "lrpet_train.epochs=1"])
    assert {r["seed"] for r in out["lorita"]} == {3, 4}
    assert {r["seed"] for r in out["lrpet"]} == {3, 5}
    assert {r["arm"] for r in out["lorita"]} == {"jaxlr"}
    assert evidence.PRESETS["smoke"].seeds == (1, 2)


def test_blocks_word_each_verdict_as_its_row_says(smoke):
    from experiments import figures

    config, _, out = smoke
    block, docs = figures.evidence_blocks(out, config)
    verdicts = list(out["lorita_verdicts"]) + list(out["lrpet_verdicts"])
    words = {line for line in block.splitlines() if line.startswith("* ")}
    for row in verdicts:
        (line,) = [w for w in words if w.startswith(f"* {row['what']}:")]
        part = line.split(f"**{row['verdict']}** for ")[1].split(". **")[0].removesuffix(".")
        assert row["where"] in part.split("; "), (row, line)
    for name in figures.EVIDENCE_FIGURES.values():
        assert f"]({name.name})" in block
    assert out["digest"] in block
    # Every seed's run is in the docs block, at both checkpoints.
    assert docs.count("\n| jaxlr |") >= len(config.seeds) * len(config.depths) * 2


def test_reproducibility_block_reports_each_change_from_the_first_run():
    from experiments import reproducibility

    first = {"variant": "this machine", "machine": "m", "weights": "aa", "validation": 0.95,
             "test": 0.9400, "energy": 0.25, "budget@0.005": 0.05, "drop@0.05": 0.0100}
    other = {**first, "variant": "1 core", "weights": "bb", "test": 0.9385, "drop@0.05": 0.0250}
    text = reproducibility.block([first, other], 5, 1, 3, 1e-3)
    (row,) = [line for line in text.splitlines() if line.startswith("| 1 core |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["1 core", "`bb`", "0.9500 (+0.0000)", "0.9385 (-0.0015)",
                     "0.2500 (+0.0000)", "0.0500 (+0.0000)", "0.0250 (+0.0150)"]
    assert "--epochs 5 --seed 1 --depth 3 --decay 0.001" in text


def test_reproducibility_refuses_a_core_count_it_cannot_pin():
    from experiments import reproducibility

    with pytest.raises(ValueError, match="cores must be in"):
        reproducibility.run_variant(1, 1, 3, 1e-3, cores=0)
