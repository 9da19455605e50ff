"""Smoke test of the benchmark module on a tiny network (its figures live in BENCHMARKS.md)."""

import numpy as np

from experiments.benchmarks import svd_projection


def test_shapes_of_the_benchmarked_networks():
    vgg = svd_projection.vgg16_conv_shapes()
    resnet = svd_projection.resnet56_conv_shapes()
    assert len(vgg) == 13 and vgg["Conv_12"] == (3, 3, 512, 512)
    # ResNet-56: 1 + 3 stages x 9 blocks x 2 convolutions; option-A shortcuts add none.
    assert len(resnet) == 55 and resnet["stage2_block8/conv2"] == (3, 3, 64, 64)


def test_bench_tree_runs_and_every_method_is_accurate():
    shapes = {"Conv_0": (3, 3, 3, 8), "block/conv1": (3, 3, 8, 16)}
    tree = svd_projection.make_tree(shapes, "projected", ratio=0.5)
    row = svd_projection.bench_tree("tiny", tree, ratio=0.5, repeats=1)
    assert row["matrices"] == 2 and 0 <= row["gram_accepted"] <= 2
    for method in ("auto", "gram", "svd"):
        assert row[f"jaxlr_{method}_max_rel_error"] < 1e-4
    assert row["numpy_max_rel_error"] < 1e-5
    if "torch_reference_s" in row:
        assert row["torch_reference_max_rel_error"] < 1e-4
    # The "projected" weights are rank r plus 5% noise, as documented.
    kernel = np.asarray(tree["block"]["conv1"]["kernel"]).reshape(72, 16)
    s = np.linalg.svd(kernel, compute_uv=False)
    assert s[8] < 0.2 * s[7]
