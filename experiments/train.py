"""The training loop shared by every experiment: one jitted step, validation, checkpoints, metrics.

What is trained is a :class:`Task`: a Linen model, an optax optimizer and, for LoRITa, the
reparameterisation of its parameters. The methods plug in without a copy of the loop:

* LoRITa: :func:`lorita_task` trains :func:`jaxlr.lorita.factorize` d parameters (the model runs
  on their products; the variables it returns are collapsed to dense kernels).
* LRPET: wrap the optimizer with :func:`jaxlr.with_low_rank_projection`; the state is a
  :class:`jaxlr.TrainState`, whose ``apply_gradients`` passes the new BatchNorm statistics to the
  optimizer as its ``batch_stats`` extra argument.

:func:`train` evaluates on the validation split after every epoch, keeps the best variables (by
validation accuracy; the test split is never read here), writes one JSON line per epoch to
``workdir/metrics.jsonl``, shows a progress bar, and with a ``workdir`` saves through orbax
``CheckpointManager`` s: ``workdir/checkpoints/last`` every ``checkpoint_every`` epochs (to resume)
and ``workdir/checkpoints/best`` when validation accuracy improves. Called again with the same
``workdir`` it resumes from the last checkpoint; shuffling and augmentation are seeded by
``(seed, epoch)`` and dropout by the step, so a resumed run ends with the same parameters as one
that was never interrupted.

Example:
  >>> import optax
  >>> from experiments import data as data_lib, models
  >>> data = data_lib.load("digits")
  >>> task = Task(models.FCN(depth=2, width=32), optax.adam(1e-2))
  >>> result = train(task, data, TrainConfig(epochs=2, batch_size=64, progress=False))
  >>> result.best_accuracy > 0.5
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import jaxlr
from experiments import data as data_lib
from experiments import presets
from jaxlr import TrainState, export, lorita
from jaxlr.matrices import path_key

__all__ = [
    "Callback",
    "Placement",
    "Task",
    "TrainConfig",
    "TrainResult",
    "cross_entropy",
    "evaluate",
    "lorita_task",
    "make_step",
    "new_state",
    "placement",
    "step_decay_sgd",
    "train",
]


PRNG_IMPLS = ("rbg", "unsafe_rbg", "threefry2x32")
PARALLEL = ("none", "data", "fsdp")


def _identity_params(params: Any) -> Any:
    return params


def _keep_params(params: Any, key: jax.Array) -> Any:
    del key
    return params


@dataclasses.dataclass(frozen=True)
class Task:
    """What is trained, and how.

    Attributes:
      model: a Linen model called as ``model.apply(variables, images, train=...)``.
      optimizer: an optax transformation; one that takes extra arguments receives the step's new
        BatchNorm statistics as ``batch_stats`` (LRPET's projection).
      reparameterize: ``(params, key) -> trained tree``, applied once to the initial parameters
        (LoRITa: :func:`jaxlr.lorita.factorize`).
      model_params: ``trained tree -> params`` the model runs on (LoRITa:
        :func:`jaxlr.collapse`).
      label_smoothing: of the cross-entropy loss, in ``[0, 1)``.
      grad_norms: ``'/'``-joined parameter paths whose gradient norm each epoch record holds, at
        the epoch's first and last step (``grad_norm/{path}/first``, ``.../last``): with a
        projection at the end of every epoch, the last step is just before a projection and the
        first just after one (LRPET's Table XIX).
    """

    model: nn.Module
    optimizer: optax.GradientTransformation
    reparameterize: Callable[[Any, jax.Array], Any] = _keep_params
    model_params: Callable[[Any], Any] = _identity_params
    label_smoothing: float = 0.0
    grad_norms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")


def lorita_task(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    depth: int,
    label_smoothing: float = 0.0,
    **factorize_options: Any,
) -> Task:
    """A :class:`Task` training every kernel of ``model`` (the classifier included, as the
    LoRITa release does: ``filter="all"`` unless ``factorize_options`` say otherwise) as a product
    of ``depth`` factors."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}.")
    factorize_options = {"filter": "all", **factorize_options}

    def reparameterize(params: Any, key: jax.Array) -> Any:
        return lorita.factorize(params, depth, key, **factorize_options)

    return Task(model, optimizer, reparameterize, jaxlr.collapse, label_smoothing)


def step_decay_sgd(
    learning_rate: float,
    weight_decay: float,
    total_steps: int,
    *,
    mask: Any = None,
) -> optax.GradientTransformation:
    """The papers' SGD: coupled weight decay, momentum 0.9, the learning rate divided by 10 at
    50% and 75% of ``total_steps`` (LRPET wraps it: :func:`jaxlr.with_low_rank_projection`).

    Args:
      learning_rate: the initial learning rate.
      weight_decay: coupled L2 decay (added to the gradient before momentum).
      total_steps: the steps of the whole run.
      mask: which leaves decay (``optax.add_decayed_weights``' mask), e.g.
        :func:`jaxlr.lorita.weight_decay_mask`; ``None``: all.

    Example:
      >>> import jax.numpy as jnp
      >>> opt = step_decay_sgd(0.1, 0.0, 4)
      >>> params = {"w": jnp.ones(2)}
      >>> state = opt.init(params)
      >>> [float(opt.update({"w": jnp.ones(2)}, state, params)[0]["w"][0]) for _ in range(1)]
      [-0.1]
    """
    schedule = optax.piecewise_constant_schedule(
        learning_rate, {total_steps // 2: 0.1, (3 * total_steps) // 4: 0.1})
    return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                       optax.sgd(schedule, momentum=0.9))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how to train.

    An experiment's config holds one as a field (``train``; two with clear names where it trains
    twice, e.g. ``lorita_train`` and ``lrpet_train``), set on the command line as
    ``--set train.epochs=5``; each run derives its own with ``dataclasses.replace(config.train,
    seed=..., progress=...)``.

    Attributes:
      epochs: passes over the training split.
      batch_size: examples per step (the last incomplete batch of an epoch is dropped).
      seed: seeds initialisation, shuffling, augmentation and dropout.
      augmentation: applied to training batches (``None``: none).
      eval_batch_size: examples per evaluation batch.
      checkpoint_every: epochs between saves of the last checkpoint (with a ``workdir``).
      progress: show a progress bar.
      prng_impl: the PRNG of initialisation, factorisation and dropout. ``"rbg"`` (XLA's
        RngBitGenerator, deterministic on a given backend) by default: on a CPU a model's
        initialisation compiles in about a second with it, against ten with ``"threefry2x32"``
        (JAX's default, the same numbers on every backend).
      parallel: how the work spreads over the local devices (``jax.local_devices()``):
        ``"data"`` (default) splits each batch over all of them, with the parameters and the
        optimizer state whole on each; ``"fsdp"`` also splits every parameter and optimizer
        state array of two or more axes on its last axis that the device count divides (then
        the longest such), as fully sharded data parallel training does; ``"none"`` runs on the
        default device. With one local device all three are the same computation; on several the
        results equal one device's up to the order of floating-point sums. Under ``"data"`` and
        ``"fsdp"`` the step runs inside ``jax.set_mesh`` of a one-axis mesh ``("data",)``, so
        jaxlr's projection spreads its decompositions over the devices.
    """

    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    augmentation: data_lib.Augmentation | None = None
    eval_batch_size: int = 1000
    checkpoint_every: int = 1
    progress: bool = True
    prng_impl: str = "rbg"
    parallel: str = "data"

    def __post_init__(self) -> None:
        # Every field by its rule (experiments.presets.RULES): a bad one raises SettingsError,
        # a ValueError naming it.
        presets.check(self)

    def run_settings(self) -> dict[str, Any]:
        """The fields a run's result depends on, as JSON values, for its fingerprint and saved
        settings (:func:`experiments.results.run_settings`): all but ``progress``,
        ``checkpoint_every`` and ``parallel`` (where and how the run is shown, saved and spread,
        not what it computes).

        Example:
          >>> TrainConfig(epochs=2, batch_size=64).run_settings()["batch_size"]
          64
        """
        return {"epochs": self.epochs, "batch_size": self.batch_size, "seed": self.seed,
                "augmentation": None if self.augmentation is None else list(self.augmentation),
                "eval_batch_size": self.eval_batch_size, "prng_impl": self.prng_impl}


class Placement(NamedTuple):
    """Where a run's arrays live (:func:`placement`).

    Attributes:
      mesh: the one-axis mesh ``("data",)`` over the local devices, or ``None`` (the default
        device).
      fsdp: whether parameters and optimizer state are split over it.
    """

    mesh: Mesh | None
    fsdp: bool = False

    def batch(self, array: Any) -> Any:
        """A batch (first axis: examples) split over the devices."""
        if self.mesh is None:
            return array
        return jax.device_put(array, NamedSharding(self.mesh, PartitionSpec("data")))

    def spec(self, shape: tuple[int, ...]) -> PartitionSpec:
        """The spec of a state array: whole, or (FSDP) split on its last axis the device count
        divides, else on its longest such axis."""
        if not self.fsdp or self.mesh is None or len(shape) < 2:
            return PartitionSpec()
        devices = self.mesh.size
        axes = [len(shape) - 1, *sorted(range(len(shape) - 1), key=lambda a: -shape[a])]
        for axis in axes:
            if shape[axis] % devices == 0:
                return PartitionSpec(*[("data" if a == axis else None)
                                       for a in range(len(shape))])
        return PartitionSpec()

    def tree(self, tree: Any) -> Any:
        """Every array of ``tree`` placed by :meth:`spec` (as it is without a mesh)."""
        if self.mesh is None:
            return tree
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(
            self.mesh, self.spec(tuple(np.shape(x))))), tree)

    def settle(self, state: Any) -> None:
        """Waits for ``state`` when the mesh is of CPU devices: XLA's CPU collectives can deadlock
        with several multi-device programs in flight (seen with jax 0.10.2 on 8 simulated
        devices: a rendezvous that one device never joins, then an abort), so a CPU mesh runs
        one step at a time. Other backends keep JAX's asynchronous dispatch."""
        if self.mesh is not None and self.mesh.devices.flat[0].platform == "cpu":
            jax.block_until_ready(state)

    def context(self) -> Any:
        """``jax.set_mesh(mesh)`` (a no-op context without a mesh)."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)


def placement(config: TrainConfig) -> Placement:
    """The :class:`Placement` of ``config.parallel`` on this process's local devices.

    Raises:
      ValueError: if the batch size is not a multiple of the local device count (data parallel
        splits every batch evenly).
    """
    devices = jax.local_devices()
    if config.parallel == "none" or len(devices) == 1:
        return Placement(None)
    if config.batch_size % len(devices):
        raise ValueError(
            f"batch_size {config.batch_size} is not a multiple of the {len(devices)} local "
            f"devices that parallel={config.parallel!r} splits each batch over: choose a "
            "multiple, or parallel='none'.")
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,),
                         devices=devices)
    return Placement(mesh, fsdp=config.parallel == "fsdp")


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      state: the state after the last epoch.
      variables: ``{"params", "batch_stats"}`` the model runs on, after the last epoch.
      best: the same, from the epoch with the best validation accuracy.
      best_epoch: that epoch (1-based).
      best_accuracy: its validation accuracy.
      history: one record per epoch (also the lines of ``metrics.jsonl``).
    """

    state: TrainState
    variables: dict[str, Any]
    best: dict[str, Any]
    best_epoch: int
    best_accuracy: float
    history: list[dict[str, Any]]


Callback = Callable[[int, dict[str, Any], TrainState], None]


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels and label smoothing."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def new_state(task: Task, params: Any, batch_stats: Any) -> TrainState:
    """The :class:`jaxlr.TrainState` a run starts from: step 0 (an int32 array, so the state is
    placed and checkpointed as arrays), ``task``'s optimizer initialised on ``params``."""
    state = TrainState.create(apply_fn=task.model.apply, params=params, tx=task.optimizer,
                              batch_stats=batch_stats)
    return state.replace(step=jnp.zeros([], jnp.int32))


def make_step(task: Task, dropout_key: jax.Array, state: TrainState | None = None,
              where: Placement | None = None) -> Callable[..., Any]:
    """The jitted training step :func:`train` runs, for benchmarks and tests.

    ``step(state, images, labels)`` returns ``(state, loss, correct, grad_norms)``: the
    :class:`TrainState` after one update (the model in training mode, its new BatchNorm
    statistics passed to the optimizer as ``batch_stats``), the batch's mean loss, its number of
    correct predictions, and the norms of the gradients ``task.grad_norms`` names.

    Args:
      task: the model, optimizer and reparameterisation.
      dropout_key: dropout's key, folded with the step number.
      state: with ``where``'s mesh: the state whose placement the outputs keep.
      where: the :class:`Placement` of the run (default: the default device).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from experiments import models
      >>> task = Task(models.FCN(depth=1, width=8), optax.sgd(0.1))
      >>> x, y = jnp.ones((4, 8, 8, 1)), jnp.zeros(4, jnp.int32)
      >>> params = task.model.init(jax.random.key(0), x, train=False)["params"]
      >>> state = new_state(task, params, {})
      >>> state, loss, correct, _ = make_step(task, jax.random.key(1))(state, x, y)
      >>> int(state.step), loss.shape
      (1, ())
    """
    if where is None or where.mesh is None or state is None:
        jit = jax.jit
    else:  # the state keeps its placement from step to step (the step compiles once)
        whole = NamedSharding(where.mesh, PartitionSpec())
        jit = functools.partial(jax.jit, out_shardings=(
            jax.tree.map(lambda x: x.sharding, state), whole, whole, whole))

    @jit
    def step(
        state: TrainState, images: jax.Array, labels: jax.Array
    ) -> tuple[TrainState, jax.Array, jax.Array, dict[str, jax.Array]]:
        rngs = {"dropout": jax.random.fold_in(dropout_key, state.step)}

        def loss_fn(trained: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            variables = _variables(task.model_params(trained), state.batch_stats)
            # jaxlr.apply: factor pairs (a compressed model being fine-tuned) run factored.
            logits, mutated = jaxlr.apply(
                task.model, variables, images, train=True, mutable=["batch_stats"], rngs=rngs)
            loss = cross_entropy(logits, labels, task.label_smoothing).mean()
            return loss, (logits, mutated.get("batch_stats", {}))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        norms = {path_key(p): jnp.linalg.norm(g)
                 for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]
                 if path_key(p) in task.grad_norms}
        # The new statistics reach the optimizer (BN rectification) as its extra argument.
        return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss, correct, norms

    return step


@functools.partial(jax.jit, static_argnums=(0,))
def _eval_batch(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    logits = jaxlr.apply(model, variables, images, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return jnp.sum(jnp.where(mask, loss, 0.0)), jnp.sum(correct)


def evaluate(
    model: nn.Module,
    variables: dict[str, Any],
    data: data_lib.Dataset,
    split: str = "validation",
    batch_size: int = 1000,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` with ``variables`` on one split.

    Every batch has ``batch_size`` rows (the last one padded and masked), so a model compiles once
    however many times it is evaluated. ``variables`` may hold :class:`jaxlr.LowRank` factor
    pairs (:func:`jaxlr.compress`): the model runs them as two thin layers (:func:`jaxlr.apply`).
    """
    part = data.split(split)
    size = min(batch_size, len(part))
    mesh = _mesh_of(variables)
    if mesh is not None:  # each batch split over the devices the variables live on
        size = -(-size // mesh.size) * mesh.size
    loss, correct = 0.0, 0
    for start in range(0, len(part), size):
        images = data.normalize(part.images[start:start + size])
        labels = part.labels[start:start + size]
        count = len(labels)
        if count < size:
            images = np.concatenate([images, np.zeros((size - count, *images.shape[1:]),
                                                      images.dtype)])
            labels = np.concatenate([labels, np.zeros(size - count, labels.dtype)])
        mask = np.arange(size) < count
        if mesh is not None:
            rows = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
            images, labels, mask = (jax.device_put(a, rows) for a in (images, labels, mask))
        batch_loss, batch_correct = _eval_batch(model, variables, images, labels, mask)
        loss += float(batch_loss)
        correct += int(batch_correct)
    return {"loss": loss / len(part), "accuracy": correct / len(part)}


def _mesh_of(tree: Any) -> Mesh | None:
    """The mesh of more than one device ``tree``'s arrays live on, if any."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


class _Checkpoints:
    """The ``last`` (resume) and ``best`` (selection) orbax checkpoint managers of a workdir."""

    def __init__(self, workdir: Path) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
        self.last = ocp.CheckpointManager(workdir / "checkpoints" / "last", options=options)
        self.best = ocp.CheckpointManager(workdir / "checkpoints" / "best", options=options)

    @staticmethod
    def _save(manager: ocp.CheckpointManager, epoch: int, **items: Any) -> None:
        manager.save(epoch, args=ocp.args.Composite(**items))
        manager.wait_until_finished()
        # Every file of the step is listed with its checksum, verified before it is restored.
        export.write_checksums(manager.directory / str(epoch))

    def save_last(self, epoch: int, state: TrainState, best: dict[str, Any],
                  meta: dict[str, Any]) -> None:
        # The best variables go with the state, so a resumed run selects as a straight one does.
        self._save(self.last, epoch, state=ocp.args.StandardSave(state),
                   best=ocp.args.StandardSave(best), meta=ocp.args.JsonSave(meta))

    def save_best(self, epoch: int, variables: dict[str, Any], accuracy: float) -> None:
        self._save(self.best, epoch, variables=ocp.args.StandardSave(variables),
                   meta=ocp.args.JsonSave({"epoch": epoch, "accuracy": accuracy}))

    def restore(
        self, state: TrainState, variables: dict[str, Any], run: dict[str, Any], epochs: int
    ) -> tuple[TrainState, dict[str, Any], dict[str, Any]] | None:
        epoch = self.last.latest_step()
        if epoch is None:
            return None
        export.verify_checksums(self.last.directory / str(epoch))
        saved = self.last.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        differ = sorted(k for k in run if saved.meta.get("run", {}).get(k) != run[k])
        if differ:
            raise ValueError(
                f"{self.last.directory} holds a run with other settings ({', '.join(differ)}): "
                "resume it with its own settings, or choose another workdir.")
        if epoch > epochs:
            raise ValueError(f"{self.last.directory} holds a run of {epoch} epochs, more than "
                             f"the {epochs} asked for.")
        abstract = functools.partial(jax.tree.map, ocp.utils.to_shape_dtype_struct)
        last = self.last.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract(state)),
            best=ocp.args.StandardRestore(abstract(variables)), meta=ocp.args.JsonRestore()))
        return last.state, last.best, last.meta

    def discard_best_after(self, epoch: int) -> None:
        """Deletes best checkpoints of epochs after ``epoch``: an interrupted run saved them
        after its last resumable checkpoint, and the resumed run trains those epochs again."""
        for step in self.best.all_steps():
            if step > epoch:
                self.best.delete(step)

    def close(self) -> None:
        self.last.close()
        self.best.close()


def _structure(tree: Any) -> str:
    """A short fingerprint of a tree's paths, shapes and dtypes (e.g. LoRITa's factor shapes)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    text = ";".join(f"{path_key(p)}:{tuple(np.shape(x))}:{jnp.result_type(x)}"
                    for p, x in leaves)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _progress_bar(config: TrainConfig, steps_per_epoch: int, start_epoch: int, label: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=config.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
                desc=label, unit="step", disable=not config.progress, leave=False)


def _read_history(path: Path, epochs: int) -> list[dict[str, Any]]:
    """The records of the first ``epochs`` epochs of a metrics file (later ones were not saved)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["epoch"] <= epochs]


def train(
    task: Task,
    data: data_lib.Dataset,
    config: TrainConfig,
    *,
    workdir: str | Path | None = None,
    variables: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    label: str = "train",
    settings: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Trains ``task`` on ``data``'s training split, selecting on its validation split.

    Args:
      task: the model, optimizer and reparameterisation.
      data: the data set.
      config: epochs, batch size, seed, augmentation, ...
      workdir: where checkpoints and ``metrics.jsonl`` go; a run finding checkpoints there
        resumes after the last saved epoch (a finished run is returned as it is; more epochs
        continue it). Checkpoints of another model, parameter structure (e.g. LoRITa's N), data
        set, batch size, seed, augmentation, label smoothing or ``settings`` raise
        ``ValueError`` rather than being mixed in; a corrupted one raises
        :class:`jaxlr.export.CheckpointCorruptedError` naming the file.
      variables: initial ``{"params", "batch_stats"}`` (default: ``task.model.init`` with the
        seed), e.g. a pre-trained model.
      callbacks: called as ``callback(epoch, record, state)`` after each epoch's record and
        checkpoint.
      label: the progress bar's description.
      settings: JSON values of everything else the run's result depends on that the loop
        cannot see, chiefly the optimizer's hyper-parameters (learning rate, decay, pruning
        ratio): saved with the checkpoints and required to match on resumption
        (:func:`experiments.results.run_settings` makes them from an experiment's config).

    Returns:
      A :class:`TrainResult`.
    """
    if settings is not None and not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a mapping, got {type(settings).__name__}.")
    try:  # as they read back from the checkpoint's JSON
        settings = json.loads(json.dumps(dict(settings or {}), sort_keys=True))
    except TypeError as error:
        raise TypeError(f"settings must hold JSON values: {error}.") from None
    root = jax.random.key(config.seed, impl=config.prng_impl)
    init_key, factor_key, dropout_key = jax.random.split(root, 3)
    if variables is None:
        sample = data.normalize(data.train.images[:1])
        variables = jax.jit(task.model.init, static_argnames="train")(init_key, sample,
                                                                      train=False)
    params = task.reparameterize(variables["params"], factor_key)
    known = {path_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    unknown = sorted(set(task.grad_norms) - known)
    if unknown:
        raise ValueError(f"grad_norms names paths the parameters do not have: {unknown}.")
    where = placement(config)
    batch_stats = variables.get("batch_stats", {})
    params, batch_stats = where.tree(params), where.tree(batch_stats)
    state = where.tree(new_state(task, params, batch_stats))
    params = state.params
    best = _variables(task.model_params(params), batch_stats)
    best_epoch, best_accuracy, start_epoch = 0, -1.0, 0
    steps_per_epoch = len(data.train) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the training split "
                         f"({len(data.train)} examples).")

    # What a resumed run must share with the saved one (epochs may grow).
    run = {"model": repr(task.model), "data": data.name, "train_examples": len(data.train),
           "batch_size": config.batch_size, "seed": config.seed, "prng_impl": config.prng_impl,
           "augmentation": None if config.augmentation is None else list(config.augmentation),
           "lorita": any(isinstance(n, jaxlr.Product) for n in jax.tree.leaves(
               params, is_leaf=jaxlr.nodes.is_node)),
           "params": _structure(params), "label_smoothing": task.label_smoothing,
           "settings": settings}
    checkpoints = metrics_file = None
    history: list[dict[str, Any]] = []
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        metrics_file = workdir / "metrics.jsonl"
        checkpoints = _Checkpoints(workdir.absolute())
        restored = checkpoints.restore(state, best, run, config.epochs)
        if restored is not None:
            state, best, meta = restored
            start_epoch, best_epoch, best_accuracy = (
                meta["epoch"], meta["best_epoch"], meta["best_accuracy"])
        checkpoints.discard_best_after(start_epoch)
        history = _read_history(metrics_file, start_epoch)
        metrics_file.write_text("".join(json.dumps(r) + "\n" for r in history))

    step = make_step(task, dropout_key, state, where)
    bar = _progress_bar(config, steps_per_epoch, start_epoch, label)
    # On the CPU, LRPET's decompositions inside the jitted step run with one LAPACK thread each
    # (XLA's matrix products already use every core; jaxlr.threads), for the loop only.
    threads = contextlib.ExitStack()
    if jax.default_backend() == "cpu":
        threads.enter_context(jaxlr.threads.lapack_threads(1))
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            began = time.perf_counter()
            loss_sum, correct_sum = jnp.zeros([]), jnp.zeros([], jnp.int32)
            first_norms = norms = None
            with where.context():  # jaxlr's projection sees the mesh inside the step
                for images, labels in data_lib.batches(
                        data.train, config.batch_size, seed=config.seed, epoch=epoch,
                        augmentation=config.augmentation):
                    state, loss, correct, norms = step(
                        state, where.batch(data.normalize(images)), where.batch(labels))
                    first_norms = norms if first_norms is None else first_norms
                    loss_sum, correct_sum = loss_sum + loss, correct_sum + correct
                    where.settle(state)
                    bar.update()
            current = _variables(task.model_params(state.params), state.batch_stats)
            validation = evaluate(task.model, current, data, "validation",
                                  config.eval_batch_size)
            record = {
                "epoch": epoch,
                "step": int(state.step),
                "train_loss": float(loss_sum) / steps_per_epoch,
                "train_accuracy": int(correct_sum) / (steps_per_epoch * config.batch_size),
                "validation_loss": validation["loss"],
                "validation_accuracy": validation["accuracy"],
                "seconds": time.perf_counter() - began,
                **{f"grad_norm/{path}/first": float(value) for path, value in first_norms.items()},
                **{f"grad_norm/{path}/last": float(value) for path, value in norms.items()},
            }
            history.append(record)
            bar.set_postfix(epoch=f"{epoch}/{config.epochs}", loss=f"{record['train_loss']:.3f}",
                            acc=f"{record['train_accuracy']:.3f}",
                            val_acc=f"{record['validation_accuracy']:.3f}")
            if validation["accuracy"] > best_accuracy:
                best, best_epoch, best_accuracy = current, epoch, validation["accuracy"]
                if checkpoints is not None:
                    checkpoints.save_best(epoch, best, best_accuracy)
            if metrics_file is not None:
                with metrics_file.open("a") as file:
                    file.write(json.dumps(record) + "\n")
            if checkpoints is not None and (epoch % config.checkpoint_every == 0
                                            or epoch == config.epochs):
                checkpoints.save_last(epoch, state, best, {
                    "epoch": epoch, "best_epoch": best_epoch, "best_accuracy": best_accuracy,
                    "run": run})
            for callback in callbacks:
                callback(epoch, record, state)
    finally:
        threads.close()
        bar.close()
        if checkpoints is not None:
            checkpoints.close()
    final = _variables(task.model_params(state.params), state.batch_stats)
    return TrainResult(state, final, best, best_epoch, best_accuracy, history)
