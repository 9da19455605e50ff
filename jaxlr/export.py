"""Save a compressed parameter tree with orbax-checkpoint and load it back, factor pairs included.

:func:`save` writes the arrays of a tree that holds :class:`~jaxlr.lowrank.LowRank` nodes (the
factor pairs ``a`` and ``b``, never the dense kernels they stand for) and, beside them, a JSON
layout naming each factored kernel with its shape and matrix view. :func:`load` rebuilds the same
tree without being told the ranks, ready for :func:`jaxlr.lowrank.apply` or
:func:`jaxlr.lowrank.nnx_model`. The checkpoint is an orbax composite checkpoint (items
``params`` and ``layout``), written atomically.

Example:
  >>> import tempfile, jax.numpy as jnp
  >>> from jaxlr.lowrank import LowRank
  >>> from jaxlr.matrices import MatrixView
  >>> tree = {"Dense_0": {"kernel": LowRank(jnp.ones((8, 2)), jnp.ones((2, 4)), (8, 4),
  ...                                       MatrixView((0,), (1,))),
  ...                     "bias": jnp.zeros(4)}}
  >>> directory = tempfile.mkdtemp() + "/compressed"
  >>> save(directory, tree)
  >>> load(directory)["Dense_0"]["kernel"].rank
  2
"""

from __future__ import annotations

import os
from typing import Any

import jax

from jaxlr import matrices
from jaxlr.lowrank import LowRank, is_lowrank
from jaxlr.matrices import MatrixView

__all__ = ["load", "save"]

_FORMAT = "jaxlr.lowrank/1"


def _nested(tree: Any) -> Any:
    """The tree as nested dicts of arrays, each LowRank node as ``{"a": ..., "b": ...}``."""
    return jax.tree.map(
        lambda node: {"a": node.a, "b": node.b} if is_lowrank(node) else node,
        tree,
        is_leaf=is_lowrank,
    )


def save(directory: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
    """Writes ``tree`` (nested dicts with :class:`~jaxlr.lowrank.LowRank` nodes) to ``directory``.

    Args:
      directory: where the checkpoint goes; must not exist unless ``force``.
      tree: the parameter tree, e.g. ``jaxlr.lowrank.lowrank_params(...)`` or a whole Linen
        ``variables`` dict.
      force: overwrite an existing checkpoint.

    Raises:
      TypeError: if the tree holds containers other than dicts (NNX ``State``: pass
        ``nnx.to_pure_dict(state)``).
      FileExistsError: if ``directory`` exists and not ``force``.
    """
    import orbax.checkpoint as ocp

    layout = {}
    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lowrank)[0]:
        if any(not isinstance(key, jax.tree_util.DictKey) for key in path):
            raise TypeError(
                f"save takes nested dicts; {jax.tree_util.keystr(path)} is reached through "
                f"another container. Pass nnx.to_pure_dict(state) for an NNX state."
            )
        if is_lowrank(node):
            layout[matrices.path_str(matrices.path_names(path))] = {
                "shape": list(node.shape),
                "row_axes": list(node.view.row_axes),
                "col_axes": list(node.view.col_axes),
            }
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not force:
        raise FileExistsError(f"{directory} exists; pass force=True to overwrite it.")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            directory,
            ocp.args.Composite(
                params=ocp.args.StandardSave(_nested(tree)),
                layout=ocp.args.JsonSave({"format": _FORMAT, "lowrank": layout}),
            ),
            force=force,
        )


def load(directory: str | os.PathLike) -> Any:
    """Reads a checkpoint written by :func:`save` and rebuilds its :class:`LowRank` nodes.

    Raises:
      FileNotFoundError: if ``directory`` holds no checkpoint.
      ValueError: if the checkpoint was not written by :func:`save`.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint at {directory}.")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            directory,
            ocp.args.Composite(params=ocp.args.StandardRestore(), layout=ocp.args.JsonRestore()),
        )
    layout = restored["layout"]
    if not isinstance(layout, dict) or layout.get("format") != _FORMAT:
        raise ValueError(f"{directory} is not a checkpoint written by jaxlr.export.save.")
    tree = restored["params"]
    for name, entry in layout["lowrank"].items():
        *parents, last = name.split("/")
        node = tree
        for key in parents:
            node = node[key]
        pair = node[last]
        view = MatrixView(tuple(entry["row_axes"]), tuple(entry["col_axes"]))
        node[last] = LowRank(pair["a"], pair["b"], tuple(entry["shape"]), view)
    return tree
