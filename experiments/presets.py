"""Presets, settings checks and the command line every experiment shares.

An experiment describes its settings as a frozen dataclass and names a few instances of it
(``smoke``: seconds, for tests; ``default``: the job as documented; ``paper``: the papers'
settings). :func:`parse_args` picks one, applies ``--set field=value`` overrides (checked against
the field's type) and returns it with the output directory; :func:`cli` does that and runs the
experiment, turning a bad setting into a one-line error.

Settings are checked before anything trains, in two steps:

* :func:`check`, called by each experiment's config when it is built (``__post_init__``): every
  field against its rule in :data:`RULES` (type, range, model names, data set names), by field
  name. A config field without a rule is itself an error, so no new setting goes unchecked. A
  field holding a dataclass (an experiment's training settings, e.g. ``train``, a
  :class:`experiments.train.TrainConfig`) is checked field by field the same way, its fields
  named ``train.epochs``, ``train.batch_size``, ... (also on the command line:
  ``--set train.epochs=5``). The fields an experiment's runs set themselves (each run's seed,
  its progress bar) are named in its config's ``PER_RUN`` and must be left at their defaults.
* :func:`check_models` and :func:`load_data`, at the start of a run: every model the run will
  train is traced on an image of the data (shapes only), and the data set must load.

Both raise :class:`SettingsError`, naming the field, the value and what is allowed.

Example:
  >>> import dataclasses
  >>> @dataclasses.dataclass(frozen=True)
  ... class Config:
  ...     epochs: int = 10
  ...     budgets: tuple[float, ...] = (0.5, 0.1)
  ...     def __post_init__(self):
  ...         check(self)
  >>> config, _, _ = parse_args(["--preset", "smoke", "--set", "budgets=(0.3,)"],
  ...                           {"smoke": Config(epochs=1), "default": Config()}, "demo")
  >>> config
  Config(epochs=1, budgets=(0.3,))
  >>> Config(epochs=0)
  Traceback (most recent call last):
    ...
  experiments.presets.SettingsError: epochs must be an int >= 1, got 0.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import re
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

__all__ = [
    "RULES",
    "Rule",
    "SettingsError",
    "SettingsTypeError",
    "check",
    "check_models",
    "cli",
    "load_data",
    "override",
    "parse_args",
]

ConfigT = TypeVar("ConfigT")
PARALLEL = ("data", "fsdp", "none")  # experiments.train.PARALLEL (not imported: jax-free here)
PRNG_IMPLS = ("rbg", "unsafe_rbg", "threefry2x32")  # experiments.train.PRNG_IMPLS


class SettingsError(ValueError):
    """An experiment setting that cannot work, found before anything trains."""


class SettingsTypeError(SettingsError, TypeError):
    """A setting of the wrong type (a string for a number, a bool for an int, ...)."""


# ------------------------------------------------------------------------------------------------
# Rules, by field name.


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a setting may be.

    Attributes:
      allowed: the allowed values in words (for the error message), e.g. ``"an int >= 1"``.
      kind: whether a value has the right type.
      value: whether a value of the right type is allowed; or a function returning a reason
        (a string) where it is not, ``None`` where it is.
    """

    allowed: str
    kind: Callable[[Any], bool]
    value: Callable[[Any], bool | str | None] = lambda value: True

    def check(self, name: str, value: Any) -> None:
        """Raises :class:`SettingsError` naming ``name`` if ``value`` is not allowed."""
        if not self.kind(value):
            raise SettingsTypeError(f"{name} must be {self.allowed}, got {value!r}.")
        verdict = self.value(value)
        if verdict is True or verdict is None:
            return
        reason = f" ({verdict.rstrip('.')})" if isinstance(verdict, str) else ""
        raise SettingsError(f"{name} must be {self.allowed}, got {value!r}{reason}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(minimum: int) -> Rule:
    return Rule(f"an int >= {minimum}", _is_int, lambda v: v >= minimum)


def _number(low: float, high: float = math.inf, *, open_low: bool = False,
            open_high: bool = True, words: str = "") -> Rule:
    def inside(v: float) -> bool:
        return (math.isfinite(v) and (v > low if open_low else v >= low)
                and (v < high if open_high else v <= high))

    return Rule(words or _interval("a number", low, high, open_low, open_high), _is_number,
                inside)


def _interval(what: str, low: float, high: float, open_low: bool, open_high: bool) -> str:
    if high == math.inf:
        return f"{what} {'>' if open_low else '>='} {low:g}"
    return (f"{what} in {'(' if open_low else '['}{low:g}, {high:g}"
            f"{')' if open_high else ']'}")


def _tuple_of(item: Rule, what: str, *, empty: bool = False, distinct: bool = True) -> Rule:
    def kind(value: Any) -> bool:
        return isinstance(value, tuple) and all(item.kind(v) for v in value)

    def allowed(value: tuple) -> bool | str:
        if not value and not empty:
            return "it is empty"
        for v in value:
            verdict = item.value(v)
            if isinstance(verdict, str):
                return f"{v!r}: {verdict.rstrip('.')}"
            if verdict is False:
                return f"{v!r} is not {item.allowed}"
        if distinct and len(set(value)) != len(value):
            return "it repeats a value"
        return True

    words = f"{'a' if empty else 'a non-empty'} tuple of {'distinct ' if distinct else ''}{what}"
    return Rule(words, kind, allowed)


def _model_spec(value: str) -> bool | str:
    from experiments import models

    try:
        models.create(value)
    except ValueError as error:
        return str(error)
    return True


def _data_spec(value: str) -> bool | str:
    from experiments import data as data_lib

    if value == "digits" or value in data_lib.TFDS_NAMES:
        return True
    if value.startswith("idx:") and value[len("idx:"):]:
        return True
    return f"one of 'digits', 'idx:DIR', {', '.join(map(repr, data_lib.TFDS_NAMES))}"


def _cnn_layer(value: Any) -> bool:
    return value == "M" or (_is_int(value) and value >= 1)


def _run(value: Any) -> bool | str:
    spec, prune = value
    verdict = _model_spec(spec)
    if verdict is not True:
        return verdict
    return True if 0 <= prune < 1 else f"the pruning ratio {prune!r} is not in [0, 1)"


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_augmentation(value: Any) -> bool:
    """``None`` or an :class:`experiments.data.Augmentation` (a ``(pad, flip)`` NamedTuple)."""
    return value is None or (isinstance(value, tuple)
                             and getattr(value, "_fields", None) == ("pad", "flip")
                             and _is_int(value.pad) and isinstance(value.flip, bool))


_POSITIVE = _int(1)
_NONNEGATIVE = _int(0)
_BOOL = Rule("True or False", lambda v: isinstance(v, bool))
_RATE = _number(0, open_low=True)
_DECAY = _number(0)
_PRUNE = _number(0, 1)
_MODEL = Rule("a model name of experiments.models.create (e.g. 'resnet20', "
              "'vgg:config=32/M/64/M', 'vit-l4-h4:dim=64')", _is_str, _model_spec)
_MODELS = _tuple_of(_MODEL, "model names (experiments.models.create)", empty=True)
_OPTIONAL_STR = Rule("None or a string", lambda v: v is None or isinstance(v, str))

RULES: dict[str, Rule] = {
    # Counts.
    **{name: _POSITIVE for name in (
        "batch_size", "calibration_batch_size", "calibration_examples", "checkpoint_every",
        "compress_depth", "epochs", "eval_batch_size", "fcn_depth", "fcn_width",
        "random_trials", "trials", "width")},
    **{name: _NONNEGATIVE for name in ("seed", "pad", "pretrained_epochs", "timing_epochs",
                                        "tuning_seed", "extend")},
    "depths": _tuple_of(_POSITIVE, "ints >= 1 (LoRITa's N)"),
    **{name: Rule("a tuple of at least two distinct ints >= 0 (a spread needs two)",
                  lambda v: isinstance(v, tuple) and all(map(_is_int, v)),
                  lambda v: len(v) >= 2 and len(set(v)) == len(v) and min(v) >= 0)
       for name in ("seeds", "lrpet_seeds")},
    "fcn_depths": _tuple_of(_POSITIVE, "ints >= 1"),
    "arms": _tuple_of(Rule("a string", _is_str), "names of experiments.evidence.ARMS"),
    # Switches.
    "ablation": _BOOL,
    "flip": _BOOL,
    "progress": _BOOL,
    # Optimisation.
    "learning_rate": _RATE,
    "fcn_learning_rate": _RATE,
    "sgd_learning_rate": _RATE,
    "weight_decay": _DECAY,
    "sgd_weight_decay": _DECAY,
    "weight_decays": _tuple_of(_DECAY, "numbers >= 0"),
    "fcn_weight_decays": _tuple_of(_DECAY, "numbers >= 0", distinct=False),
    "decay_ladder": _tuple_of(_DECAY, "numbers >= 0"),
    "label_smoothing": _PRUNE,
    "lam": _DECAY,
    # Compression.
    "prune": _PRUNE,
    "min_prune": _PRUNE,
    "max_prune": _PRUNE,
    "budgets": _tuple_of(_number(0, 1, open_low=True, open_high=False),
                         "numbers in (0, 1]"),
    "drop_budgets": _tuple_of(_number(0, 1, open_low=True, open_high=False),
                              "numbers in (0, 1]"),
    "tolerances": _tuple_of(_number(0, 1), "numbers in [0, 1)"),
    "flop_drops": _tuple_of(_number(0, 1, open_low=True), "numbers in (0, 1)"),
    "reductions": _tuple_of(_number(0, 1, open_low=True), "fractions of the parameters in (0, 1)"),
    "damping": _DECAY,
    "tolerance": _PRUNE,
    "ratios": _tuple_of(_number(0, 1, open_low=True), "pruning ratios in (0, 1)"),
    "confidence": _number(0, 1, open_low=True, words="a number in (0, 1)"),
    **{name: _number(0, 1, open_low=True, words="a number in (0, 1) (accuracy, 0.01 is a point)")
       for name in ("accuracy_margin", "decay_margin", "drop_margin", "lrpet_margin")},
    **{name: _number(0, 1, open_low=True) for name in ("budget_margin", "energy_level",
                                                       "energy_margin", "power")},
    "ranks_file": _OPTIONAL_STR,
    # Data.
    "data": Rule("a data set: 'digits', 'idx:DIR', 'mnist', 'cifar10' or 'cifar100'", _is_str,
                 _data_spec),
    "data_dir": _OPTIONAL_STR,
    "augmentation": Rule("None or an experiments.data.Augmentation(pad >= 0, flip)",
                         _is_augmentation, lambda v: v is None or v.pad >= 0),
    # Devices and random numbers.
    "parallel": Rule("one of 'data' (each batch split over the local devices), 'fsdp' (the "
                     "parameters too) or 'none'", _is_str, lambda v: v in PARALLEL),
    "prng_impl": Rule(f"one of {', '.join(map(repr, PRNG_IMPLS))}", _is_str,
                      lambda v: v in PRNG_IMPLS),
    # Models.
    "model": _MODEL,
    **{name: _MODEL for name in ("fcn_model", "cnn_model", "vit_model")},
    "models": _MODELS,
    "compress_models": _MODELS,
    "with_augmentation": _MODELS,
    "without_augmentation": _MODELS,
    "model_options": Rule("model options 'key=value,...' (e.g. 'dim=64,patch=2')", _is_str),
    "cnn": Rule("a non-empty tuple of layer widths (ints >= 1) and 'M' (max-pooling), with at "
                "least one width", lambda v: isinstance(v, tuple) and all(map(_cnn_layer, v)),
                lambda v: any(_is_int(x) for x in v)),
    "runs": _tuple_of(Rule("a (model name, pruning ratio in [0, 1)) pair",
                           lambda v: isinstance(v, tuple) and len(v) == 2 and _is_str(v[0])
                           and _is_number(v[1]), _run), "(model name, pruning ratio) pairs"),
}


def _is_config(value: Any) -> bool:
    """Whether ``value`` is a dataclass instance (a config, or settings nested in one)."""
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _per_run(config: Any) -> Mapping[str, str]:
    """``{dotted field name: who sets it}`` of the nested fields ``config``'s runs set
    themselves (its class's ``PER_RUN``, e.g. ``{"train.seed": "from seed"}``)."""
    return getattr(type(config), "PER_RUN", {})


def check(config: Any, rules: Mapping[str, Rule] | None = None) -> None:
    """Checks every field of ``config`` (a dataclass) against its rule; a field holding a
    dataclass (nested settings, e.g. ``train``) field by field, named ``train.epochs``, ...

    The nested fields named in ``config``'s class attribute ``PER_RUN`` (``{"train.seed": "from
    seed", ...}``: each run sets them) must hold their defaults.

    Args:
      config: an experiment's settings.
      rules: rules by field name (default :data:`RULES`); a nested field is checked by the rule
        of its own name (``train.epochs`` by that of ``epochs``).

    Raises:
      SettingsError: naming the first field whose value is not allowed, the value and what is
        allowed (:class:`SettingsTypeError` for a value of the wrong type).
      TypeError: for a field that has no rule (add one to :data:`RULES`).
    """
    rules = RULES if rules is None else rules
    _check_fields(config, rules, "")
    for name, source in _per_run(config).items():
        outer, _, inner = name.partition(".")
        nested = getattr(config, outer)
        default = next(f.default for f in dataclasses.fields(nested) if f.name == inner)
        value = getattr(nested, inner)
        if value != default:
            raise SettingsError(f"{name} is set by each run ({source}): leave it at "
                                f"{default!r}, got {value!r}.")


def _check_fields(config: Any, rules: Mapping[str, Rule], prefix: str) -> None:
    for field in dataclasses.fields(config):
        name, value = prefix + field.name, getattr(config, field.name)
        if _is_config(field.default):
            if type(value) is not type(field.default):
                raise SettingsTypeError(f"{name} must be a {type(field.default).__name__}, got "
                                        f"{value!r}.")
            _check_fields(value, rules, name + ".")
            continue
        if field.name not in rules:
            raise TypeError(f"{type(config).__name__}.{field.name} has no rule in "
                            "experiments.presets.RULES: add one, so that it is checked.")
        rules[field.name].check(name, value)


def load_data(config: Any, seed: int | None = None) -> Any:
    """``experiments.data.load(config.data, config.data_dir, seed)`` (``seed`` defaults to
    ``config.seed``), its errors (a missing directory or file, an unprepared tfds data set)
    raised as :class:`SettingsError` naming the setting."""
    from experiments import data as data_lib

    try:
        return data_lib.load(config.data, config.data_dir,
                             config.seed if seed is None else seed)
    except (FileNotFoundError, NotADirectoryError, data_lib.DatasetNotPreparedError,
            ValueError) as error:
        raise SettingsError(f"data={config.data!r} cannot be loaded: {error}") from error


def check_models(models: Mapping[str, Any], sample: Any) -> None:
    """Traces the initialisation of every model (shapes only, nothing is computed) on
    ``sample``, so that a model that cannot run on the data fails before anything trains.

    Args:
      models: ``{what names it (e.g. "cnn=(32, 'M')"): Linen model}``.
      sample: a batch of the data's normalised images.

    Raises:
      SettingsError: naming the model and the error.
    """
    import jax

    for name, model in models.items():
        try:
            jax.eval_shape(lambda m=model: m.init(jax.random.key(0), sample, train=False))
        except Exception as error:  # a model's own errors come in many types
            raise SettingsError(f"{name}: the model cannot run on images of shape "
                                f"{tuple(sample.shape[1:])}: {error}") from error


# ------------------------------------------------------------------------------------------------
# The command line.


def _same_kind(old: Any, new: Any) -> bool:
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, int | float) and isinstance(new, int | float):
        return isinstance(old, float) or isinstance(new, int)
    return type(old) is type(new)


def _settable(config: Any, prefix: str = "") -> list[str]:
    """The names ``--set`` takes: every field of ``config``, a nested config's as
    ``train.epochs``, less those each run sets (``PER_RUN``)."""
    per_run = _per_run(config)
    names = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if _is_config(value):
            names += _settable(value, f"{prefix}{field.name}.")
        else:
            names.append(prefix + field.name)
    return [name for name in names if name not in per_run]


def override(config: ConfigT, assignments: Sequence[str]) -> ConfigT:
    """``config`` with ``field=value`` assignments applied (values are Python literals; a value
    that is not a literal is taken as a string). A field of nested settings is named with a dot:
    ``train.epochs=5``.

    Raises:
      SettingsError: for an unknown field, a malformed assignment or a value of another type
        (:class:`SettingsTypeError`), or a value the config refuses.
    """
    changes: dict[tuple[str, ...], Any] = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        path = tuple(name.split("."))
        owner, prefix = config, ""
        for part in path[:-1]:  # the nested config that holds the field
            value = getattr(owner, part, None) if part in _field_names(owner) else None
            if not _is_config(value):
                owner = None
                break
            owner, prefix = value, f"{prefix}{part}."
        if sep and name in _per_run(config):
            raise SettingsError(f"--set {name}: {name} is set by each run "
                                f"({_per_run(config)[name]}), not a setting.")
        if not sep or owner is None or path[-1] not in _field_names(owner) or _is_config(
                getattr(owner, path[-1])):
            among = [n for n in _settable(config) if owner is None or n.startswith(prefix)]
            raise SettingsError(f"--set takes field=value with a field among {among}, got "
                                f"{assignment!r}.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        old = getattr(owner, path[-1])
        if not _same_kind(old, value):
            raise SettingsTypeError(f"--set {name}: expected a value like {old!r}, got "
                                    f"{value!r}.")
        value = float(value) if isinstance(old, float) else value
        if prefix and path[-1] in RULES:  # named in full, before the nested config refuses it
            RULES[path[-1]].check(name, value)
        changes[path] = value
    return _replace(config, changes, "")


def _field_names(config: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}


def _replace(config: ConfigT, changes: Mapping[tuple[str, ...], Any], prefix: str) -> ConfigT:
    """``config`` with ``changes`` (``{field path: value}``) applied, each nested config
    replaced once with all of its changes."""
    fields: dict[str, Any] = {}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, value in changes.items():
        if len(path) == 1:
            fields[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1:]] = value
    for name, inner in nested.items():
        fields[name] = _replace(getattr(config, name), inner, f"{prefix}{name}.")
    if not prefix:
        return dataclasses.replace(config, **fields)  # type: ignore[type-var]
    try:
        return dataclasses.replace(config, **fields)  # type: ignore[type-var]
    except SettingsError:
        raise
    except (TypeError, ValueError) as error:
        raise SettingsError(f"{prefix[:-1]}: {error}") from error


class _Parser(argparse.ArgumentParser):
    """Errors in one line (no usage block, no traceback), pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')}. See --help.\n")


def _field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` section of a Google-style docstring."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    inside, current, indent = False, None, None
    for line in lines:
        stripped = line.strip()
        if stripped == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if not stripped:
            if docs:
                break
            continue
        depth = len(line) - len(line.lstrip())
        head, sep, text = stripped.partition(":")
        if sep and head.isidentifier() and (indent is None or depth <= indent):
            indent, current = depth, head
            docs[current] = text.strip()
        elif current is not None:
            docs[current] += " " + stripped
    return docs


def _plain(text: str) -> str:
    """Docstring markup (``code``, :func:`name`) as plain text."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def _settings_help(presets: Mapping[str, Any]) -> str:
    first = next(iter(presets.values()))
    lines = ["settings (--set FIELD=VALUE, the value a Python literal; a field of nested settings "
             "as --set train.epochs=5), with each preset's value:"]
    per_run = _per_run(first)

    def describe(name: str, doc: str, rule: Rule | None, values: dict[str, str] | None) -> None:
        allowed = f" [{rule.allowed}]" if rule is not None else ""
        lines.extend(textwrap.wrap(f"{name}: {_plain(doc)}{allowed}", width=96,
                                   initial_indent="  ", subsequent_indent="      "))
        if values is None:
            return
        if len(set(values.values())) == 1:
            lines.append(f"      every preset: {next(iter(values.values()))}")
        else:
            lines.extend(f"      {preset + ':':9} {value}" for preset, value in values.items())

    def fields(configs: dict[str, Any], prefix: str) -> None:
        sample = next(iter(configs.values()))
        docs = _field_docs(type(sample))
        for field in dataclasses.fields(sample):
            name = prefix + field.name
            values = {preset: getattr(config, field.name) for preset, config in configs.items()}
            if _is_config(getattr(sample, field.name)):
                shown = [key for key in per_run if key.startswith(name + ".")]
                note = (f" (each run sets {', '.join(shown)})" if shown else "")
                describe(name, docs.get(field.name, "") + note, None, None)
                fields(values, name + ".")
            elif name not in per_run:
                describe(name, docs.get(field.name, ""), RULES.get(field.name),
                         {preset: repr(value) for preset, value in values.items()})

    fields(dict(presets), "")
    return "\n".join(lines)


def parse_args(
    argv: Sequence[str] | None,
    presets: Mapping[str, ConfigT],
    description: str,
    default_output: str = "results",
    prog: str | None = None,
) -> tuple[ConfigT, Path, bool]:
    """``(config, output directory, show progress)`` from the command line.

    Options: ``--preset NAME`` (default ``default``, else the first), ``--set field=value``
    (repeatable), ``--output-dir DIR`` (default ``{default_output}/{preset}``), ``--no-progress``.
    ``--help`` lists every field with its description and each preset's value. A bad option or
    setting exits with a one-line error (status 2).
    """
    default = "default" if "default" in presets else next(iter(presets))
    parser = _Parser(prog=prog, description=description, epilog=_settings_help(presets),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(presets), default=default,
                        help=f"settings to start from (default: {default})")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one setting (repeatable), e.g. --set seed=1")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"results directory (default: {default_output}/PRESET)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        config = override(presets[args.preset], args.set)
    except ValueError as error:
        parser.error(str(error))
    output = args.output_dir or Path(default_output) / args.preset
    return config, output, not args.no_progress


def cli(
    argv: Sequence[str] | None,
    presets: Mapping[str, ConfigT],
    run: Callable[..., ConfigT | Any],
    *,
    description: str,
    default_output: str = "results",
    prog: str | None = None,
) -> Any:
    """Parses the command line (:func:`parse_args`) and calls ``run(config, Results(output),
    progress)``; a :class:`SettingsError` found at the start of the run (a model that cannot run
    on the data, data that cannot be loaded) exits with a one-line error too."""
    import jax.numpy as jnp

    from experiments.results import Results

    config, output, progress = parse_args(argv, presets, description, default_output, prog)
    jnp.zeros(())  # initialise the backend before the first progress bar
    try:
        return run(config, Results(output), progress)
    except SettingsError as error:
        sys.stderr.write(f"{prog or Path(sys.argv[0]).name}: error: {error}\n")
        raise SystemExit(2) from None
