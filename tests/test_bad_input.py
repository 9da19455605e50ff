"""Every public entry point refuses bad input when it is given: the exception's type, and a message
that names the parameter (or the leaf, layer or file) at fault.

One case per line: ``(id, call, exception type, pattern the message must contain)``.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import jaxlr
from jaxlr import lorita, matrices, policies
from jaxlr.matrices import MatrixView
from jaxlr.nodes import LowRank, Product

KEY = jax.random.key(0)
M = jnp.ones((6, 4))
VIEW = MatrixView((0,), (1,))
CONV = MatrixView((0, 1, 2), (3,))


def params():
    return {"conv": {"kernel": jnp.ones((3, 3, 4, 8)) + jnp.eye(8)[:4], "bias": jnp.zeros(8)},
            "bn": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
            "fc": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}


def stats(var=None):
    return {"bn": {"mean": jnp.zeros(8), "var": jnp.ones(8) if var is None else var}}


PAIRS = jaxlr.ProjectionOptions(bn_pairs={"conv/kernel": "bn"})


def update(tx, *, use_params=True, **extra):
    p = params()
    return tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p if use_params else None,
                     **extra)


def mismatched_state():
    tx = jaxlr.low_rank_projection(prune=0.5)
    state = tx.init(params())
    bigger = {**params(), "conv2": {"kernel": jnp.ones((3, 3, 8, 8))}}
    return tx.update(jax.tree.map(jnp.zeros_like, bigger), state, bigger)


def nan_params():
    p = params()
    p["conv"]["kernel"] = p["conv"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
    return p


class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(x)


def linen_state():
    model = Dense()
    variables = model.init(KEY, jnp.ones((1, 8)))
    return jaxlr.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                   tx=optax.sgd(0.1))


CASES = [
    # jaxlr.matrices
    ("include-regex", lambda: jaxlr.kernel_filter(include="["), ValueError, "include"),
    ("exclude-regex", lambda: jaxlr.kernel_filter(exclude="("), ValueError, "exclude"),
    ("include-type", lambda: jaxlr.kernel_filter(include=3), TypeError, "include"),
    ("names-type", lambda: jaxlr.kernel_filter(names=[1]), TypeError, "names"),
    ("kinds-unknown", lambda: jaxlr.kernel_filter(kinds="mlp"), ValueError, "kinds"),
    ("kinds-empty", lambda: jaxlr.kernel_filter(kinds=()), ValueError, "kinds"),
    ("view-preset", lambda: matrices.resolve_view("oihw"), ValueError, "view"),
    ("view-tuple", lambda: matrices.resolve_view((0, 1)), TypeError, "view"),
    ("view-axes", lambda: matrices.resolve_view(MatrixView(("a",), (1,))), TypeError, "view"),
    ("filter-name", lambda: matrices.resolve_filter("convolution"), ValueError, "filter"),
    ("filter-type", lambda: matrices.resolve_filter(3), TypeError, "filter"),
    ("filter-nothing", lambda: jaxlr.selection.matrix_leaves({"b": jnp.zeros(3)},
                                                   filter="all"), ValueError, "filter"),
    ("leaf-int", lambda: jaxlr.selection.matrix_leaves(
        {"q": {"kernel": jnp.zeros((3, 3), jnp.int8)}},
                                             filter="all"),
     TypeError, "q/kernel"),
    ("view-returns", lambda: jaxlr.selection.matrix_leaves(params(), view=lambda p, leaf: "rows",
                                                 filter="all"),
     TypeError, "view"),
    ("view-misfit", lambda: VIEW.check((2, 3, 4)), ValueError, "view"),
    ("view-misfit-tree", lambda: jaxlr.selection.matrix_leaves(params(), view=VIEW,
                                                     filter="all"), ValueError, "view"),
    ("path-type", lambda: matrices.path_key(3), TypeError, "path"),
    ("oihw-default", lambda: jaxlr.selection.matrix_leaves(
        {"c": {"kernel": jnp.ones((16, 3, 3, 3))}},
                                                 filter="all"),
     ValueError, "view='torch'"),
    ("bias-mismatch", lambda: jaxlr.selection.matrix_leaves(
        {"fc": {"kernel": jnp.ones((3, 5)), "bias": jnp.zeros(3)}}, filter="all"),
     ValueError, "view="),
    # jaxlr.nodes
    ("product-chain", lambda: Product((jnp.ones((36, 8)), jnp.ones((4, 8))), (3, 3, 4, 8), CONV),
     ValueError, "factors"),
    ("product-view", lambda: Product((jnp.ones((4, 8)),), (4, 8), (0, 1)), TypeError, "view"),
    ("product-shape", lambda: Product((jnp.ones((4, 8)),), "4x8", VIEW), TypeError, "shape"),
    ("pair-rank", lambda: LowRank(jnp.ones((6, 5)), jnp.ones((5, 4)), (6, 4), VIEW),
     ValueError, "rank"),
    ("pair-chain", lambda: LowRank(jnp.ones((6, 2)), jnp.ones((3, 4)), (6, 4), VIEW),
     ValueError, "factors"),
    ("pair-kernel", lambda: LowRank(jnp.ones((5, 2)), jnp.ones((2, 4)), (6, 4), VIEW),
     ValueError, "kernel"),
    ("saves-rank", lambda: jaxlr.nodes.saves(2.0, 4, 4), TypeError, "rank"),
    ("saves-m", lambda: jaxlr.nodes.saves(2, "4", 4), TypeError, "m"),
    # jaxlr.svd
    ("matrix-1d", lambda: jaxlr.svd.singular_values_matrix(jnp.ones(3)), ValueError, "matrix"),
    ("matrix-int", lambda: jaxlr.svd.singular_values_matrix(jnp.ones((3, 3), jnp.int32)), TypeError,
     "matrix"),
    ("rank-zero", lambda: jaxlr.svd.project_matrix(M, 0), ValueError, "rank"),
    ("rank-big", lambda: jaxlr.svd.project_matrix(M, 5), ValueError, "rank"),
    ("rank-float", lambda: jaxlr.svd.project_matrix(M, 2.0), TypeError, "rank"),
    ("rank-bool", lambda: jaxlr.svd.project_matrix(M, True), TypeError, "rank"),
    ("method", lambda: jaxlr.svd.project_matrix(M, 2, method="qr"), ValueError, "method"),
    ("energy-str", lambda: jaxlr.svd.project_matrix(M, 2, energy_transfer="False"), TypeError,
     "energy_transfer"),
    ("tail-one", lambda: jaxlr.svd.project_matrix(M, 2, tail_scale=1.0), ValueError, "tail_scale"),
    ("tail-nan", lambda: jaxlr.svd.project_matrix(M, 2, tail_scale=math.nan), ValueError,
     "tail_scale"),
    ("tail-str", lambda: jaxlr.svd.project_matrix(M, 2, tail_scale="0.1"), ValueError,
     "tail_scale"),
    ("factors-rank", lambda: jaxlr.svd.factor_matrix(M, 9), ValueError, "rank"),
    ("factors-method", lambda: jaxlr.svd.factor_matrix(M, 2, method="eigh"), ValueError,
     "method"),
    ("spectra-filter", lambda: jaxlr.svd.singular_values(params(), filter=lambda p, x: False),
     ValueError, "filter"),
    ("spectra-view", lambda: jaxlr.svd.singular_values(params(), view="nope",
                                                        filter="all"), ValueError,
     "view"),
    ("spectra-nan", lambda: jaxlr.svd.singular_values(nan_params(),
                                                       filter="all"), ValueError, "conv/kernel"),
    # jaxlr.policies
    ("ranks-zero", lambda: jaxlr.Ranks({"a": 0}, {"a": 4}), ValueError, "rank"),
    ("ranks-paths", lambda: jaxlr.Ranks({"a": 2}, {"b": 4}), ValueError, "full"),
    ("ranks-float", lambda: jaxlr.Ranks({"a": 2.5}, {"a": 4}), TypeError, "rank"),
    ("ranks-type", lambda: jaxlr.Ranks([("a", 2)], {"a": 4}), TypeError, "ranks"),
    ("overrides", lambda: jaxlr.Ranks({"a": 2}, {"a": 4}).with_overrides({"z": 1}), ValueError,
     "overrides"),
    ("multiple", lambda: jaxlr.Ranks({"a": 2}, {"a": 4}).rounded_up(0), ValueError, "multiple"),
    ("retained-type", lambda: jaxlr.policies.retained_fraction({"a": 1}), TypeError, "Ranks"),
    ("fraction-none", lambda: policies.kept_fraction(), ValueError, "keep"),
    ("fraction-both", lambda: policies.kept_fraction(keep=0.5, prune=0.5), ValueError, "prune"),
    ("local-n", lambda: policies.local_rank(0, keep=0.5), ValueError, "n"),
    ("fixed-zero", lambda: jaxlr.policies.fixed_ranks(params(), 0, filter="all"), ValueError,
     "rank"),
    ("fixed-big", lambda: jaxlr.policies.fixed_ranks(params(), 9, filter="all"), ValueError,
     "rank"),
    ("prune-one", lambda: jaxlr.lsvt_ranks(params(), prune=1.0, filter="all"), ValueError, "prune"),
    ("keep-zero", lambda: jaxlr.lsvt_ranks(params(), keep=0, filter="all"), ValueError, "keep"),
    ("keep-bool", lambda: jaxlr.lsvt_ranks(params(), keep=True, filter="all"), TypeError, "keep"),
    ("keep-str", lambda: jaxlr.lsvt_ranks(params(), keep="0.5", filter="all"), TypeError, "keep"),
    ("keep-nan", lambda: jaxlr.lsvt_ranks(params(), keep=math.nan,
                                          filter="all"), ValueError, "keep"),
    ("energy-zero", lambda: jaxlr.energy_ranks(params(), 0, filter="all"), ValueError, "energy"),
    ("energy-big", lambda: jaxlr.energy_ranks(params(), 1.5, filter="all"), ValueError, "energy"),
    ("normalize", lambda: jaxlr.gsvt_ranks(params(), keep=0.5, normalize="sum",
                                           filter="all"), ValueError,
     "normalize"),
    ("pools-name", lambda: jaxlr.gsvt_ranks(params(), keep=0.5, pools="mlp",
                                            filter="all"), ValueError, "pools"),
    ("pools-type", lambda: jaxlr.gsvt_ranks(params(), keep=0.5, pools=3,
                                            filter="all"), TypeError, "pools"),
    ("pools-partial", lambda: jaxlr.gsvt_ranks(params(), keep=0.5, pools={"conv/kernel": "a"},
                                               filter="all"),
     ValueError, "pools"),
    ("spectra-empty", lambda: jaxlr.gsvt_ranks(params(), keep=0.5, spectra={},
                                               filter="all"), ValueError,
     "spectra"),
    ("spectra-negative", lambda: jaxlr.gsvt_ranks(
        params(), keep=0.5,
        spectra={"conv/kernel": [1, -1, 0, 0, 0, 0, 0, 0], "fc/kernel": [1] * 4}, filter="all"),
     ValueError, "singular values"),
    ("spectra-type", lambda: jaxlr.gsvt_ranks(params(), keep=0.5, spectra=[1, 2],
                                              filter="all"), TypeError,
     "spectra"),
    ("reduction", lambda: jaxlr.target_ranks(params(), reduction=1.0,
                                             filter="all"), ValueError, "reduction"),
    ("policy", lambda: jaxlr.target_ranks(params(), reduction=0.5, policy="prune",
                                          filter="all"), ValueError,
     "policy"),
    ("cost-type", lambda: jaxlr.target_ranks(params(), reduction=0.5, cost={},
                                             filter="all"), TypeError, "cost"),
    ("ranks-missing", lambda: policies.resolve_ranks({"zz": 1}, params()), ValueError, "ranks"),
    ("ranks-spec", lambda: policies.resolve_ranks(3, params()), TypeError, "ranks"),
    ("ranks-empty", lambda: policies.resolve_ranks({}, params()), ValueError, "ranks"),
    # jaxlr.lorita
    ("depth-zero", lambda: jaxlr.factorize(params(), 0, KEY, filter="all"), ValueError, "depth"),
    ("depth-float", lambda: jaxlr.factorize(params(), 2.0, KEY, filter="all"), ValueError, "depth"),
    ("depth-bool", lambda: jaxlr.factorize(params(), True, KEY, filter="all"), ValueError, "depth"),
    ("key-missing", lambda: jaxlr.factorize(params(), 2, filter="all"), ValueError, "key"),
    ("key-int", lambda: jaxlr.factorize(params(), 2, key=0, filter="all"), TypeError, "key"),
    ("placement", lambda: jaxlr.factorize(params(), 2, KEY, placement="middle",
                                          filter="all"), ValueError,
     "placement"),
    ("init", lambda: jaxlr.factorize(params(), 2, KEY, init="random",
                                     filter="all"), ValueError, "init"),
    ("refactorize", lambda: jaxlr.factorize(jaxlr.factorize(params(), 2, KEY,
                                                            filter="all"), 2, KEY, filter="all"),
     ValueError, "params"),
    ("from-dense-swapped", lambda: lorita.from_dense(params(), jaxlr.factorize(params(), 2, KEY,
                                                                               filter="all")),
     ValueError, "ftree"),
    ("from-dense-shape", lambda: lorita.from_dense(
        jaxlr.factorize(params(), 2, KEY,
                        filter="all"), {**params(), "fc": {"kernel": jnp.ones((8, 5))}}),
     ValueError, "fc/kernel"),
    ("mask-flag", lambda: lorita.weight_decay_mask(params(), include_kernels="yes"), TypeError,
     "include_kernels"),
    ("decay-nan", lambda: lorita.coupled_adam(1e-3, math.nan), ValueError, "weight_decay"),
    ("decay-negative", lambda: lorita.coupled_adam(1e-3, -1.0), ValueError, "weight_decay"),
    ("decay-str", lambda: lorita.coupled_adam(1e-3, "1e-4"), TypeError, "weight_decay"),
    ("lr-negative", lambda: lorita.coupled_adam(-1.0, 1e-4), ValueError, "learning_rate"),
    ("lr-str", lambda: lorita.coupled_adam("1e-3", 1e-4), TypeError, "learning_rate"),
    # jaxlr.projection: options
    ("opt-energy", lambda: jaxlr.ProjectionOptions(energy_transfer="False"), TypeError,
     "energy_transfer"),
    ("opt-tail", lambda: jaxlr.ProjectionOptions(tail_scale=-0.1), ValueError, "tail_scale"),
    ("opt-eps-zero", lambda: jaxlr.ProjectionOptions(bn_epsilon=0), ValueError, "bn_epsilon"),
    ("opt-eps-str", lambda: jaxlr.ProjectionOptions(bn_epsilon="1e-5"), ValueError,
     "bn_epsilon"),
    ("opt-pairs-list", lambda: jaxlr.ProjectionOptions(bn_pairs=[("conv/kernel", "bn")]),
     TypeError, "bn_pairs"),
    ("opt-pairs-value", lambda: jaxlr.ProjectionOptions(bn_pairs={"conv/kernel": 3}), TypeError,
     "bn_pairs"),
    ("opt-filter", lambda: jaxlr.ProjectionOptions(filter="convs"), ValueError, "filter"),
    ("opt-view", lambda: jaxlr.ProjectionOptions(view=(0, 1)), TypeError, "view"),
    ("opt-method", lambda: jaxlr.ProjectionOptions(method="qr"), ValueError, "method"),
    # jaxlr.projection: the transformation
    ("spec-none", lambda: jaxlr.low_rank_projection(), ValueError, "prune"),
    ("spec-both", lambda: jaxlr.low_rank_projection(prune=0.5, keep=0.5), ValueError, "keep"),
    ("prune-big", lambda: jaxlr.low_rank_projection(prune=1.5), ValueError, "prune"),
    ("prune-str", lambda: jaxlr.low_rank_projection(prune="0.5"), TypeError, "prune"),
    ("every-zero", lambda: jaxlr.low_rank_projection(prune=0.5, every=0), ValueError, "every"),
    ("every-float", lambda: jaxlr.low_rank_projection(prune=0.5, every=1.5), TypeError, "every"),
    ("start-zero", lambda: jaxlr.low_rank_projection(prune=0.5, start=0), ValueError, "start"),
    ("end-bool", lambda: jaxlr.low_rank_projection(prune=0.5, end=True), TypeError, "end"),
    ("end-early", lambda: jaxlr.low_rank_projection(prune=0.5, every=4, end=2), ValueError,
     "end"),
    ("options-dict", lambda: jaxlr.low_rank_projection(prune=0.5, options={}), TypeError,
     "options"),
    ("check-placement", lambda: jaxlr.low_rank_projection(prune=0.5, check_placement="yes"),
     TypeError, "check_placement"),
    ("ranks-int", lambda: jaxlr.low_rank_projection(ranks=3), TypeError, "ranks"),
    ("ranks-empty-tx", lambda: jaxlr.low_rank_projection(ranks={}), ValueError, "ranks"),
    ("keep-schedule", lambda: jaxlr.low_rank_projection(keep=lambda count: 2.0), ValueError,
     "keep"),
    ("no-params", lambda: update(jaxlr.low_rank_projection(prune=0.5), use_params=False),
     ValueError, "params"),
    ("no-stats", lambda: update(jaxlr.low_rank_projection(prune=0.5, options=PAIRS)),
     ValueError, "batch_stats"),
    ("pairs-kernel", lambda: update(jaxlr.low_rank_projection(prune=0.5, options=(
        jaxlr.ProjectionOptions(bn_pairs={"convv/kernel": "bn"}))), batch_stats=stats()),
     ValueError, "bn_pairs"),
    ("pairs-bn", lambda: update(jaxlr.low_rank_projection(prune=0.5, options=(
        jaxlr.ProjectionOptions(bn_pairs={"conv/kernel": "bnn"}))), batch_stats=stats()),
     ValueError, "bnn"),
    ("stats-width", lambda: update(jaxlr.low_rank_projection(prune=0.5, options=PAIRS),
                                   batch_stats=stats(jnp.ones(5))), ValueError, "BatchNorm 'bn'"),
    ("stats-negative", lambda: update(jaxlr.low_rank_projection(prune=0.5, options=PAIRS),
                                      batch_stats=stats(-jnp.ones(8))), ValueError, "bn/var"),
    ("state-params", mismatched_state, ValueError, "params"),
    ("project-schedule", lambda: jaxlr.project(params(), prune=optax.linear_schedule(0.1, 0.5, 9)),
     TypeError, "prune"),
    ("project-lorita", lambda: jaxlr.project(jaxlr.factorize(params(), 2, KEY,
                                                             filter="all"), prune=0.5),
     ValueError, "LoRITa"),
    ("project-nan", lambda: jaxlr.project(nan_params(), prune=0.5), ValueError, "conv/kernel"),
    ("project-matrix-nan", lambda: jaxlr.svd.project_matrix(jnp.full((4, 3), jnp.nan), 2),
     ValueError, "NaN or Inf"),
    ("factors-inf", lambda: jaxlr.svd.factor_matrix(jnp.full((4, 3), jnp.inf), 2),
     ValueError, "NaN or Inf"),
    ("wrapper-optimizer", lambda: jaxlr.with_low_rank_projection(lambda g: g, prune=0.5),
     TypeError, "optimizer"),
    # jaxlr.batchnorm
    ("bn-variables", lambda: jaxlr.find_bn_pairs(Dense()), TypeError, "variables"),
    ("bn-model", lambda: jaxlr.find_bn_pairs(lambda x: x, M), TypeError, "model"),
    # jaxlr.compression
    ("compress-rank", lambda: jaxlr.compress(params(), {"conv/kernel": 9}), ValueError, "rank"),
    ("compress-path", lambda: jaxlr.compress(params(), {"zz/kernel": 1}), ValueError, "ranks"),
    ("compress-method", lambda: jaxlr.compress(params(), {"conv/kernel": 2},
                                               options=jaxlr.ProjectionOptions(method="qr")),
     ValueError, "method"),
    ("compress-nan", lambda: jaxlr.compress(nan_params(), {"conv/kernel": 2}), ValueError,
     "conv/kernel"),
    # jaxlr.inference
    ("apply-model", lambda: jaxlr.apply(lambda v, x: x, {}, M), TypeError, "model"),
    ("nnx-model-type", lambda: jaxlr.inference.nnx_model(Dense(), {}), TypeError, "model"),
    ("nnx-model-path", lambda: jaxlr.inference.nnx_model(nnx.Linear(8, 4, rngs=nnx.Rngs(0)),
                                               {"fc7": {"kernel": jnp.ones((8, 4))}}),
     KeyError, "fc7"),
    # jaxlr.train_state
    ("state-apply-fn", lambda: jaxlr.TrainState.create(apply_fn=3, params={}, tx=optax.sgd(1.0)),
     TypeError, "apply_fn"),
    ("state-tx", lambda: jaxlr.TrainState.create(apply_fn=Dense().apply, params={}, tx="sgd"),
     TypeError, "tx"),
    ("state-extra", lambda: linen_state().apply_gradients(
        grads=linen_state().params, extra_args=[1]), TypeError, "extra_args"),
    # jaxlr.cost
    ("cost-fn", lambda: jaxlr.forward_cost(3, params()), TypeError, "fn"),
    ("cost-xla", lambda: jaxlr.forward_cost(lambda p, x: x, params(), M, xla="no"), TypeError,
     "xla"),
]


@pytest.mark.parametrize("call, error, pattern", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_is_refused_naming_the_parameter(call, error, pattern):
    with pytest.raises(error) as raised:
        call()
    assert pattern in str(raised.value), str(raised.value)


def test_there_are_more_than_a_hundred_distinct_cases():
    assert len({case[0] for case in CASES}) == len(CASES) > 100


def test_export_refuses_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="force"):
        jaxlr.export.save(tmp_path / "a", params(), force="yes")
    with pytest.raises(TypeError, match="nested dicts of arrays"):
        jaxlr.export.save(tmp_path / "b", {"layers": [jnp.ones(2)]})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        jaxlr.export.load(tmp_path / "missing")
