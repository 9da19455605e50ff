"""The paper-by-paper experiment modules under their smoke presets: tables in the papers' layout,
plots, and the rank search's ranks feeding lrpet_cifar."""

import csv
import json
import math

import pytest

import jaxlr
from experiments import figures, lorita_cnn, lorita_fcn, lorita_vit, lrpet_cifar, rank_search


def header(path):
    with path.open() as file:
        return next(csv.reader(file))


def pngs(directory):
    return sorted(p.name for p in directory.glob("*.png")
                  if p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n")


def smoke(module, tmp_path, *settings):
    argv = ["--preset", "smoke", "--output-dir", str(tmp_path), "--no-progress"]
    for setting in settings:
        argv += ["--set", setting]
    return module.main(argv)


def test_every_module_has_the_three_presets():
    for module in (lorita_fcn, lorita_vit, lorita_cnn, lrpet_cifar, rank_search):
        assert set(module.PRESETS) == {"smoke", "default", "paper"}
        assert module.PRESETS["paper"].data in ("mnist", "cifar10")


def test_lorita_fcn_smoke(tmp_path):
    out = smoke(lorita_fcn, tmp_path)
    assert header(tmp_path / "table1.csv") == ["model", "N = 1", "N = 2", "decay N = 1",
                                               "decay N = 2"]
    assert "not the paper's data" in (tmp_path / "table1.md").read_text()
    assert pngs(tmp_path) == ["accuracy_drop_FCN-3.png", "singular_values_FCN-3.png"]
    assert {r["N"] for r in out["training"]} == {1, 2}
    # docs/reproducing.md's words for it hold the numbers of the run.
    words = lorita_fcn.summarize(lorita_fcn.PRESETS["smoke"], out)
    assert figures.findings("lorita_fcn", lorita_fcn.PRESETS["smoke"], out) == words
    for depth in (1, 2):
        (row,) = [r for r in out["truncation"] if r["N"] == depth and r["policy"] == "GSVT"
                  and r["budget"] == 0.1]
        assert f"{row['test']:.3f}" in words


def test_lorita_vit_smoke_pools_attention_and_mlp(tmp_path):
    out = smoke(lorita_vit, tmp_path)
    for table in ("table1", "table2"):
        assert header(tmp_path / f"{table}.csv") == ["model", "N = 2", "decay N = 2"]
    assert len(pngs(tmp_path)) == 4
    gsvt = [r for r in out["truncation"] if r["policy"] == "GSVT"]
    assert gsvt and all(set(r["ranks"]) == {"block0/attn/query/kernel", "block0/attn/key/kernel",
                                            "block0/attn/value/kernel", "block0/attn/out/kernel",
                                            "block0/fc1/kernel", "block0/fc2/kernel"}
                        for r in gsvt)
    # Attention and MLP matrices are ranked in separate pools: each pool keeps its own budget.
    blocks = jaxlr.kernel_filter(include="^block")
    for row in gsvt:
        run = next(r for r in out["training"] if r["model"] == row["model"]
                   and r["N"] == row["N"] and r["chosen"])
        params = run["variables"]["params"]
        assert row["ranks"] == dict(jaxlr.gsvt_ranks(params, keep=row["budget"], pools="kind",
                                                     filter=blocks))
    words = lorita_vit.summarize(lorita_vit.PRESETS["smoke"], out)
    tests = sorted(r["test"] for r in out["training"] if r["chosen"])
    assert f"{tests[0]:.3f}" in words and f"{tests[-1]:.3f}" in words


def test_lorita_cnn_smoke_reaches_its_flop_target(tmp_path):
    out = smoke(lorita_cnn, tmp_path)
    assert header(tmp_path / "table2.csv") == ["model", "N = 2", "decay N = 2"]
    assert header(tmp_path / "table3_4.csv")[:4] == ["model", "N", "target", "budget"]
    for row in out["compressed"]:
        assert row["macs_drop"] >= row["target"]
        assert 0 < row["budget"] <= 1 and row["params_drop"] > 0
    assert len(pngs(tmp_path)) == 2
    words = lorita_cnn.summarize(lorita_cnn.PRESETS["smoke"], out)
    assert all(f"keeps {r['tuned']:.3f} ({r['dense']:.3f} dense" in words
               for r in out["compressed"])


def test_rank_search_and_lrpet_cifar_smoke(tmp_path):
    search = smoke(rank_search, tmp_path / "search")
    config = rank_search.PRESETS["smoke"]
    assert len(search["trials"]) == config.trials
    for name, rank in search["ranks"].items():
        n = search["full_ranks"][name]
        assert max(1, math.floor(n - n * config.max_prune)) <= rank
        assert rank <= max(1, math.floor(n - n * config.min_prune))
    assert json.loads((tmp_path / "search" / "ranks.json").read_text()) == search["ranks"]
    assert min(t["score"] for t in search["trials"]) == pytest.approx(
        min(t["validation_error"] + config.lam * t["macs_ratio"] for t in search["trials"]))
    words = rank_search.summarize(config, search)
    assert f"the best score is {min(t['score'] for t in search['trials']):.3f}" in words

    out = smoke(lrpet_cifar, tmp_path / "lrpet",
                f"ranks_file={tmp_path / 'search' / 'ranks.json'}")
    assert header(tmp_path / "lrpet" / "main.csv") == [
        "model", "pt", "method", "ratio", "accuracy", "change", "macs", "macs_pr", "params",
        "params_pr"]
    for table in ("ablation", "grad_norms", "timing"):
        assert (tmp_path / "lrpet" / f"{table}.csv").exists()
    # The searched ranks are the ones used: parameters and MACs of the factored model by hand.
    r0, r1 = search["ranks"]["conv0/kernel"], search["ranks"]["conv1/kernel"]
    conv0 = 9 * r0 + r0 * 4 if r0 * 13 < 36 else 36
    conv1 = 36 * r1 + r1 * 8 if r1 * 44 < 288 else 288
    dense_params = 36 + 4 + 2 * 4 + 288 + 8 + 2 * 8 + 32 * 10 + 10
    for row in out["main"]:
        if row["method"] == "LRPET":
            assert row["params"] == dense_params - 36 - 288 + conv0 + conv1
            assert row["macs"] == 64 * conv0 + 16 * conv1 + 320
    words = lrpet_cifar.summarize(lrpet_cifar.PRESETS["smoke"], out)
    changes = [r["change"] for r in out["main"] if r["method"] == "LRPET"]
    assert f"{min(changes):+.3f}" in words
    assert all(f"{r['method']} {r['accuracy']:.3f}" in words for r in out["ablation"])
    assert all(f"{r['method']} {r['ratio']:.2f}x" in words for r in out["timing"][1:])


def test_rank_search_is_the_same_search_for_the_same_settings(tmp_path):
    """The random trials are drawn from the seed, so two runs make the same trials and scores."""
    config = rank_search.PRESETS["smoke"]
    first, second = (rank_search.run(config, rank_search.Results(tmp_path / name), False)
                     for name in ("a", "b"))
    assert [t["ranks"] for t in first["trials"]] == [t["ranks"] for t in second["trials"]]
    assert [t["score"] for t in first["trials"]] == [t["score"] for t in second["trials"]]
    assert len({json.dumps(t["ranks"], sort_keys=True) for t in first["trials"]}) > 1


def test_data_aware_smoke_measures_every_cut_and_compares_by_seed(tmp_path):
    from experiments import data_aware, stats

    config = data_aware.PRESETS["smoke"]
    out = smoke(data_aware, tmp_path)
    rows = out["rows"]
    fits = len(config.fcn_depths) + 2
    cuts = len(data_aware.METHODS) * len(data_aware.POLICIES) * len(config.reductions)
    assert len(rows) == len(config.seeds) * fits * (1 + cuts)
    for row in rows:
        if row["method"] != "none" and row["test"] is not None:
            assert 0.0 <= row["test"] <= 1.0 and 0.0 < row["kept"] < 1.0
    # Each comparison is stats.compare of the rows it names, recomputed here.
    first = out["comparisons"][0]
    assert first["comparison"].endswith("data-aware vs plain")

    def accuracies(method):
        return [next(r["test"] for r in rows if r["seed"] == seed and r["family"] == "fcn"
                     and r["N"] == 1 and r["method"] == method and r["policy"] == first["policy"]
                     and r["reduction"] == first["reduction"]) for seed in config.seeds]

    expected = stats.compare(accuracies("data-aware"), accuracies("plain"), "greater",
                             margin=config.accuracy_margin)
    assert first["verdict"] == expected.verdict
    assert first["difference"] == pytest.approx(expected.difference.mean)
    assert "data-aware" in out["report"] and (tmp_path / "data_aware.png").exists()
    # The same command in a new process gives the same numbers.
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "experiments.data_aware", "--preset", "smoke",
                    "--output-dir", str(tmp_path / "again"), "--no-progress"], check=True,
                   capture_output=True, timeout=240)
    again = json.loads((tmp_path / "again" / "rows.json").read_text())
    assert data_aware.digest(again) == out["digest"] == data_aware.digest(rows)
