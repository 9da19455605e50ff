"""Tests of jaxlr.export: checkpoints of Linen trees, NNX states and modules with factor pairs and
LoRITa products, restored typed without a target, in orbax's CheckpointManager too."""

import json
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jaxlr
from jaxlr.nodes import LowRank, Product
from tests import models
from tests.models import IMAGES
from tests.test_inference import quarter_ranks


def assert_same_tree(a, b):
    assert jax.tree.structure(a, is_leaf=jaxlr.nodes.is_node) == jax.tree.structure(
        b, is_leaf=jaxlr.nodes.is_node)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_compressed_linen_tree_comes_back_with_its_pairs_and_without_dense_kernels(tmp_path):
    model, variables = models.linen_variables("vgg")
    result = jaxlr.compress(variables["params"], quarter_ranks(variables["params"]))
    tree = {**variables, "params": result.compressed}
    jaxlr.export.save(tmp_path / "compressed", tree)
    loaded = jaxlr.export.load(tmp_path / "compressed")
    assert_same_tree(loaded, tree)
    assert isinstance(loaded["params"]["conv1"]["kernel"], LowRank)
    np.testing.assert_array_equal(np.asarray(jaxlr.apply(model, loaded, IMAGES)),
                                  np.asarray(jaxlr.apply(model, tree, IMAGES)))
    # The dense kernels of the pairs are not in the checkpoint.
    stored = sum(np.asarray(x).size for x in jax.tree.leaves(loaded))
    assert stored == result.report.params_after + sum(
        np.asarray(x).size for x in jax.tree.leaves(variables["batch_stats"]))
    with pytest.raises(FileExistsError, match="force"):
        jaxlr.export.save(tmp_path / "compressed", tree)
    jaxlr.export.save(tmp_path / "compressed", tree, force=True)


def test_lorita_products_come_back_typed(tmp_path):
    model, variables = models.linen_variables("mlp")
    fparams = jaxlr.factorize(variables["params"], 3, jax.random.key(0))
    jaxlr.export.save(tmp_path / "lorita", fparams)
    loaded = jaxlr.export.load(tmp_path / "lorita")
    assert isinstance(loaded["fc1"]["kernel"], Product) and loaded["fc1"]["kernel"].depth == 3
    assert_same_tree(loaded, fparams)
    np.testing.assert_array_equal(np.asarray(model.apply({"params": loaded}, IMAGES)),
                                  np.asarray(model.apply({"params": fparams}, IMAGES)))


def test_nnx_states_and_modules(tmp_path):
    model = models.nnx_model("vgg")
    jaxlr.export.save(tmp_path / "state", nnx.state(model))
    loaded = jaxlr.export.load(tmp_path / "state")
    assert_same_tree(loaded, nnx.to_pure_dict(nnx.state(model)))

    # A module holding products (LoRITa) and one holding factor pairs (compressed).
    factorized = jaxlr.factorize(model, 2, jax.random.key(0), filter=jaxlr.kernel_filter(
        exclude="head"))
    jaxlr.export.save(tmp_path / "factorized", factorized)
    restored = jaxlr.inference.nnx_model(models.NNX["vgg"](nnx.Rngs(9)),
                               jaxlr.export.load(tmp_path / "factorized"))
    assert isinstance(restored.conv0.kernel, Product)
    np.testing.assert_array_equal(np.asarray(restored(IMAGES)), np.asarray(factorized(IMAGES)))

    small = jaxlr.compress(model, quarter_ranks(nnx.state(model, nnx.Param))).compressed
    jaxlr.export.save(tmp_path / "small", small)
    loaded = jaxlr.export.load(tmp_path / "small")
    assert isinstance(loaded["conv1"]["kernel"], LowRank)
    restored = jaxlr.inference.nnx_model(models.NNX["vgg"](nnx.Rngs(9)), loaded)
    assert isinstance(restored.conv1, jaxlr.inference.LowRankLayer)
    np.testing.assert_array_equal(np.asarray(restored(IMAGES)), np.asarray(small(IMAGES)))


def test_checkpoint_manager_keeps_steps_and_restores_typed_nodes(tmp_path):
    _, variables = models.linen_variables("mlp")
    fparams = jaxlr.factorize(variables["params"], 2, jax.random.key(0))
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        for step in (1, 2, 3):
            scaled = jax.tree.map(lambda x, s=step: x * s, fparams)
            manager.save(step, args=jaxlr.export.Save(scaled))
        assert manager.all_steps() == [2, 3]
        restored = manager.restore(3, args=jaxlr.export.Restore())
        assert isinstance(restored["fc1"]["kernel"], Product)
        assert_same_tree(restored, jax.tree.map(lambda x: x * 3, fparams))
    # Beside other items of a composite checkpoint.
    with ocp.CheckpointManager(tmp_path / "composite", options=options) as manager:
        manager.save(4, args=ocp.args.Composite(params=jaxlr.export.Save(fparams),
                                                meta=ocp.args.JsonSave({"epoch": 4})))
        both = manager.restore(4, args=ocp.args.Composite(params=jaxlr.export.Restore(),
                                                          meta=ocp.args.JsonRestore()))
        assert both.meta == {"epoch": 4}
        assert_same_tree(both.params, fparams)


def test_bad_checkpoints_and_trees_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        jaxlr.export.load(tmp_path / "missing")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "plain", {"a": np.ones(2)})
    with pytest.raises(ValueError, match="not a checkpoint written by jaxlr.export"):
        jaxlr.export.load(tmp_path / "plain")
    with pytest.raises(TypeError, match="nested dicts of arrays"):
        jaxlr.export.save(tmp_path / "list", {"layers": [np.ones(2)]})


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_any_damaged_file_is_named_when_loading(tmp_path, damage):
    _, variables = models.linen_variables("mlp")
    small = jaxlr.compress(variables["params"], {"fc1/kernel": 4}).compressed
    tree = {**variables, "params": small}
    directory = tmp_path / "ckpt"
    jaxlr.export.save(directory, tree)
    listed = json.loads((directory / "jaxlr_checksums.json").read_text())["files"]
    assert any(name.startswith(("d/", "ocdbt")) for name in listed)  # the array data is listed
    for name in listed:
        path = directory / name
        original = path.read_bytes()
        if damage == "flip":
            data = bytearray(original)
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
        elif damage == "truncate":
            path.write_bytes(original[: len(original) // 2])
        else:
            path.unlink()
        with pytest.raises(jaxlr.export.CheckpointCorruptedError, match=re.escape(str(path))):
            jaxlr.export.load(directory)
        path.write_bytes(original)
    assert_same_tree(jaxlr.export.load(directory), tree)  # all restored: it loads again
