"""A Flax Linen ``TrainState`` that LRPET and LoRITa plug into without changing the training step.

Flax's ``TrainState.apply_gradients(grads=g, batch_stats=bs)`` hands ``batch_stats`` to
``replace``, not to the optimizer, so LRPET's BN rectification would never see the statistics.
:class:`TrainState` forwards them (and any ``extra_args``) to ``tx.update`` as keyword extra
arguments, and its ``apply_fn`` runs any tree jaxlr makes (:func:`jaxlr.apply`: LoRITa products
as their kernels, factor pairs as two thin layers), so the usual Linen step works unchanged::

    state = jaxlr.TrainState.create(
        apply_fn=model.apply, params=jaxlr.lorita.factorize(variables["params"], 3, key),
        batch_stats=variables["batch_stats"],
        tx=jaxlr.with_low_rank_projection(optax.sgd(0.1, momentum=0.9), prune=0.5))

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                         images, train=True, mutable=["batch_stats"])
        return cross_entropy(logits, labels), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optax
from flax.training import train_state

from jaxlr import inference

__all__ = ["TrainState"]


class TrainState(train_state.TrainState):
    """Flax's ``TrainState`` with ``batch_stats`` and extra arguments forwarded to the optimizer.

    Attributes:
      batch_stats: the model's BatchNorm statistics (``None`` without BatchNorm).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
      >>> import jaxlr
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=False):
      ...         x = nn.Conv(8, (3, 3))(x)
      ...         x = nn.BatchNorm(use_running_average=not train)(x)
      ...         return nn.Dense(2)(x.mean((1, 2)))
      >>> x = jnp.ones((4, 8, 8, 3))
      >>> model = Net()
      >>> variables = model.init(jax.random.key(0), x)
      >>> pairs = jaxlr.find_bn_pairs(model, variables, x)
      >>> tx = jaxlr.with_low_rank_projection(
      ...     optax.sgd(0.1), prune=0.5, options=jaxlr.ProjectionOptions(bn_pairs=pairs))
      >>> state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
      ...                           batch_stats=variables["batch_stats"])
      >>> def loss_fn(params):
      ...     y, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
      ...                                 x, train=True, mutable=["batch_stats"])
      ...     return jnp.mean(y ** 2), updates
      >>> grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
      >>> state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
      >>> int(jnp.linalg.matrix_rank(state.params["Conv_0"]["kernel"].reshape(27, 8)))
      4
    """

    batch_stats: Any = None

    def apply_gradients(self, *, grads: Any, extra_args: Mapping[str, Any] | None = None,
                        **kwargs: Any) -> TrainState:
        """Updates ``step``, ``params`` and ``opt_state``, and replaces the fields in ``kwargs``.

        ``tx.update`` receives ``batch_stats`` (the new ones when ``kwargs`` holds them, else the
        state's) and ``extra_args`` as keyword extra arguments; a transformation that takes none
        ignores them.

        Args:
          grads: gradients with the structure of ``params``.
          extra_args: further keyword arguments for ``tx.update``.
          **kwargs: fields to replace, as Flax's ``apply_gradients`` (``batch_stats=...``).
        """
        if extra_args is not None and not isinstance(extra_args, Mapping):
            raise TypeError(f"extra_args must be a mapping of keyword arguments for tx.update, "
                            f"got {type(extra_args).__name__}.")
        extra = dict(extra_args or {})
        stats = kwargs.get("batch_stats", self.batch_stats)
        if stats is not None:
            extra.setdefault("batch_stats", stats)
        tx = optax.with_extra_args_support(self.tx)
        updates, opt_state = tx.update(grads, self.opt_state, self.params, **extra)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)

    @classmethod
    def create(cls, *, apply_fn: Callable[..., Any], params: Any,
               tx: optax.GradientTransformation, **kwargs: Any) -> TrainState:
        """A state with ``step=0`` and an initialised ``opt_state``; ``apply_fn`` is wrapped to
        run LoRITa products and factor pairs (:func:`jaxlr.apply`)."""
        if not callable(apply_fn):
            raise TypeError(f"apply_fn must be a function (model.apply), got "
                            f"{type(apply_fn).__name__}.")
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(f"tx must be an optax GradientTransformation, got "
                            f"{type(tx).__name__}.")
        wrapped = inference._wrap_apply_fn(apply_fn)  # noqa: SLF001 - the package's own helper
        return super().create(apply_fn=wrapped, params=params, tx=tx, **kwargs)
