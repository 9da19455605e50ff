"""experiments.presets: preset choice and typed overrides."""

import dataclasses
from pathlib import Path

import pytest

from experiments import presets


@dataclasses.dataclass(frozen=True)
class Config:
    epochs: int = 10
    rate: float = 0.1
    data: str = "digits"
    flag: bool = False
    budgets: tuple = (0.5, 0.1)
    data_dir: str | None = None


PRESETS = {"default": Config(), "smoke": Config(epochs=1)}


def test_parse_args_picks_the_preset_and_applies_overrides():
    config, output, progress = presets.parse_args(
        ["--preset", "smoke", "--set", "rate=1", "--set", "data=idx:/tmp/m",
         "--set", "budgets=(0.3, 0.2)", "--set", "data_dir=/d", "--no-progress"], PRESETS, "x")
    assert config == Config(epochs=1, rate=1.0, data="idx:/tmp/m", budgets=(0.3, 0.2),
                            data_dir="/d")
    assert isinstance(config.rate, float)
    assert output == Path("results/smoke") and progress is False
    config, output, progress = presets.parse_args([], PRESETS, "x", default_output="out")
    assert config == Config() and output == Path("out/default") and progress


@pytest.mark.parametrize("assignment, message", [
    ("epochs=1.5", "epochs"), ("flag=1", "flag"), ("epochs", "field=value"),
    ("nope=1", "field=value"), ("budgets=0.5", "budgets")])
def test_bad_overrides_name_the_field(assignment, message):
    with pytest.raises(ValueError, match=message):
        presets.override(Config(), [assignment])


def test_bad_command_line_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        presets.parse_args(["--set", "epochs=x"], PRESETS, "x")
    assert "epochs" in capsys.readouterr().err
