"""Checkpoints of jaxlr's trees with orbax-checkpoint: factor pairs and LoRITa products included.

:func:`save` writes a tree that holds :class:`~jaxlr.nodes.LowRank` factor pairs and
:class:`~jaxlr.nodes.Product` s (their factors, never the dense kernels they stand for) and, beside
them, a JSON layout naming each node with its kernel's shape and matrix view. :func:`load` rebuilds
the same tree, typed nodes included, without being told the ranks or the depths. It takes a Linen
variable dict, an NNX ``State`` or an NNX module (its whole state, with the nodes its layers hold).
A module's random number streams (``nnx.Rngs``) are not saved. A loaded tree runs with
:func:`jaxlr.apply` (Linen) or :func:`jaxlr.inference.nnx_model` (NNX).

**Integrity.** Every file of the checkpoint is listed with its size and SHA-256 checksum
(:func:`write_checksums`, when the checkpoint is finalized); :func:`load` and :class:`Restore`
verify them first (:func:`verify_checksums`), so a flipped byte, a truncated or a missing file
raises an error naming the file instead of loading altered values.

The same format works in an orbax ``CheckpointManager`` (steps, retention, async saving):
:class:`Save` and :class:`Restore` are checkpoint arguments handled by
:class:`TreeCheckpointHandler`::

    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=3))
    manager.save(step, args=jaxlr.export.Save(params))
    params = manager.restore(manager.latest_step(), args=jaxlr.export.Restore())

or, beside other items, ``ocp.args.Composite(params=jaxlr.export.Save(params), ...)``.

Example:
  >>> import tempfile, jax.numpy as jnp
  >>> from jaxlr.nodes import LowRank
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

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxlr import _nnx, nodes
from jaxlr.matrices import MatrixView
from jaxlr.nodes import LowRank, Product

__all__ = [
    "CheckpointCorruptedError",
    "Restore",
    "Save",
    "TreeCheckpointHandler",
    "load",
    "save",
    "verify_checksums",
    "write_checksums",
]

_FORMAT = "jaxlr.tree/3"
_LAYOUT = "jaxlr_layout.json"
_CHECKSUMS = "jaxlr_checksums.json"
# Written by orbax after a handler finalizes its directory, or by this module: not listed.
_UNLISTED = frozenset({_CHECKSUMS, "_CHECKPOINT_METADATA", "commit_success.txt"})


class CheckpointCorruptedError(ValueError):
    """A checkpoint file is missing, truncated or altered (its checksum does not match)."""


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: epath.Path) -> list[str]:
    """The listed files under ``directory``, as relative posix paths (``iterdir`` works on every
    file system orbax writes to; recursive globs do not)."""
    found, pending = [], [directory]
    while pending:
        for path in pending.pop().iterdir():
            if path.is_dir():
                pending.append(path)
            else:
                name = path.relative_to(directory).as_posix()
                if name not in _UNLISTED:
                    found.append(name)
    return sorted(found)


def write_checksums(directory: str | os.PathLike) -> None:
    """Lists every file of a checkpoint directory with its size and SHA-256 checksum, in
    ``jaxlr_checksums.json`` beside them (the files orbax writes at commit are left out).

    Example:
      >>> import pathlib, tempfile
      >>> directory = pathlib.Path(tempfile.mkdtemp())
      >>> _ = (directory / "data").write_bytes(b"weights")
      >>> write_checksums(directory)
      >>> verify_checksums(directory)
      >>> _ = (directory / "data").write_bytes(b"weighTs")
      >>> verify_checksums(directory)
      Traceback (most recent call last):
        ...
      jaxlr.export.CheckpointCorruptedError: .../data is corrupted: its SHA-256 checksum ...
    """
    directory = epath.Path(directory)
    listing = {name: {"size": (directory / name).stat().length,
                      "sha256": _sha256(directory / name)} for name in _files(directory)}
    (directory / _CHECKSUMS).write_text(json.dumps({"format": _FORMAT, "files": listing}))


def verify_checksums(directory: str | os.PathLike) -> None:
    """Checks every file listed by :func:`write_checksums`.

    Raises:
      CheckpointCorruptedError: naming the first file that is missing, of another size
        (truncated) or of another checksum (altered), or when the listing itself is missing.
    """
    directory = epath.Path(directory)
    listing_path = directory / _CHECKSUMS
    if not listing_path.exists():
        raise CheckpointCorruptedError(f"{listing_path} is missing: the checkpoint was not "
                                       "finalized, or was written by another version of jaxlr.")
    try:
        listing = json.loads(listing_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointCorruptedError(f"{listing_path} is unreadable: {error}.") from None
    for name, entry in listing.items():
        path = directory / name
        if not path.exists():
            raise CheckpointCorruptedError(f"{path} is missing from the checkpoint.")
        size = path.stat().length
        if size != entry["size"]:
            raise CheckpointCorruptedError(
                f"{path} is truncated or altered: {size} bytes where {entry['size']} were "
                "written.")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointCorruptedError(
                f"{path} is corrupted: its SHA-256 checksum differs from the one written with "
                "the checkpoint.")


def _plain(tree: Any) -> Any:
    """The tree to save as nested dicts of arrays (an NNX module's state but its random number
    streams, nodes kept)."""
    if _nnx.is_module(tree):
        from flax import nnx  # noqa: PLC0415

        return _nnx.parameters(tree, nnx.Not(nnx.RngState))
    from flax import nnx  # noqa: PLC0415

    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    return tree


def _layout_and_arrays(tree: Any) -> tuple[dict[str, Any], Any]:
    """The layout of the tree's nodes and the tree as string-keyed nested dicts of arrays."""
    layout: dict[str, Any] = {}

    def convert(path: tuple[str, ...], node: Any) -> Any:
        if nodes.is_node(node):
            entry = {"shape": list(node.shape), "row_axes": list(node.view.row_axes),
                     "col_axes": list(node.view.col_axes)}
            if isinstance(node, LowRank):
                layout["/".join(path)] = {"type": "LowRank", **entry}
                return {"a": nodes.value_of(node.a), "b": nodes.value_of(node.b)}
            layout["/".join(path)] = {"type": "Product", "depth": node.depth, **entry}
            return {"factors": {str(i): nodes.value_of(f) for i, f in enumerate(node.factors)}}
        if isinstance(node, Mapping):
            return {str(k): convert((*path, str(k)), v) for k, v in node.items()}
        if isinstance(node, list | tuple) or not hasattr(node, "shape"):
            raise TypeError(
                f"save takes nested dicts of arrays (and jaxlr's nodes); "
                f"{'/'.join(path) or 'the tree'} is a {type(node).__name__}. Pass a Linen "
                "variable dict, an NNX State or an NNX module.")
        return node

    return layout, convert((), _plain(tree))


def _rebuild(arrays: Any, layout: Mapping[str, Any]) -> Any:
    for key, entry in layout.items():
        *parents, last = key.split("/")
        parent = arrays
        for name in parents:
            parent = parent[name]
        stored = parent[last]
        view = MatrixView(tuple(entry["row_axes"]), tuple(entry["col_axes"]))
        shape = tuple(entry["shape"])
        if entry["type"] == "LowRank":
            parent[last] = LowRank(stored["a"], stored["b"], shape, view)
        else:
            factors = tuple(stored["factors"][str(i)] for i in range(entry["depth"]))
            parent[last] = Product(factors, shape, view)
    return arrays


class TreeCheckpointHandler(ocp.AsyncCheckpointHandler):
    """An orbax checkpoint handler of trees with jaxlr's nodes (:class:`Save`, :class:`Restore`).

    The arrays go through orbax's ``StandardCheckpointHandler`` (sharded, async); the nodes'
    layout through its ``JsonCheckpointHandler``, in a file beside them; the checksums of every
    file are written when the checkpoint is finalized and verified before it is restored.
    """

    def __init__(self) -> None:
        self._arrays = ocp.StandardCheckpointHandler()
        self._layout = ocp.JsonCheckpointHandler(filename=_LAYOUT)

    async def async_save(self, directory: epath.Path, args: Save) -> list[Any] | None:
        layout, arrays = _layout_and_arrays(args.item)
        futures = await self._arrays.async_save(directory, args=ocp.args.StandardSave(arrays))
        futures = list(futures or [])
        futures += await self._layout.async_save(
            directory, args=ocp.args.JsonSave({"format": _FORMAT, "nodes": layout})) or []
        return futures

    def save(self, directory: epath.Path, args: Save) -> None:
        layout, arrays = _layout_and_arrays(args.item)
        self._arrays.save(directory, args=ocp.args.StandardSave(arrays))
        self._layout.save(directory, args=ocp.args.JsonSave({"format": _FORMAT, "nodes": layout}))

    def restore(self, directory: epath.Path, args: Restore | None = None) -> Any:
        del args
        directory = epath.Path(directory)
        if not (directory / _LAYOUT).exists() and not (directory / _CHECKSUMS).exists():
            raise ValueError(f"{directory} is not a checkpoint written by jaxlr.export (it has no "
                             f"{_LAYOUT}).")
        verify_checksums(directory)
        layout = self._layout.restore(directory)
        if not isinstance(layout, dict) or layout.get("format") != _FORMAT:
            raise ValueError(f"{directory} was written by another version of jaxlr.export "
                             f"({layout.get('format') if isinstance(layout, dict) else layout}).")
        arrays = self._arrays.restore(directory, args=ocp.args.StandardRestore())
        return _rebuild(arrays, layout["nodes"])

    def metadata(self, directory: epath.Path) -> Any:
        return self._arrays.metadata(directory)

    def finalize(self, directory: epath.Path) -> None:
        self._arrays.finalize(directory)
        if jax.process_index() == 0:
            write_checksums(directory)

    def close(self) -> None:
        self._arrays.close()
        self._layout.close()


@ocp.args.register_with_handler(TreeCheckpointHandler, for_save=True)
@dataclasses.dataclass
class Save(ocp.args.CheckpointArgs):
    """Saves a tree with jaxlr's nodes (a Linen variable dict, an NNX ``State`` or module).

    Attributes:
      item: the tree.
    """

    item: Any


@ocp.args.register_with_handler(TreeCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class Restore(ocp.args.CheckpointArgs):
    """Restores a tree saved with :class:`Save`, its nodes rebuilt; needs no target."""


def save(directory: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
    """Writes ``tree`` to ``directory`` (module documentation).

    Args:
      directory: where the checkpoint goes; must not exist unless ``force``.
      tree: a Linen variable dict (or its ``params``), an NNX ``State`` or an NNX module, with
        :class:`~jaxlr.nodes.LowRank` and :class:`~jaxlr.nodes.Product` nodes anywhere.
      force: overwrite an existing checkpoint.

    Raises:
      TypeError: if the tree holds containers other than dicts.
      FileExistsError: if ``directory`` exists and not ``force``.
    """
    if not isinstance(force, bool):
        raise TypeError(f"force must be True or False, got {force!r}.")
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not force:
        raise FileExistsError(f"{directory} exists; pass force=True to overwrite it.")
    _layout_and_arrays(tree)  # refuses an unsupported tree before anything is written
    with ocp.Checkpointer(TreeCheckpointHandler()) as checkpointer:
        checkpointer.save(directory, args=Save(tree), force=force)


def load(directory: str | os.PathLike) -> Any:
    """Reads a checkpoint written by :func:`save` and rebuilds its nodes.

    Returns:
      Nested dicts of arrays with :class:`~jaxlr.nodes.LowRank` and
      :class:`~jaxlr.nodes.Product` nodes where they were saved.

    Raises:
      FileNotFoundError: if ``directory`` holds no checkpoint.
      ValueError: if the checkpoint was not written by :func:`save`.
      CheckpointCorruptedError: naming a file that is missing, truncated or altered.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint at {directory}.")
    with ocp.Checkpointer(TreeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(directory, args=Restore())

