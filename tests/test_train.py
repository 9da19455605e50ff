"""experiments.train: the shared loop with LoRITa and LRPET plugged in, checkpoints and resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlr
from experiments import data as data_lib
from experiments import models
from experiments.train import (
    Task,
    TrainConfig,
    evaluate,
    lorita_task,
    make_step,
    new_state,
    train,
)
from jaxlr import lorita


@pytest.fixture(scope="module")
def digits():
    return data_lib.load("digits")


def small_cnn():
    return models.VGG(config=(8, "M", 16, "M"))


def lrpet_task(steps_per_epoch):
    model = small_cnn()
    x = jnp.zeros((1, 8, 8, 1))
    pairs = jaxlr.find_bn_pairs(model, jax.eval_shape(model.init, jax.random.key(0), x), x)
    assert pairs == {"conv0/kernel": "bn0", "conv1/kernel": "bn1"}
    return Task(model, jaxlr.with_low_rank_projection(
        optax.sgd(0.05, momentum=0.9), prune=0.5, every=steps_per_epoch,
        options=jaxlr.ProjectionOptions(bn_pairs=pairs)))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class Interrupt(Exception):
    pass


def interrupt_after(epoch):
    def callback(e, record, state):
        if e == epoch:
            raise Interrupt

    return callback


@pytest.mark.parametrize("method", ["lorita", "lrpet"])
def test_resumed_run_ends_as_a_straight_run(tmp_path, digits, method):
    config = TrainConfig(epochs=4, batch_size=128, checkpoint_every=2, progress=False,
                         augmentation=data_lib.Augmentation(pad=1))
    if method == "lorita":
        task = lorita_task(models.FCN(3, 32), lorita.coupled_adam(3e-3, 1e-3), depth=2)
    else:
        task = lrpet_task(len(digits.train) // config.batch_size)
    straight = train(task, digits, config, workdir=tmp_path / "straight")
    # Stop during epoch 3: the last checkpoint is epoch 2's; epoch 3's metrics line is dropped.
    with pytest.raises(Interrupt):
        train(task, digits, config, workdir=tmp_path / "resumed", callbacks=[interrupt_after(3)])
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    resumed = train(task, digits, config, workdir=tmp_path / "resumed")
    assert_trees_equal(resumed.state, straight.state)
    assert_trees_equal(resumed.best, straight.best)
    assert resumed.best_epoch == straight.best_epoch
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in straight.history]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history] == strip
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    if method == "lorita":  # factors are what is trained and checkpointed
        assert isinstance(resumed.state.params["fc0"]["kernel"], jaxlr.Product)


def test_run_interrupted_before_its_first_resumable_checkpoint_starts_again(tmp_path, digits):
    # Best checkpoints of epochs 1-2 are written, the last (resumable) one never: the next call
    # trains from scratch, and the stale best steps must not stop it or be taken as its own.
    config = TrainConfig(epochs=3, batch_size=128, checkpoint_every=3, progress=False)
    task = Task(models.FCN(2, 16), optax.adam(1e-2))
    straight = train(task, digits, config, workdir=tmp_path / "straight")
    with pytest.raises(Interrupt):
        train(task, digits, config, workdir=tmp_path / "resumed", callbacks=[interrupt_after(2)])
    assert list((tmp_path / "resumed" / "checkpoints" / "best").iterdir())
    resumed = train(task, digits, config, workdir=tmp_path / "resumed")
    assert_trees_equal(resumed.state, straight.state)
    assert_trees_equal(resumed.best, straight.best)
    steps = sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints" / "best").iterdir()
                   if p.name.isdigit())
    assert steps == [straight.best_epoch]


def test_runs_are_deterministic(digits):
    config = TrainConfig(epochs=2, batch_size=100, seed=3, progress=False)
    task = Task(models.FCN(2, 16), optax.adam(1e-2))
    assert_trees_equal(train(task, digits, config).state, train(task, digits, config).state)


def test_best_is_the_epoch_with_the_highest_validation_accuracy(tmp_path, digits):
    config = TrainConfig(epochs=5, batch_size=64, progress=False)
    result = train(Task(models.FCN(2, 8), optax.sgd(0.3)), digits, config, workdir=tmp_path)
    accuracies = [r["validation_accuracy"] for r in result.history]
    assert result.best_epoch == int(np.argmax(accuracies)) + 1
    assert result.best_accuracy == max(accuracies)
    model = models.FCN(2, 8)
    assert evaluate(model, result.best, digits)["accuracy"] == max(accuracies)
    assert evaluate(model, result.variables, digits)["accuracy"] == accuracies[-1]
    # The records are the lines of metrics.jsonl; the best checkpoint is that epoch's.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == result.history
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints" / "best").iterdir()
                   if p.name.isdigit())
    assert steps == [result.best_epoch]


def test_lorita_step_updates_the_factors_by_the_chain_rule():
    # W = W1 W2: SGD moves W1 by -lr G W2^T and W2 by -lr W1^T G, G the gradient for W.
    model = models.FCN(2, 6)
    x = jax.random.normal(jax.random.key(0), (5, 3, 3, 1))
    y = jnp.array([0, 1, 2, 3, 4])
    params = model.init(jax.random.key(1), x)["params"]
    task = lorita_task(model, optax.sgd(0.1), depth=2)
    fparams = task.reparameterize(params, jax.random.key(2))
    state = new_state(task, fparams, {})
    new, _, _, _ = make_step(task, jax.random.key(3))(state, x, y)

    def dense_loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(dense_loss)(jaxlr.collapse(fparams))
    w1, w2 = (np.asarray(f, np.float64) for f in fparams["fc0"]["kernel"].factors)
    g = np.asarray(grads["fc0"]["kernel"], np.float64)
    n1, n2 = new.params["fc0"]["kernel"].factors
    np.testing.assert_allclose(n1, w1 - 0.1 * g @ w2.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(n2, w2 - 0.1 * w1.T @ g, rtol=1e-5, atol=1e-6)


def test_lrpet_in_the_chain_leaves_convolutions_of_rank_r(digits):
    config = TrainConfig(epochs=2, batch_size=128, progress=False)
    steps = len(digits.train) // config.batch_size
    result = train(lrpet_task(steps), digits, config)
    for name, (m, n, r) in {"conv0": (9, 8, 4), "conv1": (72, 16, 8)}.items():
        kernel = np.asarray(result.variables["params"][name]["kernel"]).reshape(m, n)
        s = np.linalg.svd(kernel, compute_uv=False)
        assert s[r - 1] > 1e-3 * s[0] and s[r:].max() < 1e-5 * s[0]
    # (BN rectification raises without batch_stats: the step passed them.)


def test_evaluate_matches_numpy_with_a_ragged_last_batch(digits):
    model = models.FCN(2, 16)
    variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    logits = np.asarray(model.apply(variables, digits.normalize(digits.test.images)),
                        np.float64)
    labels = digits.test.labels
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                                keepdims=True)) - logits.max(1, keepdims=True)
    out = evaluate(model, variables, digits, "test", batch_size=100)  # 359 = 3 x 100 + 59
    assert out["accuracy"] == np.mean(logits.argmax(1) == labels)
    np.testing.assert_allclose(out["loss"], -log_probs[np.arange(len(labels)), labels].mean(),
                               rtol=1e-5)


def test_bad_settings_raise_at_construction():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(epochs=1, batch_size=True)
    with pytest.raises(ValueError, match="prng_impl"):
        TrainConfig(epochs=1, prng_impl="philox")
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(epochs=1, parallel="model")
    with pytest.raises(ValueError, match="label_smoothing"):
        Task(models.FCN(), optax.sgd(0.1), label_smoothing=1.0)
    with pytest.raises(ValueError, match="depth"):
        lorita_task(models.FCN(), optax.sgd(0.1), depth=0)


def test_batch_larger_than_the_training_split_raises(digits):
    with pytest.raises(ValueError, match="batch_size 5000"):
        train(Task(models.FCN(2, 4), optax.sgd(0.1)), digits,
              TrainConfig(epochs=1, batch_size=5000, progress=False))


def test_a_workdir_of_other_settings_is_refused(tmp_path, digits):
    config = TrainConfig(epochs=1, batch_size=128, progress=False)
    train(Task(models.FCN(2, 8), optax.sgd(0.1)), digits, config, workdir=tmp_path)
    with pytest.raises(ValueError, match="other settings \\(model, params\\)"):
        train(Task(models.FCN(2, 16), optax.sgd(0.1)), digits, config, workdir=tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        train(Task(models.FCN(2, 8), optax.sgd(0.1)), digits,
              TrainConfig(epochs=1, batch_size=100, progress=False), workdir=tmp_path)
    # What the loop cannot see in the optimizer is told as settings, and must match too.
    with pytest.raises(ValueError, match="other settings \\(settings\\)"):
        train(Task(models.FCN(2, 8), optax.sgd(0.1)), digits, config, workdir=tmp_path,
              settings={"learning_rate": 0.1})
    with pytest.raises(ValueError, match="label_smoothing"):
        train(Task(models.FCN(2, 8), optax.sgd(0.1), label_smoothing=0.1), digits, config,
              workdir=tmp_path)
    with pytest.raises(TypeError, match="settings must hold JSON values"):
        train(Task(models.FCN(2, 8), optax.sgd(0.1)), digits, config, workdir=tmp_path,
              settings={"optimizer": optax.sgd(0.1)})
    # Asking for more epochs continues the saved run.
    more = train(Task(models.FCN(2, 8), optax.sgd(0.1)), digits,
                 TrainConfig(epochs=2, batch_size=128, progress=False), workdir=tmp_path)
    assert [r["epoch"] for r in more.history] == [1, 2]


def test_a_lorita_run_of_another_n_is_refused(tmp_path, digits):
    config = TrainConfig(epochs=1, batch_size=128, progress=False)
    train(lorita_task(models.FCN(2, 8), optax.adam(1e-2), depth=2), digits, config,
          workdir=tmp_path)
    with pytest.raises(ValueError, match="other settings \\(params\\)"):
        train(lorita_task(models.FCN(2, 8), optax.adam(1e-2), depth=3), digits, config,
              workdir=tmp_path)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, digits, damage):
    config = TrainConfig(epochs=1, batch_size=128, progress=False)
    task = Task(models.FCN(2, 8), optax.sgd(0.1))
    train(task, digits, config, workdir=tmp_path)
    step = tmp_path / "checkpoints" / "last" / "1"
    listed = json.loads((step / "jaxlr_checksums.json").read_text())["files"]
    # The largest listed file under the state: array data.
    name = max((n for n in listed if n.startswith("state/")), key=lambda n: listed[n]["size"])
    data = bytearray((step / name).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    (step / name).write_bytes(bytes(data))
    with pytest.raises(jaxlr.export.CheckpointCorruptedError, match=name.split("/")[-1]):
        train(task, digits, config, workdir=tmp_path)
