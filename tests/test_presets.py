"""experiments.presets: preset choice, typed overrides, settings checked before anything trains,
one-line command-line errors and --help."""

import dataclasses
import importlib
import json
import math
import re
from pathlib import Path
from typing import ClassVar

import pytest

from experiments import presets
from experiments.data import Augmentation


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



@dataclasses.dataclass(frozen=True)
class Train:  # unchecked itself: the config holding it checks it
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Nested:
    """Settings with nested training settings.

    Attributes:
      learning_rate: a rate.
      train: how it trains.
    """

    PER_RUN: ClassVar[dict[str, str]] = {"train.seed": "from the run"}
    learning_rate: float = 0.1
    train: Train = Train()

    def __post_init__(self):
        presets.check(self)


def test_set_reaches_nested_settings_by_a_dotted_name():
    config = presets.override(Nested(), ["train.epochs=3", "learning_rate=0.5",
                                          "train.batch_size=64"])
    assert config == Nested(learning_rate=0.5, train=Train(epochs=3, batch_size=64))
    config, _, _ = presets.parse_args(["--set", "train.epochs=3"], {"default": Nested()}, "x")
    assert config.train.epochs == 3 and config.train.batch_size == 128


@pytest.mark.parametrize("assignment, message", [
    ("train.nope=1", "train.nope"), ("train.epochs=0", "train.epochs must be an int >= 1"),
    ("train.epochs=1.5", "train.epochs"), ("train.epochs=True", "train.epochs"),
    ("train=3", "field among"), ("learning_rate.x=1", "learning_rate.x"),
    ("train.seed=1", "train.seed is set by each run (from the run)")])
def test_bad_nested_overrides_name_the_dotted_field(assignment, message):
    with pytest.raises(presets.SettingsError, match=re.escape(message)):
        presets.override(Nested(), [assignment])


def test_nested_settings_are_checked_and_listed_in_help():
    with pytest.raises(presets.SettingsError, match="train.epochs must be an int >= 1, got 0"):
        Nested(train=Train(epochs=0))
    with pytest.raises(presets.SettingsTypeError, match="train must be a Train"):
        Nested(train=3)
    with pytest.raises(presets.SettingsError, match="train.seed is set by each run"):
        Nested(train=Train(seed=1))
    text = presets._settings_help({"default": Nested(), "smoke": Nested(train=Train(epochs=1))})
    assert "  train.epochs: " in text and "train.seed:" not in text
    assert "default:  10" in text and "smoke:    1" in text


def test_bad_command_line_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        presets.parse_args(["--set", "epochs=x"], PRESETS, "x")
    assert "epochs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The experiments' settings: checked when built, before anything trains; one-line CLI errors.

MODULES = ["main", "lorita_fcn", "lorita_vit", "lorita_cnn", "lrpet_cifar", "rank_search",
           "evidence", "data_aware"]
PROGS = {"main": "python -m experiments"}


def module(name):
    return importlib.import_module(f"experiments.{name}")


@pytest.mark.parametrize("name", MODULES)
def test_every_setting_of_every_experiment_has_a_rule(name):
    def names(config):  # nested settings' fields by their own names
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            yield from names(value) if dataclasses.is_dataclass(value) else [f.name]

    assert set(names(module(name).Config())) <= set(presets.RULES)
    for preset in module(name).PRESETS.values():
        presets.check(preset)


def test_a_config_field_without_a_rule_is_an_error():
    @dataclasses.dataclass(frozen=True)
    class Unruled:
        momentum: float = 0.9

    with pytest.raises(TypeError, match="momentum has no rule"):
        presets.check(Unruled())


BAD = [
    ("main", "prune", 1.5, "prune"), ("main", "prune", -0.1, "prune"),
    ("main", "learning_rate", math.nan, "learning_rate"), ("main", "learning_rate", 0.0, ">"),
    ("main", "sgd_weight_decay", -1e-4, "sgd_weight_decay"), ("main", "budgets", (0.5, 1.5), "1.5"),
    ("main", "budgets", (), "empty"), ("main", "tolerance", 1.0, "tolerance"),
    ("main", "depths", (1, 0), "depths"), ("main", "depths", (3, 3), "repeats"),
    ("main", "fcn_width", True, "fcn_width"), ("main", "lorita_train.epochs", 2.0, "epochs"),
    ("main", "weight_decays", ("1e-3",), "weight_decays"), ("main", "cnn", (8, "X"), "cnn"),
    ("main", "cnn", ("M",), "at least one width"), ("main", "data", "imagenet", "data"),
    ("main", "seed", -1, "seed"), ("main", "lrpet_train.batch_size", 0, "batch_size"),
    ("main", "lorita_train.seed", 3, "set by each run"),
    ("lorita_fcn", "train.parallel", "gpu", "parallel"),
    ("lorita_vit", "train.augmentation", Augmentation(2, True), "set by each run"),
    ("lorita_fcn", "train.augmentation", (2, True), "Augmentation(pad >= 0, flip)"),
    ("rank_search", "trial_train.prng_impl", "philox", "prng_impl"),
    ("lorita_fcn", "fcn_depths", (), "fcn_depths"), ("lorita_vit", "flip", "False", "flip"),
    ("lorita_vit", "with_augmentation", ("vit-l4",), "with_augmentation"),
    ("lorita_vit", "model_options", "dim64", "model_options"),
    ("lorita_cnn", "flop_drops", (1.0,), "flop_drops"),
    ("lorita_cnn", "label_smoothing", 1.0, "label_smoothing"),
    ("lorita_cnn", "models", ("resnet9x",), "models"),
    ("lrpet_cifar", "runs", (("resnet8", 1.5),), "runs"),
    ("lrpet_cifar", "runs", (("resnet8",),), "runs"), ("lrpet_cifar", "ablation", 1, "ablation"),
    ("lrpet_cifar", "pad", -1, "pad"), ("lrpet_cifar", "ranks_file", 3, "ranks_file"),
    ("rank_search", "max_prune", 1.0, "max_prune"), ("rank_search", "lam", -1.0, "lam"),
    ("rank_search", "min_prune", 0.95, "min_prune"),
    ("rank_search", "random_trials", 30, "random_trials"), ("rank_search", "model", "", "model"),
    ("main", "lrpet_train.parallel", "gpu", "parallel"),
    ("lorita_fcn", "train.parallel", None, "parallel"),
    ("evidence", "seeds", (0,), "at least two"), ("evidence", "seeds", (0, -1), "seeds"),
    ("evidence", "ratios", (0.0,), "ratios"), ("evidence", "learning_rate", 0.0, "> 0"),
    ("evidence", "confidence", 0.0, "confidence"), ("evidence", "drop_margin", 1.0, "drop_margin"),
    ("evidence", "arms", ("jaxlr", "nope"), "arms"), ("evidence", "lrpet_seeds", (1,), "two"),
    ("evidence", "depths", (1,), "N > 1"),
    ("data_aware", "reductions", (1.0,), "reductions"),
    ("data_aware", "damping", -0.1, "damping"),
    ("data_aware", "fcn_weight_decays", (1e-3,), "one decay per N"),
    ("data_aware", "vit_model", "vit-x", "vit_model"),
    ("data_aware", "calibration_examples", 0, "calibration_examples"),
]


@pytest.mark.parametrize("name, field, value, pattern", BAD,
                         ids=[f"{m}-{f}-{v!r}" for m, f, v, _ in BAD])
def test_bad_settings_are_refused_when_the_config_is_built(name, field, value, pattern):
    config = module(name).PRESETS["smoke"]
    outer, _, inner = field.rpartition(".")
    with pytest.raises(presets.SettingsError) as raised:
        if outer:  # a field of the nested training settings
            nested = dataclasses.replace(getattr(config, outer), **{inner: value})
            dataclasses.replace(config, **{outer: nested})
        else:
            dataclasses.replace(config, **{field: value})
    message = str(raised.value)
    assert inner in message and pattern in message, message


def run_cli(name, argv, capsys):
    with pytest.raises(SystemExit) as raised:
        module(name).main([*argv, "--no-progress"])
    return raised.value.code, capsys.readouterr()


@pytest.mark.parametrize("argv, pattern", [
    (["--set", "prune=1.5"], "prune must be a number in [0, 1), got 1.5"),
    (["--set", "ratio=0.5"], "--set takes field=value with a field among"),
    (["--preset", "paperr"], "invalid choice: 'paperr'"),
    (["--set", "lorita_train.epochs=True"], "--set lorita_train.epochs"),
    (["--set", "lorita_train.epochs=0"], "lorita_train.epochs must be an int >= 1, got 0"),
    (["--set", "lorita_train.nope=1"], "got 'lorita_train.nope=1'"),
    (["--set", "epochs=5"], "--set takes field=value with a field among"),
    (["--set", "budgets=(0.5, 2)"], "budgets"),
])
def test_bad_command_lines_fail_in_one_line_before_anything_runs(argv, pattern, capsys,
                                                                  tmp_path):
    code, out = run_cli("main", [*argv, "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m experiments: error:"), out.err
    assert pattern in lines[0]
    assert "Traceback" not in out.err and not (tmp_path / "out").exists()


def test_a_model_that_cannot_run_on_the_data_fails_before_training(capsys, tmp_path):
    # Four poolings of an 8 x 8 digit leave nothing to pool: found by tracing, before training.
    code, out = run_cli("main", ["--preset", "smoke", "--set", "cnn=(8, 'M', 'M', 'M', 'M')",
                                 "--output-dir", str(tmp_path)], capsys)
    assert code == 2
    (line,) = out.err.strip().splitlines()
    assert "cnn=(8, 'M', 'M', 'M', 'M')" in line and "(8, 8, 1)" in line
    assert not (tmp_path / "runs").exists()


def test_missing_data_fails_in_one_line(capsys, tmp_path):
    code, out = run_cli("lorita_fcn", ["--preset", "smoke", "--set",
                                       f"data=idx:{tmp_path / 'none'}",
                                       "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2
    (line,) = out.err.strip().splitlines()
    assert line.startswith("python -m experiments.lorita_fcn: error: data=") and "none" in line


@pytest.mark.parametrize("ranks, pattern", [({"conv9/kernel": 2}, "conv9/kernel"),
                                            ({"conv1/kernel": 99}, "99")])
def test_a_ranks_file_that_does_not_fit_the_model_fails_before_training(ranks, pattern, capsys,
                                                                        tmp_path):
    path = tmp_path / "ranks.json"
    path.write_text(json.dumps(ranks))
    code, out = run_cli("lrpet_cifar", ["--preset", "smoke", "--set", "runs=(('resnet8', 0.5),)",
                                        "--set", f"ranks_file={str(path)!r}",
                                        "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2
    (line,) = out.err.strip().splitlines()
    assert "ranks_file" in line and pattern in line
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("name", MODULES)
def test_help_lists_every_field_with_each_presets_value(name, capsys):
    with pytest.raises(SystemExit) as raised:
        module(name).main(["--help"])
    assert raised.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the wrapping
    per_run = getattr(module(name).Config, "PER_RUN", {})
    for field in dataclasses.fields(module(name).Config):
        assert f" {field.name}: " in text, field.name
        default = field.default
        if not dataclasses.is_dataclass(default):
            for preset in module(name).PRESETS.values():
                assert repr(getattr(preset, field.name)) in text, (field.name, preset)
            continue
        for inner in dataclasses.fields(default):  # nested settings: train.epochs, ...
            dotted = f"{field.name}.{inner.name}"
            assert (f" {dotted}: " in text) != (dotted in per_run), dotted
            if dotted not in per_run:
                for preset in module(name).PRESETS.values():
                    value = getattr(getattr(preset, field.name), inner.name)
                    assert repr(value) in text, (dotted, preset)
    for preset in module(name).PRESETS:
        assert f"{preset}:" in text or "every preset:" in text
