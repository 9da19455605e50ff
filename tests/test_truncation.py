"""experiments.truncation: LSVT / GSVT sweeps against a numpy truncation and forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlr
from experiments import data as data_lib
from experiments import models, truncation


def numpy_accuracy(params, images, labels):
    x = images.reshape(len(images), -1).astype(np.float64)
    for name in ("fc0", "fc1"):
        x = np.maximum(x @ params[name]["kernel"] + params[name]["bias"], 0)
    logits = x @ params["head"]["kernel"] + params["head"]["bias"]
    return np.mean(logits.argmax(1) == labels)


def truncated(matrix, rank):
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_sweep_against_numpy():
    data = data_lib.load("digits")
    model = models.FCN(3, 16)
    variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    rows = truncation.sweep(model, variables, data, (0.5,),
                            filter=jaxlr.kernel_filter(exclude="head"))
    assert [(r["policy"], r["budget"]) for r in rows] == [("none", 1.0), ("LSVT", 0.5),
                                                          ("GSVT", 0.5)]
    # GSVT's ranks by hand: the 16 largest of the 32 pooled singular values.
    spectra = {name: np.linalg.svd(params[name]["kernel"], compute_uv=False)
               for name in ("fc0", "fc1")}
    cut = np.sort(np.concatenate(list(spectra.values())))[::-1][15]
    gsvt = {name: max(1, int((s >= cut).sum())) for name, s in spectra.items()}
    for row, ranks in zip(rows[1:], [{"fc0": 8, "fc1": 8}, gsvt], strict=True):
        assert row["ranks"] == {f"{k}/kernel": v for k, v in ranks.items()}
        cut_params = {k: dict(v) for k, v in params.items()}
        for name, rank in ranks.items():
            cut_params[name]["kernel"] = truncated(params[name]["kernel"], rank)
        for split in ("validation", "test"):
            part = data.split(split)
            expected = numpy_accuracy(cut_params, data.normalize(part.images), part.labels)
            assert row[split] == pytest.approx(expected, abs=1.5 / len(part))
        assert row["retained"] == pytest.approx(np.mean([ranks["fc0"] / 16, ranks["fc1"] / 16]))
        # A layer is stored as a pair only where r (m + n) < m n.
        saved = sum(64 * 16 - r * 80 for name, r in ranks.items()
                    if name == "fc0" and r * 80 < 1024)
        saved += sum(256 - r * 32 for name, r in ranks.items() if name == "fc1" and r * 32 < 256)
        assert row["params"] == 1482 - saved
    assert rows[0]["params"] == 1482 and rows[0]["retained"] == 1.0
    with pytest.raises(ValueError, match="policies"):
        truncation.sweep(model, variables, data, (0.5,), filter=jaxlr.matrices.is_kernel,
                         policies=("RSVT",))


def test_accept_picks_the_fewest_singular_values_within_tolerance_on_validation():
    rows = [
        {"policy": "none", "retained": 1.0, "validation": 0.90, "test": 0.91},
        {"policy": "LSVT", "retained": 0.5, "validation": 0.895, "test": 0.80},
        {"policy": "LSVT", "retained": 0.2, "validation": 0.88, "test": 0.91},
        {"policy": "GSVT", "retained": 0.4, "validation": 0.90, "test": 0.70},
        {"policy": "GSVT", "retained": 0.1, "validation": 0.891, "test": 0.90},
    ]
    chosen = truncation.accept(rows, tolerance=0.01)
    assert chosen["LSVT"]["retained"] == 0.5   # 0.88 is below 0.90 - 0.01; test is not read
    assert chosen["GSVT"]["retained"] == 0.1
    assert truncation.accept(rows, tolerance=0.0).keys() == {"GSVT"}
    with pytest.raises(ValueError, match="tolerance"):
        truncation.accept(rows, tolerance=1.0)
