"""experiments.results: markdown and CSV tables, JSON configuration."""

import csv
import dataclasses
import json

from experiments.results import Column, Results, markdown_table


def test_markdown_table_formats_and_aligns():
    rows = [{"name": "a", "acc": 0.91234, "n": 3}, {"name": "b", "acc": None, "n": 12}]
    table = markdown_table(rows, [Column("name"), Column("acc", "accuracy", ".1%"),
                                  Column("n")])
    assert table.splitlines() == ["| name | accuracy | n |", "|:--|--:|--:|",
                                  "| a | 91.2% | 3 |", "| b | - | 12 |"]


def test_results_writes_markdown_csv_and_json(tmp_path):
    results = Results(tmp_path / "out")
    rows = [{"policy": "LSVT", "test": 0.5, "extra": 1}, {"policy": "GSVT", "test": 0.25}]
    table = results.table("t", rows, [Column("policy"), Column("test", "test acc", ".2f")],
                          caption="Caption.")
    assert (tmp_path / "out" / "t.md").read_text() == f"Caption.\n\n{table}\n"
    with (tmp_path / "out" / "t.csv").open() as file:
        assert list(csv.reader(file)) == [["policy", "test"], ["LSVT", "0.5"],
                                          ["GSVT", "0.25"]]

    @dataclasses.dataclass(frozen=True)
    class Config:
        budgets: tuple = (0.5,)
        cnn: tuple = (8, "M")

    results.json("config", Config())
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {
        "budgets": [0.5], "cnn": [8, "M"]}
