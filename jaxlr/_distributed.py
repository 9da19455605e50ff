"""The distributed triplet finder: each matrix of a list decomposed by one device of a mesh, inside
``shard_map`` (:mod:`jaxlr.sharding` explains the steps), handed to :mod:`jaxlr._linalg` as an
:class:`~jaxlr._linalg.OnMesh`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxlr import _linalg, sharding

__all__ = ["Spread", "spread_triplets"]


class Spread(NamedTuple):
    """Decompositions spread over a mesh (:mod:`jaxlr.sharding`): the matrices are tall, their
    rows split over every device of ``mesh`` where ``sharded``, each decomposed by the device
    ``owners`` names."""

    mesh: Any
    sharded: tuple[bool, ...]
    owners: tuple[int, ...]

    def pick(self, indices: Sequence[int]) -> Spread:
        """The spread of the matrices at ``indices``."""
        return Spread(self.mesh, tuple(self.sharded[i] for i in indices),
                      tuple(self.owners[i] for i in indices))

    def triplets(self, mats: list[jax.Array], ranks: list[int], method: str,
                 cuts: list[jax.Array] | None) -> list[_linalg.Triplets]:
        """:func:`spread_triplets` of ``mats`` over this spread."""
        return spread_triplets(mats, ranks, method, cuts, self)



def _r_factor(x: jax.Array) -> jax.Array:
    """A matrix with ``x``'s Gram matrix and at most ``cols`` rows: ``x`` if it has no more rows
    than columns, else the triangular factor of its QR decomposition."""
    return jnp.linalg.qr(x, mode="r") if x.shape[0] > x.shape[1] else x


def _reduce_to_owner(block: jax.Array, owner: int, axes: tuple[str, ...], devices: int,
                     me: jax.Array) -> jax.Array:
    """Inside ``shard_map``: on device ``owner``, a matrix of at most ``n`` rows whose Gram
    matrix is the sum of every device's ``block^T block`` (a tall-skinny QR reduced along a
    binary tree: each device sends one ``n x n`` factor at most once, point to point, and only
    the devices that receive one factorize); elsewhere a buffer of that shape."""
    local = _r_factor(block)
    relative = (me - owner) % devices
    step = 1
    while step < devices:
        pairs = [((owner + rel + step) % devices, (owner + rel) % devices)
                 for rel in range(0, devices, 2 * step) if rel + step < devices]
        received = lax.ppermute(local, axes, perm=pairs)
        stacked = jnp.concatenate([local, received], axis=0)
        receives = (relative % (2 * step) == 0) & (relative + step < devices)
        rows = min(stacked.shape[0], stacked.shape[1])
        local = lax.cond(receives, _r_factor, lambda x, rows=rows: x[:rows], stacked) \
            if stacked.shape[0] > stacked.shape[1] else stacked
        step *= 2
    return local


class _OneMatrix(NamedTuple):
    """What one device knows of one matrix inside ``shard_map``."""

    block: jax.Array  # its rows of the matrix (all of them where ``split`` is false)
    rank: int
    split: bool  # whether the rows are split over the devices
    owner: int  # the device that decomposes it
    cut: jax.Array | None  # a traced rank, or None
    full: int  # min(m, n)


def _right_vectors(one: _OneMatrix, method: str, axes: tuple[str, ...], devices: int,
                   me: jax.Array) -> jax.Array:
    """Inside ``shard_map``: the top-``rank`` right singular vectors of one matrix, found by its
    owner and summed onto every device (the others contribute zeros)."""
    w, rank, mine = one.block, one.rank, me == one.owner
    n = w.shape[1]

    def reduce(x: jax.Array) -> jax.Array:
        return lax.psum(x, axes) if one.split else x

    def nothing(*_: Any) -> tuple[jax.Array, jax.Array]:
        return jnp.zeros((n, rank), w.dtype), jnp.zeros((), w.dtype)

    norm = jnp.sqrt(reduce(jnp.sum(jnp.square(w))))

    def by_gram(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
        return _linalg.subspace_of_gram(gram, norm, rank, one.cut, one.full)

    def by_svd() -> jax.Array:
        # The right singular vectors of any matrix with W's Gram matrix are W's.
        reduced = _reduce_to_owner(w, one.owner, axes, devices, me) if one.split else w
        v = lax.cond(mine, lambda x: _linalg.top_svd(x, rank)[2].T, lambda x: nothing()[0],
                     reduced)
        return lax.psum(v, axes)

    if method == "svd":
        return by_svd()
    if one.split:  # the sum of the local Gram matrices, decomposed by the owner
        gram = lax.psum(jnp.matmul(w.T, w, precision=_linalg.HIGHEST), axes)
        top, estimate = lax.cond(mine, by_gram, nothing, gram)
    else:  # whole on every device: only the owner forms the Gram matrix
        top, estimate = lax.cond(
            mine, lambda: by_gram(jnp.matmul(w.T, w, precision=_linalg.HIGHEST)), nothing)
    top, estimate = lax.psum(top, axes), lax.psum(estimate, axes)
    if method == "gram":
        return top
    # auto: the estimate is the same on every device, so all take the same branch.
    return lax.cond(estimate <= _linalg.GRAM_TOLERANCE, lambda: top, by_svd)


def spread_triplets(
    mats: list[jax.Array],
    ranks: list[int],
    method: str,
    cuts: list[jax.Array] | None,
    spread: Spread,
) -> list[_linalg.Triplets]:
    """:func:`jaxlr._linalg.top_triplets` of tall matrices, each decomposed by one device of the
    mesh (see :mod:`jaxlr.sharding`); ``u`` keeps the rows' split, ``s`` and ``vt`` are on every
    device."""
    mesh = sharding.in_context(spread.mesh)
    axes = tuple(mesh.axis_names)
    rows, replicated = P(axes, None), P()

    def body(blocks: list[jax.Array], local_cuts: list[jax.Array]) -> list[_linalg.Triplets]:
        me = lax.axis_index(axes)
        out = []
        for i, w in enumerate(blocks):
            one = _OneMatrix(w, ranks[i], spread.sharded[i], spread.owners[i],
                             local_cuts[i] if cuts is not None else None, min(mats[i].shape))
            top = _right_vectors(one, method, axes, mesh.size, me)
            scaled = jnp.matmul(w, top, precision=_linalg.HIGHEST)  # this device's rows of U_r S_r
            s = jnp.sum(jnp.square(scaled), axis=0)
            s = jnp.sqrt(lax.psum(s, axes) if one.split else s)
            out.append((scaled / jnp.where(s > 0, s, 1), s, top.T))
        return out

    in_specs = ([rows if split else replicated for split in spread.sharded],
                [replicated] * (len(cuts) if cuts is not None else 0))
    out_specs = [(rows if split else replicated, replicated, replicated)
                 for split in spread.sharded]
    run = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return run(list(mats), list(cuts) if cuts is not None else [])
