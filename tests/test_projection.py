"""Tests of jaxlr.projection (LRPET) against numpy references of its formulas."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlr
from jaxlr import ProjectionOptions, lorita, low_rank_projection, project


def np_project(matrix, rank, energy_transfer):
    u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    kept = s[:rank] * (np.sqrt(np.sum(s**2) / np.sum(s[:rank] ** 2)) if energy_transfer else 1)
    return (u[:, :rank] * kept) @ vt[:rank]


def numerical_rank(matrix, tol=1e-4):
    s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
    return int(np.sum(s > tol * s[0]))


class Block(nn.Module):
    """A ResNet basic block with a projection shortcut (conv -> bn pairs by name)."""

    @nn.compact
    def __call__(self, x, train=True):
        y = nn.Conv(8, (3, 3), use_bias=False, name="conv1")(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(y))
        y = nn.Conv(8, (3, 3), use_bias=False, name="conv2")(y)
        y = nn.BatchNorm(use_running_average=not train, name="bn2")(y)
        shortcut = nn.Conv(8, (1, 1), use_bias=False, name="shortcut_conv")(x)
        shortcut = nn.BatchNorm(use_running_average=not train, name="shortcut_bn")(shortcut)
        y = nn.relu(y + shortcut).mean((1, 2))
        return nn.Dense(3, name="head")(y)


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(4, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, rngs=rngs)
        self.shortcut_conv = nnx.Conv(4, 8, (1, 1), use_bias=False, rngs=rngs)
        self.shortcut_bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = nnx.relu(y + self.shortcut_bn(self.shortcut_conv(x))).mean((1, 2))
        return self.head(y)


X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 6, 4)), jnp.float32)
Y = jnp.asarray([0, 1, 2, 1])


def block_variables(seed=0):
    variables = Block().init(jax.random.key(seed), X)
    # Non-trivial BatchNorm statistics and scales, so that rectification matters.
    rng = np.random.default_rng(seed)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: (jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype)
                      if jaxlr.matrices.path_names(p)[-1] in ("var", "scale") else v),
        variables,
    )
    return variables


# What jaxlr.find_bn_pairs finds in Block (tested in tests/test_batchnorm.py).
PAIRS = {"conv1/kernel": "bn1", "conv2/kernel": "bn2", "shortcut_conv/kernel": "shortcut_bn"}
BNR = ProjectionOptions(bn_pairs=PAIRS)


def bn_reference(kernel, gamma, var, rank, energy_transfer, eps=1e-5):
    """Paper eq. 16 in numpy: fold a = gamma / sqrt(var + eps), project, unfold regularised."""
    a = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    matrix = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    projected = np_project(matrix * a, rank, energy_transfer)
    return (projected * (a / (a * a + 1e-5))).reshape(kernel.shape)


# ----------------------------------------------------------------------------------------------
# The transformation.


@pytest.mark.parametrize("energy_transfer", [False, True])
def test_projection_step_gives_rank_r_and_keeps_the_norm(energy_transfer):
    params = block_variables()["params"]
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
    options = ProjectionOptions(energy_transfer=energy_transfer)
    tx = optax.chain(optax.sgd(0.1), low_rank_projection(prune=0.5, every=1, options=options))
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    stepped = optax.apply_updates(params, jax.tree.map(lambda g: -0.1 * g, grads))
    for name, n in (("conv1", 36), ("conv2", 72), ("shortcut_conv", 4)):
        kernel = np.asarray(new[name]["kernel"]).reshape(n, 8)
        before = np.asarray(stepped[name]["kernel"]).reshape(n, 8)
        rank = max(1, int(min(n, 8) - min(n, 8) * 0.5))
        assert numerical_rank(kernel) <= rank
        np.testing.assert_allclose(kernel, np_project(before, rank, energy_transfer), atol=1e-5)
        if energy_transfer:
            assert np.linalg.norm(kernel) == pytest.approx(np.linalg.norm(before), rel=1e-5)
    # The classifier is not projected: its update is the plain SGD step, bit for bit.
    np.testing.assert_array_equal(np.asarray(updates["head"]["kernel"]),
                                  np.asarray(-0.1 * grads["head"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(new["head"]["kernel"]),
                                  np.asarray(stepped["head"]["kernel"]))


def test_other_steps_are_bit_identical_to_the_inner_optimizer_and_compile_once():
    params = block_variables()["params"]
    inner = optax.sgd(0.05, momentum=0.9)
    tx = optax.chain(inner, low_rank_projection(prune=0.6, every=3))
    traces = 0

    @jax.jit
    def step(params, state, inner_state, grads):
        nonlocal traces
        traces += 1
        updates, state = tx.update(grads, state, params)
        inner_updates, inner_state = inner.update(grads, inner_state, params)
        return updates, state, inner_updates, inner_state

    state, inner_state = tx.init(params), inner.init(params)
    rng = np.random.default_rng(1)
    for number in range(1, 8):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        updates, state, inner_updates, inner_state = step(params, state, inner_state, grads)
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(updates), jax.tree.leaves(inner_updates), strict=True))
        assert same == (number % 3 != 0), number
        params = optax.apply_updates(params, updates)
    assert traces == 1


def test_steps_that_do_not_project_put_no_conditional_around_the_update_tree():
    """The compiled update runs the projection in a loop that keeps its carry in place; no
    ``conditional`` (whose branches write the whole update tree to buffers of their own on every
    step) returns a kernel. Read from the compiled HLO of the step, with BN rectification."""
    import re

    variables = block_variables()
    params, stats = variables["params"], variables["batch_stats"]
    pairs = {"conv1/kernel": "bn1", "conv2/kernel": "bn2", "shortcut_conv/kernel": "shortcut_bn"}
    tx = optax.with_extra_args_support(optax.chain(
        optax.sgd(0.1, momentum=0.9),
        low_rank_projection(prune=0.5, every=4, options=ProjectionOptions(bn_pairs=pairs))))
    state = tx.init(params)
    hlo = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch_stats=b)).lower(
        params, state, params, stats).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    kernel = re.compile(r"f32\[3,3,(3|8),8\]")
    results = [line.split("=", 1)[1].split(" conditional(")[0] for line in entry.splitlines()
               if " conditional(" in line]
    assert not [r for r in results if kernel.search(r)], results
    assert re.search(r" while\(", entry)  # the projection, in the entry computation


def test_a_batched_counter_projects_only_the_members_that_are_due():
    params = block_variables()["params"]
    tx = optax.chain(optax.sgd(0.1), low_rank_projection(prune=0.5, every=3))
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    # Two copies of the run: one at its first update (not due), one at its third (due).
    counts = jnp.asarray([0, 2], jnp.int32)
    bgrads, bstate, bparams = jax.tree.map(lambda x: jnp.stack([x, x]), (grads, state, params))
    bstate = (bstate[0], bstate[1]._replace(count=counts))
    out, _ = jax.vmap(tx.update)(bgrads, bstate, bparams)
    for member, count in enumerate([0, 2]):
        one = state[1]._replace(count=jnp.asarray(count, jnp.int32))
        expected, _ = jax.jit(tx.update)(grads, (state[0], one), params)
        for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(np.asarray(got[member]), np.asarray(want), atol=1e-6)
    kernel = np.asarray(params["conv1"]["kernel"] + out["conv1"]["kernel"][1]).reshape(-1, 8)
    assert numerical_rank(kernel) == 4  # the member that was due, projected
    np.testing.assert_array_equal(np.asarray(out["conv1"]["kernel"][0]), np.float32(-0.1))  # not


def test_start_and_end_bound_the_projection_steps():
    params = {"conv": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((3, 3, 2, 4)),
                                             jnp.float32)}}
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = low_rank_projection(prune=0.5, every=2, start=3, end=6, check_placement=False)
    state = tx.init(params)
    projected_at = []
    for number in range(1, 10):
        updates, state = tx.update(zero, state, params)
        if np.any(np.asarray(updates["conv"]["kernel"]) != 0):
            projected_at.append(number)
    assert projected_at == [3, 5]


def test_the_wrapper_equals_the_last_in_chain_form():
    params = block_variables()["params"]
    inner = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    wrapped = jaxlr.with_low_rank_projection(inner, prune=0.5, every=2, options=BNR)
    chained = optax.chain(inner, low_rank_projection(prune=0.5, every=2, options=BNR))
    stats = block_variables()["batch_stats"]
    a, b = (params, wrapped.init(params)), (params, chained.init(params))
    rng = np.random.default_rng(3)
    for _ in range(4):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        ua, sa = wrapped.update(grads, a[1], a[0], batch_stats=stats)
        ub, sb = chained.update(grads, b[1], b[0], batch_stats=stats)
        a, b = (optax.apply_updates(a[0], ua), sa), (optax.apply_updates(b[0], ub), sb)
        for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(TypeError, match="optimizer must be an optax GradientTransformation"):
        jaxlr.with_low_rank_projection(lambda g: g, prune=0.5)


# ----------------------------------------------------------------------------------------------
# Schedules: traced ranks through a mask.


def test_a_schedule_of_the_kept_fraction_ramps_the_rank_down_and_compiles_once():
    params = {"conv": {"kernel": jnp.asarray(
        np.random.default_rng(4).standard_normal((3, 3, 4, 16)), jnp.float32)}}
    zero = jax.tree.map(jnp.zeros_like, params)
    schedule = optax.linear_schedule(1.0, 0.25, transition_steps=3)  # 1, .75, .5, .25, .25
    tx = low_rank_projection(keep=schedule, every=1, check_placement=False)
    traces = 0

    @jax.jit
    def step(state):
        nonlocal traces
        traces += 1
        return tx.update(zero, state, params)

    state = tx.init(params)
    matrix = np.asarray(params["conv"]["kernel"]).reshape(36, 16)
    for count, kept in enumerate((1.0, 0.75, 0.5, 0.25, 0.25)):
        updates, state = step(state)
        new = np.asarray(optax.apply_updates(params, updates)["conv"]["kernel"]).reshape(36, 16)
        rank = max(1, int(16 * kept))
        assert numerical_rank(new) == rank, count
        np.testing.assert_allclose(new, np_project(matrix, rank, True), atol=2e-5)
    assert traces == 1


def test_inject_hyperparams_makes_the_pruned_fraction_a_hyperparameter():
    params = block_variables()["params"]
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = optax.inject_hyperparams(low_rank_projection)(prune=0.5, check_placement=False)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for prune in (0.5, 0.75, 0.25):
        state.hyperparams["prune"] = jnp.asarray(prune)
        updates, state = step(zero, state, params)
        new = optax.apply_updates(params, updates)
        static = project(params, prune=prune)  # the static path, same rule
        for name, n in (("conv1", 36), ("conv2", 72)):
            kernel = np.asarray(new[name]["kernel"]).reshape(n, 8)
            assert numerical_rank(kernel) == max(1, int(8 - 8 * prune))
            np.testing.assert_allclose(kernel, np.asarray(static[name]["kernel"]).reshape(n, 8),
                                       atol=2e-5)
    assert step._cache_size() == 1


# ----------------------------------------------------------------------------------------------
# BN rectification.


def test_bn_rectification_matches_eq_16_on_a_hand_built_conv_bn_tree():
    rng = np.random.default_rng(2)
    kernel = rng.standard_normal((3, 3, 2, 5)).astype(np.float32)
    gamma = rng.uniform(0.2, 3.0, 5).astype(np.float32)
    var = rng.uniform(0.1, 4.0, 5).astype(np.float32)
    params = {"Conv_0": {"kernel": jnp.asarray(kernel)},
              "BatchNorm_0": {"scale": jnp.asarray(gamma), "bias": jnp.zeros(5)}}
    stats = {"BatchNorm_0": {"mean": jnp.zeros(5), "var": jnp.asarray(var)}}
    for energy_transfer in (False, True):
        options = ProjectionOptions(energy_transfer=energy_transfer,
                                    bn_pairs={("Conv_0", "kernel"): "BatchNorm_0"})
        out = project(params, {"Conv_0/kernel": 2}, batch_stats=stats, options=options)
        np.testing.assert_allclose(np.asarray(out["Conv_0"]["kernel"]),
                                   bn_reference(kernel, gamma, var, 2, energy_transfer),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(out["BatchNorm_0"]["scale"]), gamma)


def test_bn_rectification_on_linen_and_nnx_resnet_blocks():
    variables = block_variables()
    params, stats = variables["params"], variables["batch_stats"]
    out = project(params, prune=0.5, batch_stats=stats, options=BNR)
    # The whole variables dict works the same: its batch_stats are used.
    whole = project(variables, prune=0.5, options=BNR)
    for conv in ("conv1", "conv2", "shortcut_conv"):
        bn = PAIRS[f"{conv}/kernel"]
        kernel = np.asarray(params[conv]["kernel"])
        rank = max(1, int(min(kernel.size // 8, 8) * 0.5))
        expected = bn_reference(kernel, params[bn]["scale"], stats[bn]["var"], rank, True)
        np.testing.assert_allclose(np.asarray(out[conv]["kernel"]), expected, rtol=1e-4,
                                   atol=1e-5)
        np.testing.assert_array_equal(np.asarray(whole["params"][conv]["kernel"]),
                                      np.asarray(out[conv]["kernel"]))

    # The NNX block with the same numbers gives the same kernels.
    model = NNXBlock(nnx.Rngs(0))
    linen = {"/".join(jaxlr.matrices.path_names(p)): v
             for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}

    def from_linen(collection):
        return lambda p, v: linen["/".join((collection, *jaxlr.matrices.path_names(p)))]

    nnx_params = jax.tree_util.tree_map_with_path(from_linen("params"),
                                                  nnx.state(model, nnx.Param))
    nnx_stats = jax.tree_util.tree_map_with_path(from_linen("batch_stats"),
                                                 nnx.state(model, nnx.BatchStat))
    nnx_out = project(nnx_params, prune=0.5, batch_stats=nnx_stats, options=BNR)
    for conv in ("conv1", "conv2", "shortcut_conv"):
        np.testing.assert_array_equal(np.asarray(nnx_out[conv]["kernel"]),
                                      np.asarray(out[conv]["kernel"]))


# ----------------------------------------------------------------------------------------------
# Training a tiny ResNet block under each variant, and composition with optax.


@pytest.mark.parametrize("energy_transfer, bn_rectification",
                         [(False, False), (True, False), (False, True), (True, True)],
                         ids=["LRP", "LRP+ET", "LRP+BNR", "LRPET"])
def test_tiny_resnet_trains_under_each_variant_and_ends_at_rank_r(energy_transfer,
                                                                  bn_rectification):
    variables = block_variables()
    params, stats = variables["params"], variables["batch_stats"]
    options = ProjectionOptions(energy_transfer=energy_transfer,
                                bn_pairs=PAIRS if bn_rectification else None)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9),
                     low_rank_projection(prune=0.5, every=2, options=options))
    state = tx.init(params)

    @jax.jit
    def step(params, stats, state):
        def loss_fn(params):
            logits, updated = Block().apply({"params": params, "batch_stats": stats}, X,
                                            mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()
            return loss, updated["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = tx.update(grads, state, params, batch_stats=stats)
        return optax.apply_updates(params, updates), stats, state, loss

    losses = []
    for _ in range(6):
        params, stats, state, loss = step(params, stats, state)
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    final = project(params, prune=0.5, batch_stats=stats, options=options)
    for name, n in (("conv1", 36), ("conv2", 72), ("shortcut_conv", 4)):
        assert numerical_rank(np.asarray(final[name]["kernel"]).reshape(n, 8)) <= min(n, 8) // 2


def test_composes_with_multisteps_inject_hyperparams_and_masked():
    params = block_variables()["params"]
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
    inner = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                        low_rank_projection(prune=0.5, every=1))
    tx = optax.MultiSteps(inner, every_k_schedule=2)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)  # accumulating: no step, no projection
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert numerical_rank(np.asarray(new["conv2"]["kernel"]).reshape(72, 8)) <= 4

    only_conv1 = optax.masked(
        low_rank_projection(prune=0.5),
        lambda p: jax.tree_util.tree_map_with_path(
            lambda path, _: jaxlr.matrices.path_names(path)[0] == "conv1", p),
    )
    masked = optax.chain(optax.sgd(0.1), only_conv1)
    updates, _ = masked.update(grads, masked.init(params), params)
    new = optax.apply_updates(params, updates)
    assert numerical_rank(np.asarray(new["conv1"]["kernel"]).reshape(36, 8)) <= 4
    assert numerical_rank(np.asarray(new["conv2"]["kernel"]).reshape(72, 8)) == 8


# ----------------------------------------------------------------------------------------------
# Placement, NaN, soft projection.


def test_a_projection_followed_by_another_transformation_is_detected_at_the_next_step():
    params = block_variables()["params"]
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)

    def run(check, steps, jit):
        tx = optax.chain(low_rank_projection(prune=0.5, check_placement=check),
                         optax.sgd(0.1, momentum=0.9))
        update = jax.jit(tx.update) if jit else tx.update
        p, state = params, tx.init(params)
        for _ in range(steps):
            updates, state = update(grads, state, p)
            p = optax.apply_updates(p, updates)
        return jax.block_until_ready(state[0])

    with pytest.raises(ValueError, match="low_rank_projection is not the last transformation"):
        run(True, 2, jit=False)  # outside jit: at once
    assert int(run(True, 3, jit=True).misplaced) == 2  # inside jit: counted at every step after
    with pytest.raises(Exception, match="low_rank_projection is not the last transformation"):
        run("raise", 2, jit=True)  # through a host callback
    assert int(run(False, 3, jit=True).misplaced) == 0
    # Asking twice for the updates of the same params (not applying them) is no misplacement.
    placed = optax.chain(optax.sgd(0.1), low_rank_projection(prune=0.5))
    state = placed.init(params)
    _, state = placed.update(grads, state, params)
    updates, state = placed.update(grads, state, params)
    assert int(state[1].misplaced) == 0
    assert numerical_rank(np.asarray(optax.apply_updates(params, updates)["conv1"]["kernel"])
                          .reshape(36, 8)) <= 4
    with pytest.raises(TypeError, match="check_placement must be True, False or 'raise'"):
        low_rank_projection(prune=0.5, check_placement="yes")


def test_matrices_holding_nan_are_left_alone_and_counted_in_the_state():
    params = block_variables()["params"]
    params["conv2"]["kernel"] = params["conv2"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
    tx = low_rank_projection(prune=0.5, check_placement=False)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, state = jax.jit(tx.update)(zero, tx.init(params), params)
    assert int(state.nonfinite) == 1
    new = optax.apply_updates(params, updates)
    assert numerical_rank(np.asarray(new["conv1"]["kernel"]).reshape(36, 8)) <= 4
    nan = np.isnan(np.asarray(new["conv2"]["kernel"]))
    assert nan.sum() == 1 and np.array_equal(
        np.asarray(new["conv2"]["kernel"])[~nan], np.asarray(params["conv2"]["kernel"])[~nan])


def test_soft_projection_in_the_transformation_scales_the_tail():
    params = block_variables()["params"]
    zero = jax.tree.map(jnp.zeros_like, params)
    options = ProjectionOptions(tail_scale=0.3, energy_transfer=False)
    updates, _ = low_rank_projection(prune=0.5, options=options).update(
        zero, low_rank_projection(prune=0.5, options=options).init(params), params)
    new = np.asarray(optax.apply_updates(params, updates)["conv2"]["kernel"]).reshape(72, 8)
    u, s, vt = np.linalg.svd(np.asarray(params["conv2"]["kernel"], np.float64).reshape(72, 8),
                             full_matrices=False)
    expected = (u * np.concatenate([s[:4], 0.3 * s[4:]])) @ vt
    np.testing.assert_allclose(new, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_is_rejected_with_the_allowed_values():
    params = block_variables()["params"]
    grads = jax.tree.map(jnp.zeros_like, params)
    with pytest.raises(ValueError, match=r"prune must lie in \[0, 1\), got 1.0"):
        low_rank_projection(prune=1.0)
    with pytest.raises(ValueError, match="exactly one of prune"):
        low_rank_projection()
    with pytest.raises(ValueError, match="every must be an int >= 1, got 0"):
        low_rank_projection(prune=0.5, every=0)
    with pytest.raises(TypeError, match="every must be an int"):
        low_rank_projection(prune=0.5, every=True)
    with pytest.raises(ValueError, match="end must be an int >= start"):
        low_rank_projection(prune=0.5, every=4, end=2)
    with pytest.raises(TypeError, match="options must be a jaxlr.ProjectionOptions"):
        low_rank_projection(prune=0.5, options={"energy_transfer": False})
    tx = low_rank_projection(prune=0.5)
    with pytest.raises(ValueError, match="needs params: put it last"):
        tx.update(grads, tx.init(params))
    tx = low_rank_projection(ranks={"conv1/kernel": 9, "conv2/kernel": 2,
                                    "shortcut_conv/kernel": 1})
    with pytest.raises(ValueError, match=r"rank for 'conv1/kernel' is 9; .* = 8"):
        tx.update(grads, tx.init(params), params)
    tx = low_rank_projection(prune=0.5, options=BNR)
    with pytest.raises(ValueError, match="needs the BatchNorm statistics"):
        tx.update(grads, tx.init(params), params)
    stats = block_variables()["batch_stats"]
    tx = low_rank_projection(prune=0.5, options=ProjectionOptions(
        bn_pairs={"conv1/kernel": "bn9"}))
    with pytest.raises(ValueError, match="pairs 'conv1/kernel' with the BatchNorm 'bn9'"):
        tx.update(grads, tx.init(params), params, batch_stats=stats)
    tx = low_rank_projection(prune=0.5, options=ProjectionOptions(
        bn_pairs={"conv_1/kernel": "bn1"}))
    with pytest.raises(ValueError, match=r"bn_pairs name kernels that are not in the params: "
                                         r"\['conv_1/kernel'\]"):
        tx.init(params)
    with pytest.raises(ValueError, match="LoRITa-factorized tree"):
        project(lorita.factorize(params, 2, jax.random.key(0)), prune=0.5)
    with pytest.raises(TypeError, match="bn_pairs must be a mapping"):
        ProjectionOptions(bn_pairs=[("conv1/kernel", "bn1")])
    with pytest.raises(ValueError, match="bn_epsilon must be a number > 0"):
        ProjectionOptions(bn_epsilon=0.0)
    with pytest.raises(TypeError, match="energy_transfer must be True or False"):
        ProjectionOptions(energy_transfer="False")
    with pytest.raises(ValueError, match="a filter given by name must be"):
        ProjectionOptions(filter="convs")
    with pytest.raises(TypeError, match="schedules belong to low_rank_projection"):
        project(params, prune=optax.linear_schedule(0.1, 0.5, 10))


def test_ranks_as_a_function_of_the_params_and_bfloat16_final_projection():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), block_variables()["params"])

    def ranks(tree):
        return jaxlr.policies.fixed_ranks(tree, 3, filter="conv").with_overrides(
            {"shortcut_conv/kernel": 1})

    out = project(params, ranks)
    assert out["conv2"]["kernel"].dtype == jnp.bfloat16
    s = np.linalg.svd(np.asarray(out["conv2"]["kernel"], np.float64).reshape(72, 8),
                      compute_uv=False)
    # Rank 3 up to bfloat16's rounding of the entries (2^-8 relative).
    assert s[3] <= 1e-2 * s[0]
    s = np.linalg.svd(np.asarray(out["shortcut_conv"]["kernel"], np.float64).reshape(4, 8),
                      compute_uv=False)
    assert s[1] <= 1e-2 * s[0]


def count_compiles(run, calls):
    """How many XLA compilations ``calls`` repeated calls of ``run`` take (jax.log_compiles)."""
    messages = []

    class Recorder(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Recorder(level=logging.WARNING)
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            for _ in range(calls):
                run()
    finally:
        logger.removeHandler(handler)
    return sum("Finished XLA compilation" in m for m in messages)


def test_eager_updates_compile_once_per_structure_and_options():
    params = block_variables()["params"]
    stats = block_variables()["batch_stats"]
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
    tx = optax.chain(optax.sgd(0.1), low_rank_projection(prune=0.5, every=2, options=BNR))
    box = {"params": params, "state": tx.init(params)}

    def step():
        updates, box["state"] = tx.update(grads, box["state"], box["params"], batch_stats=stats)
        box["params"] = jax.block_until_ready(optax.apply_updates(box["params"], updates))

    assert count_compiles(step, 2) > 0  # the first calls compile (projection and pass-through)
    assert count_compiles(step, 6) == 0  # projecting or not, eager calls reuse the compilation
    assert numerical_rank(np.asarray(box["params"]["conv2"]["kernel"]).reshape(72, 8)) <= 4
    # The one-off projection too, after its first call.
    project(params, prune=0.5, batch_stats=stats, options=BNR)
    assert count_compiles(lambda: project(params, prune=0.5, batch_stats=stats, options=BNR), 3) \
        == 0


def test_attention_output_projections_are_not_projected_whatever_the_module_is_called():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), name="conv")(x)
            tokens = x.reshape(x.shape[0], -1, 8)
            tokens = nn.MultiHeadDotProductAttention(2, name="mha")(tokens, tokens)
            return nn.Dense(3, name="head")(tokens.mean(1))

    params = Net().init(jax.random.key(0), X)["params"]
    out = project(params, prune=0.5, options=ProjectionOptions(filter="conv"))
    assert numerical_rank(np.asarray(out["conv"]["kernel"]).reshape(36, 8)) == 4
    for name in ("query", "key", "value", "out"):  # 3-D kernels, but attention: left alone
        np.testing.assert_array_equal(np.asarray(out["mha"][name]["kernel"]),
                                      np.asarray(params["mha"][name]["kernel"]))


def test_channels_a_batchnorm_silences_are_projected_plainly_not_shrunk():
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((3, 3, 2, 6)).astype(np.float32)
    gamma = np.asarray([1e-4, 1e-4, 1e-4, 2.0, 0.5, 1.0], np.float32)  # three dead channels
    var = np.ones(6, np.float32)
    params = {"conv": {"kernel": jnp.asarray(kernel)}, "bn": {"scale": jnp.asarray(gamma)}}
    stats = {"bn": {"mean": jnp.zeros(6), "var": jnp.asarray(var)}}
    options = ProjectionOptions(bn_pairs={"conv/kernel": "bn"})
    out = np.asarray(project(params, {"conv/kernel": 3}, batch_stats=stats, options=options)
                     ["conv"]["kernel"]).reshape(18, 6)
    # numpy: fold the live channels by a, not the dead ones (a^2 < 1e-5), project with ET,
    # unfold the live ones by a / (a^2 + 1e-5).
    a = gamma.astype(np.float64) / np.sqrt(var + 1e-5)
    live = a * a >= 1e-5
    fold = np.where(live, a, 1.0)
    unfold = np.where(live, a / (a * a + 1e-5), 1.0)
    expected = np_project(kernel.reshape(18, 6) * fold, 3, True) * unfold
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # Every scale near zero: the kernel keeps its norm (eq. 16 alone would leave ~5e-7 of it).
    silent = {"conv": {"kernel": jnp.asarray(kernel)}, "bn": {"scale": jnp.full(6, 1e-6)}}
    out = project(silent, {"conv/kernel": 3}, batch_stats=stats, options=options)
    assert np.linalg.norm(np.asarray(out["conv"]["kernel"])) == pytest.approx(
        np.linalg.norm(kernel), rel=1e-5)


def test_weights_a_step_projected_are_final_and_a_plain_projection_keeps_them():
    params, stats = block_variables()["params"], block_variables()["batch_stats"]
    tx = optax.chain(optax.sgd(0.1), low_rank_projection(prune=0.5, options=BNR))
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params, batch_stats=stats)
    final = optax.apply_updates(params, updates)
    again = project(final, prune=0.5)  # energy transfer of a rank-r matrix changes nothing
    for name in ("conv1", "conv2", "shortcut_conv"):
        np.testing.assert_allclose(np.asarray(again[name]["kernel"]),
                                   np.asarray(final[name]["kernel"]), rtol=1e-4, atol=1e-6)


def test_repeated_eager_projections_of_one_structure_follow_the_values_and_shapes():
    """An eager ``project`` reuses its plan for trees of the same structure, shapes and dtypes;
    every result must still be the projection of the values passed, and a change of shape, rank
    or a filter that reads the values must not reuse a stale plan."""
    rng = np.random.default_rng(3)

    def tree(rows):
        return {"a": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, rows)), jnp.float32)},
                "b": {"kernel": jnp.asarray(rng.standard_normal((rows, 6)), jnp.float32)}}

    for rows, ranks in ((5, {"a/kernel": 2, "b/kernel": 3}), (5, {"a/kernel": 4, "b/kernel": 1}),
                        (7, {"a/kernel": 2, "b/kernel": 3}), (5, {"a/kernel": 2, "b/kernel": 3})):
        for _ in range(2):
            params = tree(rows)
            out = project(params, ranks, options=ProjectionOptions(filter=None))
            for name, view in (("a", (18, rows)), ("b", (rows, 6))):
                matrix = np.asarray(params[name]["kernel"]).reshape(view)
                want = np_project(matrix, ranks[f"{name}/kernel"], energy_transfer=True)
                got = np.asarray(out[name]["kernel"]).reshape(view)
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # prune= over one structure: LSVT ranks floor(n - 0.5 n) of each call's shapes and values
    for rows, rank in ((5, 2), (5, 2), (7, 3), (5, 2)):
        params = tree(rows)
        out = project(params, prune=0.5)  # the default filter: the convolution only
        matrix = np.asarray(params["a"]["kernel"]).reshape(18, rows)
        np.testing.assert_allclose(np.asarray(out["a"]["kernel"]).reshape(18, rows),
                                   np_project(matrix, rank, True), rtol=1e-4, atol=1e-4)
        assert out["b"]["kernel"] is params["b"]["kernel"]

    for _ in range(2):  # bad ranks raise on every call, none is kept
        with pytest.raises(ValueError, match="rank"):
            project(tree(5), {"a/kernel": 6, "b/kernel": 3}, options=ProjectionOptions(filter=None))

    def positive_mean(path, leaf):  # a filter that reads the values: planned on every call
        return leaf.ndim >= 2 and float(jnp.mean(leaf)) > 0

    for sign in (1.0, -1.0, 1.0):
        magnitudes = jnp.abs(jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.float32))
        params = {"v": {"kernel": magnitudes[0]}, "w": {"kernel": sign * magnitudes[1]}}
        out = project(params, prune=0.5, options=ProjectionOptions(filter=positive_mean))
        assert numerical_rank(out["v"]["kernel"]) == 3
        if sign > 0:
            assert numerical_rank(out["w"]["kernel"]) == 3
        else:
            assert out["w"]["kernel"] is params["w"]["kernel"]


def test_the_state_reports_the_ranks_and_kept_fraction_of_the_last_projection():
    """Under jit, with a schedule of keep: the state's ranks are the projected matrices' numerical
    ranks (numpy), its kept fraction their mean over the full ranks, both 0 before the first
    projection; the repr is one line without the sketch."""
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 6)), jnp.float32)}}
    schedule = optax.linear_schedule(1.0, 0.5, 4)  # keep, by update count
    tx = optax.chain(optax.sgd(0.0), low_rank_projection(
        keep=schedule, every=2, options=ProjectionOptions(filter="all")))
    state = tx.init(params)
    assert np.asarray(state[1].ranks).tolist() == [0, 0] and float(state[1].kept) == 0

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        return optax.apply_updates(params, updates), state

    for number in range(1, 5):
        params, state = step(params, state)
        if number % 2:
            continue
        # Projected at updates 2 and 4, with keep read at counts 1 and 3: 0.875 and 0.625.
        keep = 1.0 - 0.125 * (number - 1)
        expected = [max(1, int(np.floor(keep * n + 1e-6))) for n in (10, 6)]
        ranks = [numerical_rank(np.asarray(params["a"]["kernel"])),
                 numerical_rank(np.asarray(params["b"]["kernel"]).reshape(18, 6))]
        assert ranks == expected
        assert np.asarray(state[1].ranks).tolist() == expected
        assert float(state[1].kept) == pytest.approx(np.mean([expected[0] / 10,
                                                              expected[1] / 6]))
    text = repr(state[1])
    assert text.startswith("LowRankProjectionState(count=4, ") and "ranks=[6,3]" in text
    assert "sketch" not in text and "\n" not in text


def test_statistics_of_the_wrong_width_are_blamed_on_batch_stats_a_wrong_pair_on_bn_pairs():
    params = {"Conv_0": {"kernel": jnp.ones((3, 3, 2, 5))},
              "BatchNorm_0": {"scale": jnp.ones(5), "bias": jnp.zeros(5)},
              "BatchNorm_1": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}}
    stats = {"BatchNorm_0": {"mean": jnp.zeros(5), "var": jnp.ones(5)},
             "BatchNorm_1": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
    wrong_stats = {"BatchNorm_0": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
    paired = ProjectionOptions(bn_pairs={("Conv_0", "kernel"): "BatchNorm_0"})
    with pytest.raises(ValueError, match=r"batch_stats holds a running variance 'BatchNorm_0/var'"
                                         r" of shape \(2,\).*have 5 channels"):
        project(params, {"Conv_0/kernel": 2}, batch_stats=wrong_stats, options=paired)
    mispaired = ProjectionOptions(bn_pairs={("Conv_0", "kernel"): "BatchNorm_1"})
    with pytest.raises(ValueError, match=r"bn_pairs pairs the kernel 'Conv_0/kernel' \(5 outputs\)"
                                         r" with the BatchNorm 'BatchNorm_1'"):
        project(params, {"Conv_0/kernel": 2}, batch_stats=stats, options=mispaired)


def test_find_bn_pairs_reports_each_batchnorms_epsilon_and_the_projection_uses_it():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(6, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, epsilon=0.5)(x)
            return nn.Conv(4, (3, 3))(nn.relu(x))

    x = jnp.ones((2, 6, 6, 3))
    model = Net()
    variables = model.init(jax.random.key(0), x)
    pairs = jaxlr.find_bn_pairs(model, variables, x)
    assert pairs == {"Conv_0/kernel": "BatchNorm_0"} and pairs["Conv_0/kernel"].epsilon == 0.5

    class NNXNet(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 6, (3, 3), use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(6, epsilon=0.25, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.conv(x))

    (found,) = jaxlr.find_bn_pairs(NNXNet(nnx.Rngs(0)), x).values()
    assert found == "bn" and found.epsilon == 0.25

    rng = np.random.default_rng(4)
    kernel = rng.standard_normal((3, 3, 3, 6)).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, 6).astype(np.float32)
    var = rng.uniform(0.01, 0.2, 6).astype(np.float32)  # small: epsilon matters
    params = {"Conv_0": {"kernel": jnp.asarray(kernel)},
              "BatchNorm_0": {"scale": jnp.asarray(gamma), "bias": jnp.zeros(6)}}
    stats = {"BatchNorm_0": {"mean": jnp.zeros(6), "var": jnp.asarray(var)}}
    out = project(params, {"Conv_0/kernel": 2}, batch_stats=stats,
                  options=ProjectionOptions(bn_pairs=pairs))
    np.testing.assert_allclose(np.asarray(out["Conv_0"]["kernel"]),
                               bn_reference(kernel, gamma, var, 2, True, eps=0.5),
                               rtol=1e-4, atol=1e-5)
    # A plain path string takes bn_epsilon; options differing only in the epsilon differ.
    plain = ProjectionOptions(bn_pairs={"Conv_0/kernel": "BatchNorm_0"})
    assert plain != ProjectionOptions(bn_pairs=pairs) and hash(plain) != hash(
        ProjectionOptions(bn_pairs=pairs))
    out = project(params, {"Conv_0/kernel": 2}, batch_stats=stats, options=plain)
    np.testing.assert_allclose(np.asarray(out["Conv_0"]["kernel"]),
                               bn_reference(kernel, gamma, var, 2, True),
                               rtol=1e-4, atol=1e-5)
