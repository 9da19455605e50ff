"""Calibration: the second moment of each kernel's inputs, from one pass over real batches.

Data-aware truncation (:mod:`jaxlr.whitening`) needs, for each kernel ``W`` seen as its matrix
``(m, n)`` (:mod:`jaxlr.matrices`), the second moment of the rows ``x`` (length ``m``) that meet
it: ``C = E[x x^T]``. For a dense layer a row is one input vector; for a convolution it is one
input patch, in the order of the kernel's matrix rows (``kh * kw * cin`` in Flax's layout); for
attention's query, key and value it is the block's input, for its output projection the heads'
output. :func:`calibrate` runs the user's unchanged model (Flax Linen, Flax NNX, Equinox, or a
function of a parameter tree) over the batches given and accumulates every ``C``:

* **Found in the program, not in the framework.** The forward pass is traced once; each selected
  kernel is followed (through dtype casts, transposes and nested ``jit`` / ``custom_jvp`` calls)
  to the ``dot_general`` or ``conv_general_dilated`` that uses it, and the other operand of that
  product is what is recorded (a convolution's operand as the patches its window reads, with the
  convolution's own strides, padding and dilations). So any layer, framework or hand-written
  model works the same. A kernel the pass cannot follow (reshaped before use, a grouped
  convolution, a batched product, a loop) is listed in :attr:`Calibration.unseen` with the
  reason, and data-aware truncation refuses it by name.
* **Streaming and jitted.** Each batch runs one compiled step that adds ``X^T X`` (``m x m``) to a
  running sum: memory does not grow with the number of batches, and no activation leaves the
  step. On a mesh (batches sharded over their leading axis), each device sums its rows and XLA
  all-reduces the small ``m x m`` sums; no activation is gathered.
* **Float32 sums** unless ``dtype`` asks for more (float64 needs ``jax_enable_x64``).

The model runs as given: put it in inference mode first (``train=False`` through ``forward``,
``model.eval()`` in NNX), so BatchNorm uses its running statistics and dropout is off.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlr
  >>> model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(10)])
  >>> x = jax.random.normal(jax.random.key(0), (256, 20))
  >>> variables = model.init(jax.random.key(1), x)
  >>> calibration = jaxlr.calibrate(model, [x[:128], x[128:]], variables=variables)
  >>> calibration.moments["layers_0/kernel"].shape, calibration.counts["layers_0/kernel"]
  ((20, 20), 256)
  >>> result = jaxlr.compress(variables, keep=0.25, calibration=calibration)
  >>> result.compressed["params"]["layers_0"]["kernel"].rank
  5
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex
from jax.sharding import NamedSharding, PartitionSpec

from jaxlr import _equinox, _nnx, matrices, nodes, selection

__all__ = ["Calibration", "calibrate"]

DEFAULT_DAMPING = 0.01
"""The damping of :func:`calibrate` (:mod:`jaxlr.whitening` explains it)."""


class Calibration(NamedTuple):
    """What :func:`calibrate` measured.

    Attributes:
      moments: ``{key: C}``, the mean second moment ``E[x x^T]`` (``m x m``) of the rows meeting
        each kernel's matrix, in the order of the matrix's rows.
      counts: ``{key: rows}``, how many rows each moment averages (for a convolution, patches).
      shapes: ``{key: kernel shape}`` of the calibrated tree.
      damping: the damping of the whitening (:mod:`jaxlr.whitening`): the share of the mean
        eigenvalue of ``C`` added to every eigenvalue before the square root is taken. Another
        damping needs no second pass: ``calibration._replace(damping=0.1)``.
      unseen: ``{key: reason}`` for each selected kernel the pass could not follow.
    """

    moments: dict[str, jax.Array]
    counts: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    damping: float
    unseen: dict[str, str]

    def check(self, found: Mapping[str, selection.MatrixLeaf], what: str = "compress") -> None:
        """Raises a ``ValueError`` naming each matrix of ``found`` this calibration cannot whiten:
        not calibrated (or not followed: :attr:`unseen`), or calibrated with another shape."""
        for key, leaf in found.items():
            if key in self.unseen:
                raise ValueError(f"{what}: the calibration could not follow kernel {key!r} "
                                 f"({self.unseen[key]}); leave it out of the selection (filter=) "
                                 "or truncate it without calibration.")
            if key not in self.moments:
                raise ValueError(f"{what}: kernel {key!r} was not calibrated; calibrated kernels: "
                                 f"{sorted(self.moments)[:20]}. Calibrate the tree being "
                                 "compressed (with a filter that selects it).")
            if tuple(self.shapes[key]) != tuple(leaf.shape):
                raise ValueError(f"{what}: kernel {key!r} has shape {tuple(leaf.shape)}, but the "
                                 f"calibration saw shape {tuple(self.shapes[key])}: it belongs to "
                                 "another model.")
            if self.moments[key].shape != (leaf.matrix_shape[0],) * 2:
                raise ValueError(f"{what}: kernel {key!r}'s matrix has {leaf.matrix_shape[0]} "
                                 f"rows, but its calibrated moment is "
                                 f"{self.moments[key].shape}: calibrate with the same view.")


def _check_damping(damping: Any) -> float:
    if (isinstance(damping, bool | np.bool_) or not isinstance(damping, numbers.Real)
            or not math.isfinite(damping) or damping < 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}.")
    return float(damping)


# ------------------------------------------------------------------------------------------------
# Following each kernel through the traced program.

_FOLLOW = ("convert_element_type", "copy", "copy_p", "reduce_precision")
_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "checkpoint", "remat", "remat2")


class _Mark(NamedTuple):
    key: str
    perm: tuple[int, ...]  # the value is the kernel transposed by ``perm``


class _Recorder:
    """Collects, during one trace, the rows meeting each kernel and the kernels it cannot follow."""

    def __init__(self, views: Mapping[str, matrices.MatrixView], shapes: Mapping[str, tuple],
                 dtype: Any):
        self.views, self.shapes, self.dtype = views, shapes, dtype
        self.moments: dict[str, jax.Array] = {}
        self.rows: dict[str, int] = {}  # static: the batch's shape decides it
        self.unseen: dict[str, str] = {}

    def refuse(self, key: str, reason: str) -> None:
        self.unseen.setdefault(key, reason)

    def add(self, key: str, rows: jax.Array) -> None:
        """Adds ``sum x x^T`` over the rows ``x`` of ``rows`` (``(..., m)``; its leading axes,
        which may be sharded, are contracted, never merged)."""
        rows = rows.astype(self.dtype)
        leading = tuple(range(rows.ndim - 1))
        moment = lax.dot_general(rows, rows, ((leading, leading), ((), ())),
                                 precision=lax.Precision.HIGHEST,
                                 out_sharding=_replicated(rows))
        if key in self.moments:
            moment = moment + self.moments[key]
        self.moments[key] = moment
        self.rows[key] = self.rows.get(key, 0) + math.prod(rows.shape[:-1])

    def dot(self, key: str, perm: tuple[int, ...], kernel_contract: tuple[int, ...],
            kernel_batch: tuple[int, ...], x: jax.Array, x_contract: tuple[int, ...]) -> None:
        if kernel_batch:
            return self.refuse(key, "used in a batched product")
        axes = [perm[d] for d in kernel_contract]
        view = self.views[key]
        if sorted(axes) != sorted(view.row_axes):
            return self.refuse(key, f"its product contracts axes {tuple(axes)}, not the matrix "
                               f"rows {view.row_axes}")
        order = [x_contract[axes.index(a)] for a in view.row_axes]
        moved = jnp.moveaxis(x, order, tuple(range(-len(order), 0)))
        if len(order) > 1:
            moved = moved.reshape(*moved.shape[:-len(order)], -1)
        self.add(key, moved)

    def conv(self, key: str, perm: tuple[int, ...], lhs: jax.Array, rhs_shape: tuple[int, ...],
             params: Mapping[str, Any]) -> None:
        if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
            return self.refuse(key, "a grouped convolution")
        lhs_spec, rhs_spec, _ = params["dimension_numbers"]
        spatial = tuple(rhs_spec[2:])
        names = [perm[rhs_spec[1]]] + [perm[d] for d in spatial]
        view = self.views[key]
        if sorted(names) != sorted(view.row_axes):
            return self.refuse(key, "its convolution reads axes other than the matrix rows")
        window = tuple(rhs_shape[d] for d in spatial)
        # (N, C, spatial...) in the kernel's spatial order; the patches' features are (C, window).
        lhs = jnp.transpose(lhs, lhs_spec)
        patches = lax.conv_general_dilated_patches(
            lhs, window, params["window_strides"], params["padding"],
            lhs_dilation=params["lhs_dilation"], rhs_dilation=params["rhs_dilation"],
            precision=lax.Precision.HIGHEST)
        patches = jnp.moveaxis(patches, 1, -1)  # (N, out spatial..., C * window)
        lead = patches.ndim - 1
        patches = patches.reshape(*patches.shape[:lead], lhs.shape[1], *window)
        order = [lead + names.index(a) for a in view.row_axes]
        patches = jnp.transpose(patches, (*range(lead), *order))
        self.add(key, patches.reshape(*patches.shape[:lead], -1))


def _replicated(x: jax.Array) -> Any:
    """``None``, or where ``x`` is sharded over axes of explicit sharding, a replicated sharding
    on its mesh (contracting such axes must say where the sum goes: all-reduced, here)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(s is None for s in spec):
        return None
    return NamedSharding(sharding.mesh, PartitionSpec())


def _sub_program(eqn: Any) -> tuple[Any, list[Any]] | None:
    """The jaxpr and constants of a call-like equation whose inputs map one to one onto it."""
    if eqn.primitive.name not in _CALLS:
        return None
    for name in ("jaxpr", "call_jaxpr"):
        sub = eqn.params.get(name)
        if isinstance(sub, jex.ClosedJaxpr):
            jaxpr, consts = sub.jaxpr, list(sub.consts)
        elif isinstance(sub, jex.Jaxpr):
            jaxpr, consts = sub, []
        else:
            continue
        if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
            return jaxpr, consts
    return None


def _evaluate(jaxpr: Any, consts: list[Any], args: list[Any], marks: list[_Mark | None],
              record: _Recorder) -> tuple[list[Any], list[_Mark | None]]:
    """Evaluates ``jaxpr`` as ``jax.core.eval_jaxpr`` does, following the marked kernels."""
    env: dict[Any, Any] = {}
    mark: dict[Any, _Mark] = {}

    def read(var: Any) -> Any:
        return var.val if isinstance(var, jex.Literal) else env[var]

    def mark_of(var: Any) -> _Mark | None:
        return None if isinstance(var, jex.Literal) else mark.get(var)

    env.update(zip(jaxpr.constvars, consts, strict=True))
    for var, value, m in zip(jaxpr.invars, args, marks, strict=True):
        env[var] = value
        if m is not None:
            mark[var] = m
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        marked = [mark_of(v) for v in eqn.invars]
        name, params = eqn.primitive.name, eqn.params
        out_marks: list[_Mark | None] = [None] * len(eqn.outvars)
        sub = _sub_program(eqn) if any(marked) else None
        if sub is not None:
            outs, out_marks = _evaluate(sub[0], sub[1], values, marked, record)
        else:
            if any(marked):
                if name in _FOLLOW and len(values) == 1:
                    out_marks = marked
                elif name == "transpose":
                    m = marked[0]
                    out_marks = [_Mark(m.key, tuple(m.perm[p] for p in params["permutation"]))]
                elif name == "dot_general" and sum(m is not None for m in marked) == 1:
                    (lc, rc), (lb, rb) = params["dimension_numbers"]
                    k = 0 if marked[0] is not None else 1
                    kc, xc, kb = (lc, rc, lb) if k == 0 else (rc, lc, rb)
                    record.dot(marked[k].key, marked[k].perm, tuple(kc), tuple(kb),
                               values[1 - k], tuple(xc))
                elif (name == "conv_general_dilated" and marked[0] is None
                      and marked[1] is not None):
                    record.conv(marked[1].key, marked[1].perm, values[0],
                                tuple(np.shape(values[1])), params)
                else:
                    for m in marked:
                        if m is not None:
                            record.refuse(m.key, f"used by {name!r}, which calibration cannot "
                                          "follow")
            bind = eqn.primitive.get_bind_params(params)
            # JAX < 0.8 returns (subfunctions, parameters); later versions the parameters.
            subfuns, bind_params = ([], bind) if isinstance(bind, Mapping) else bind
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*subfuns, *values, **bind_params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for var, value, m in zip(eqn.outvars, outs, out_marks, strict=True):
            env[var] = value
            if m is not None:
                mark[var] = m
    return [read(v) for v in jaxpr.outvars], [mark_of(v) for v in jaxpr.outvars]


# ------------------------------------------------------------------------------------------------
# The model as a function of its parameter tree.


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray)


def _as_function(model: Any, variables: Any, forward: Callable[..., Any] | None
                 ) -> tuple[Any, Callable[[Any, Any], Any]]:
    """The parameter tree to calibrate and ``run(tree, batch)``, for each kind of model."""
    if isinstance(model, nn.Module):
        if variables is None:
            raise TypeError("calibrate(model, batches, variables=...): a Flax Linen model needs "
                            "its variables.")
        tree = nodes.collapse_tree(variables)
        if forward is None:
            return tree, lambda v, x: model.apply(v, x)
        return tree, lambda v, x: forward(model, v, x)
    if _nnx.is_module(model):
        if variables is not None:
            raise TypeError("calibrate: a Flax NNX module holds its variables; pass no "
                            "variables=.")
        from flax import nnx  # noqa: PLC0415

        model = _nnx.collapse(model)
        graphdef, state, rest = nnx.split(model, nnx.Param, ...)
        tree = nnx.to_pure_dict(state)

        def run_nnx(pure: Any, x: Any) -> Any:
            params = jax.tree.map(lambda v: v, state)
            nnx.replace_by_pure_dict(params, pure)
            module = nnx.merge(graphdef, params, rest)
            return module(x) if forward is None else forward(module, x)

        return tree, run_nnx
    if _equinox.is_module(model):
        if variables is not None:
            raise TypeError("calibrate: an Equinox module holds its weights; pass no "
                            "variables=.")
        tree = nodes.collapse_tree(model)
        if forward is None:
            return tree, lambda m, x: jax.vmap(m)(x)
        return tree, forward
    if callable(model):
        if variables is None:
            raise TypeError("calibrate(fn, batches, variables=...): a function of a parameter "
                            "tree needs the tree.")
        return nodes.collapse_tree(variables), model
    raise TypeError(f"calibrate takes a Flax Linen model (with variables=), a Flax NNX module, an "
                    f"Equinox module or a function fn(variables, batch); got "
                    f"{type(model).__name__}.")


def _signature(batch: Any, index: int) -> tuple[Any, tuple]:
    leaves, treedef = jax.tree.flatten(batch)
    if not leaves:
        raise ValueError(f"batches: batch {index} holds no array.")
    out = []
    for leaf in leaves:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"batches: batch {index} holds a {type(leaf).__name__}; batches "
                            "must be arrays (or trees of arrays).")
        dtype = jnp.dtype(leaf.dtype)
        if not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
            raise TypeError(f"batches: batch {index} has dtype {dtype}; batches must be "
                            "numeric arrays.")
        if np.ndim(leaf) < 1 or np.shape(leaf)[0] < 1:
            raise ValueError(f"batches: batch {index} has shape {np.shape(leaf)}; each array "
                             "needs a leading batch axis of at least one example.")
        out.append((tuple(np.shape(leaf)[1:]), dtype))
    return treedef, tuple(out)


def _moments(record: _Recorder, unseen: dict[str, str], rows: dict[str, int]
             ) -> dict[str, jax.Array]:
    unseen.update(record.unseen)  # known once the program is traced
    rows.update(record.rows)
    return record.moments


def _progress(batches: Iterable[Any], progress: bool) -> Iterable[Any]:
    if not progress:
        return batches
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415
    except ImportError:  # a bar is a convenience: go on without one
        print("calibrate: install tqdm for a progress bar", file=sys.stderr)
        return batches
    return tqdm(batches, desc="calibrate", unit="batch")


class _Pass(NamedTuple):
    found: dict[str, selection.MatrixLeaf]
    shapes: dict[str, tuple[int, ...]]
    arrays: list[Any]       # the tree's arrays, the step's inputs
    trace: Callable[[list[Any], Any], _Recorder]
    step: Any               # jitted (sums, arrays, batch) -> (sums, finite)


def _prepare(model: Any, variables: Any, forward: Callable[..., Any] | None,
             filter: matrices.Filter | None, view: matrices.View, dtype: Any  # noqa: A002
             ) -> _Pass:
    """The selected kernels, the tree's arrays and the jitted step of one calibration pass."""
    tree, run = _as_function(model, variables, forward)
    found = selection.matrix_leaves(tree, filter=filter, view=view)
    flat, treedef = jax.tree_util.tree_flatten(tree, is_leaf=nodes.is_node)
    arrays_at = [i for i, leaf in enumerate(flat) if _is_array(leaf)]
    position = {i: j for j, i in enumerate(arrays_at)}
    missing = [key for key, leaf in found.items() if leaf.index not in position]
    if missing:
        raise TypeError(f"calibrate: kernels {missing} are not arrays.")
    views = {key: leaf.view for key, leaf in found.items()}
    shapes = {key: tuple(leaf.shape) for key, leaf in found.items()}

    def model_fn(arrays: list[Any], batch: Any) -> Any:
        leaves = list(flat)
        for i, value in zip(arrays_at, arrays, strict=True):
            leaves[i] = value
        return run(jax.tree_util.tree_unflatten(treedef, leaves), batch)

    def trace(arrays: list[Any], batch: Any) -> _Recorder:
        closed = jax.make_jaxpr(model_fn)(arrays, batch)
        marks: list[_Mark | None] = [None] * len(closed.jaxpr.invars)
        for key, leaf in found.items():
            marks[position[leaf.index]] = _Mark(key, tuple(range(len(leaf.shape))))
        record = _Recorder(views, shapes, dtype)
        _evaluate(closed.jaxpr, list(closed.consts), [*arrays, *jax.tree.leaves(batch)], marks,
                  record)
        for key in record.unseen:
            record.moments.pop(key, None)
            record.rows.pop(key, None)
        return record

    @jax.jit
    def step(sums: dict[str, jax.Array], arrays: list[Any], batch: Any
             ) -> tuple[dict[str, jax.Array], jax.Array]:
        record = trace(arrays, batch)
        finite = jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(batch)
                            if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.array(True)])
        return {k: sums[k] + record.moments[k] for k in sums}, jnp.all(finite)

    return _Pass(found, shapes, [flat[i] for i in arrays_at], trace, step)


def calibrate(
    model: Any,
    batches: Iterable[Any],
    *,
    variables: Any = None,
    forward: Callable[..., Any] | None = None,
    filter: matrices.Filter | None = "all",  # noqa: A002
    view: matrices.View = None,
    damping: float = DEFAULT_DAMPING,
    dtype: Any = jnp.float32,
    progress: bool = False,
) -> Calibration:
    """Runs the model over ``batches`` and returns each selected kernel's input second moment.

    Args:
      model: a Flax Linen model (with ``variables``), a Flax NNX module, an Equinox module, or a
        function ``fn(variables, batch)`` of a parameter tree (with ``variables``). LoRITa
        products and factor pairs are collapsed first, so a model trained factorized is
        calibrated as the dense model it stands for.
      batches: an iterable of input batches (arrays, or trees of arrays, with a leading batch
        axis), all of the same structure, dtypes and trailing shapes; calibration data, e.g. a
        few hundred training examples. Each is read once.
      variables: a Linen model's variables, or the tree of a function ``model``.
      forward: how a batch runs the model, when not as ``model.apply(variables, batch)`` (Linen:
        ``forward(model, variables, batch)``), ``model(batch)`` (NNX: ``forward(module, batch)``)
        or ``jax.vmap(model)(batch)`` (Equinox: ``forward(module, batch)``); e.g. to pass
        ``train=False``.
      filter: which kernels to calibrate (default: every kernel, the output layer included, so
        any later selection finds its moments; :mod:`jaxlr.selection`).
      view: how each kernel is seen as a matrix (:mod:`jaxlr.matrices`).
      damping: stored with the moments for the whitening (:mod:`jaxlr.whitening`), ``>= 0``.
      dtype: of the sums: ``float32``, or ``float64`` with ``jax_enable_x64``.
      progress: show a progress bar (tqdm) over the batches.

    Returns:
      A :class:`Calibration`.

    Raises:
      ValueError / TypeError: for no batches, a batch of another structure, dtype or trailing
        shape than the first (named by its index), a batch holding NaN or Inf, a model that cannot
        run on the first batch, a bad ``damping`` or ``dtype``, or a filter that selects no
        kernel.
    """
    damping = _check_damping(damping)
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}.")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs jax.config.update('jax_enable_x64', True).")
    if isinstance(batches, jax.Array | np.ndarray):
        raise TypeError("batches must be an iterable of batches (e.g. a list of arrays), not one "
                        "array: wrap a single batch as [batch].")
    found, shapes, arrays, trace, step = _prepare(model, variables, forward, filter, view, dtype)
    first = None
    sums: dict[str, jax.Array] = {}
    counts: dict[str, int] = {}
    unseen: dict[str, str] = {}
    rows_by_shape: dict[tuple, dict[str, int]] = {}  # each batch shape's rows, by kernel
    flags = []
    for index, batch in enumerate(_progress(batches, progress)):
        signature = _signature(batch, index)
        if first is not None and signature != first:
            raise ValueError(f"batches: batch {index} has structure, trailing shapes and dtypes "
                             f"{signature[1]}, unlike batch 0's {first[1]}; every batch must "
                             "match the first but for its leading axis.")
        leading = tuple(np.shape(x)[0] for x in jax.tree.leaves(batch))
        if leading not in rows_by_shape:
            shaped = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), batch)
            seen: dict[str, int] = {}
            try:
                probe = jax.eval_shape(lambda a, b, seen=seen: _moments(trace(a, b), unseen,
                                                                        seen), arrays, shaped)
            except Exception as error:  # noqa: BLE001 - any framework's error, named for the user
                raise ValueError(
                    f"calibrate: the model could not run on batch {index} (arrays of shapes "
                    f"{[np.shape(x) for x in jax.tree.leaves(batch)]}): {error}\nIs the model in "
                    "inference mode (NNX: model.eval(); Linen: forward=lambda model, variables, "
                    "x: model.apply(variables, x, train=False)), and does each batch hold only "
                    "the model's input (for (inputs, labels) batches pass forward=)?") from error
            rows_by_shape[leading] = seen
        if first is None:
            first = signature
            for key in found:
                if key not in probe and key not in unseen:
                    unseen[key] = "the forward pass does not use it"
            sums = {k: jnp.zeros(v.shape, dtype) for k, v in probe.items()}
            counts = dict.fromkeys(probe, 0)
        for key, rows in rows_by_shape[leading].items():
            counts[key] += rows
        sums, finite = step(sums, arrays, batch)
        flags.append(finite)
    if first is None:
        raise ValueError("batches is empty: calibration needs at least one batch.")
    bad = np.flatnonzero(~np.asarray(jax.device_get(flags)))
    if bad.size:
        raise ValueError(f"batches: batch {int(bad[0])} holds NaN or Inf.")
    moments = {k: sums[k] / counts[k] for k in found if k in sums}
    finite = jax.device_get({k: jnp.all(jnp.isfinite(v)) for k, v in moments.items()})
    overflowed = [k for k in moments if not finite[k]]
    if overflowed:
        raise ValueError(f"calibrate: the second moment of the inputs of {overflowed} is not "
                         f"finite (the inputs' squares overflow {dtype}, or the model computes "
                         "Inf/NaN on these batches); calibrate with smaller inputs or "
                         "dtype=float64.")
    return Calibration(moments, {k: counts[k] for k in moments},
                       {k: shapes[k] for k in moments}, damping,
                       {k: unseen[k] for k in found if k in unseen})
