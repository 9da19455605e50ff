"""The main job (python -m experiments) under the smoke preset: its tables, plots and files."""

import csv
import json
import math

import numpy as np
import pytest

from experiments import main as main_job


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("main")
    return out, main_job.main(["--preset", "smoke", "--output-dir", str(out), "--no-progress"])


def test_main_job_writes_its_results_directory(smoke):
    out, _ = smoke
    for name in ("lorita_training", "lorita_truncation", "lorita_accepted", "lrpet"):
        assert (out / f"{name}.md").read_text().count("|") > 10
        assert (out / f"{name}.csv").exists()
    for name in ("accuracy_drop", "singular_values", "lrpet_training"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["depths"] == [1, 3] and config["lorita_train"]["epochs"] == 2
    summary = (out / "summary.md").read_text()
    assert "## lrpet" in summary and "## lorita_truncation" in summary
    for run in ("FCN-3_N1_wd0.001", "FCN-3_N3_wd0.001", "lrp", "lrpet", "no_projection"):
        (path,) = (out / "runs").glob(f"{run}-*")
        lines = (path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
        assert (path / "checkpoints" / "last").is_dir()
        settings = json.loads((path / "settings.json").read_text())
        assert settings["seed"] == 0 and settings["train"]["batch_size"] == 64


def run_dirs(out):
    """``{run directory name: modification time of its last checkpoint's checksums}``."""
    return {path.name: max(p.stat().st_mtime_ns for p in path.glob(
        "checkpoints/last/*/jaxlr_checksums.json")) for path in (out / "runs").iterdir()}


def test_changed_settings_train_anew_and_unchanged_runs_are_reused(tmp_path):
    """Run again into the same directory with another learning rate, then another pruning
    ratio: exactly the runs that depend on the changed setting are trained anew (in new
    directories); the others are found finished and not touched."""
    smoke = ["--preset", "smoke", "--output-dir", str(tmp_path), "--no-progress"]
    first = main_job.main(smoke)
    before = run_dirs(tmp_path)
    lorita = {name for name in before if name.startswith("FCN")}
    lrpet = set(before) - lorita
    assert len(lorita) == 2 and len(lrpet) == 3

    second = main_job.main([*smoke, "--set", "learning_rate=0.01"])
    after = run_dirs(tmp_path)
    new = set(after) - set(before)
    assert len(new) == 2 and all(name.startswith("FCN") for name in new)
    assert {name: after[name] for name in before} == before  # nothing rewritten
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 0.01
    # The tables now describe the new runs: LoRITa's changed, LRPET's (reused) identical.
    old_val = [r["validation"] for r in first["lorita"]["training"]]
    new_val = [r["validation"] for r in second["lorita"]["training"]]
    assert old_val != new_val
    assert first["lrpet"]["rows"] == second["lrpet"]["rows"]
    for name in new:
        assert json.loads((tmp_path / "runs" / name / "settings.json").read_text())[
            "learning_rate"] == 0.01

    main_job.main([*smoke, "--set", "learning_rate=0.01", "--set", "prune=0.5"])
    last = run_dirs(tmp_path)
    assert len(set(last) - set(after)) == 3
    assert all(not name.startswith("FCN") for name in set(last) - set(after))
    assert {name: last[name] for name in after} == after


def test_lorita_tables_cover_both_depths_and_policies(smoke):
    out, result = smoke
    with (out / "lorita_truncation.csv").open() as file:
        rows = list(csv.DictReader(file))
    seen = {(r["N"], r["policy"], r["budget"]) for r in rows}
    config = main_job.PRESETS["smoke"]
    assert seen == {(str(n), p, str(b)) for n in (1, 3) for p in ("LSVT", "GSVT")
                    for b in config.budgets} | {("1", "none", "1.0"), ("3", "none", "1.0")}
    for sweep in result["lorita"]["sweeps"].values():
        for row in sweep:  # LSVT keeps floor(b n) of each hidden matrix's n = 32 values
            if row["policy"] == "LSVT":
                assert row["retained"] == pytest.approx(math.floor(row["budget"] * 32) / 32)
            assert 0 <= row["test"] <= 1


def test_lrpet_table_compares_at_the_ratios_rank(smoke):
    _, result = smoke
    rows = result["lrpet"]["rows"]
    assert [r["method"] for r in rows] == ["no projection, dense",
                                           "no projection, truncated after training",
                                           "LRP", "LRPET"]
    config = main_job.PRESETS["smoke"]
    # Convolutions of (8, "M", 16, "M") on one channel: 9 x 8 and 72 x 16 matrices.
    expected = "/".join(str(max(1, int(n - n * config.prune))) for n in (8, 16))
    assert all(r["ranks"] == expected for r in rows[1:])
    # MACs per image by hand: full 3x3 convolutions 8x8x9x1x8 + 4x4x9x8x16, head 64 x 10.
    r0, r1 = (int(v) for v in expected.split("/"))
    dense = 64 * 9 * 8 + 16 * 72 * 16 + 64 * 10
    factored = 64 * (9 * r0 + r0 * 8) + 16 * (72 * r1 + r1 * 16) + 64 * 10
    for row in rows[1:]:
        assert row["macs_fraction"] == pytest.approx(factored / dense)
    assert all(np.isfinite(r["test"]) for r in rows)
