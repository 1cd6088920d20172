"""Linear probes: the L-BFGS logistic regression equals scikit-learn's, the few-shot ridge equals the
closed form in numpy, the paper's regularisation search, the few-shot evaluator, the CLI on shapes."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import linen as nn
from sklearn.linear_model import LogisticRegression

import clip_jax
from clip_jax import linear_probe
from clip_jax.api import CLIPBundle
from clip_jax.model import CLIP, dummy_inputs
from clip_jax.variants import CLIPConfig, decode_variant
from common import sharding
from common.data import shapes

BASE = decode_variant("ViT-B/32")
TINY = CLIPConfig(32, dataclasses.replace(BASE.vision, image_size=16, patch_size=8, width=32, layers=1, heads=2),
                  dataclasses.replace(BASE.text, width=32, layers=1, heads=2, context_length=16))


def _blobs(n, classes=4, dim=16, seed=0, spread=1.5):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, dim))
    y = rng.integers(classes, size=n)
    return (centres[y] + spread * rng.normal(size=(n, dim))).astype(np.float32), y.astype(np.int32)


@pytest.mark.parametrize("c", [0.05, 1.0, 20.0])
def test_linear_probe_logistic_regression_equals_scikit_learn(c):
    x, y = _blobs(240)
    test_x, test_y = _blobs(200, seed=1)
    w, b = (np.asarray(a) for a in linear_probe.fit_logistic_regression(x, y, c, num_classes=4))
    reference = LogisticRegression(C=c, solver="lbfgs", max_iter=10_000, tol=1e-10).fit(x.astype(np.float64), y)
    assert w.shape == (16, 4) and b.shape == (4,)
    np.testing.assert_array_equal(np.argmax(test_x @ w + b, axis=1), reference.predict(test_x))
    np.testing.assert_allclose(w.T, reference.coef_, atol=2e-4 * max(1.0, np.abs(reference.coef_).max()))
    # The softmax bias is defined up to a constant: compare centred.
    np.testing.assert_allclose(b - b.mean(), reference.intercept_ - reference.intercept_.mean(), atol=2e-3)
    assert linear_probe.logistic_accuracy((w, b), test_x, test_y) == pytest.approx(reference.score(test_x, test_y))


def test_linear_probe_regularisation_search_is_the_papers_binary_search():
    peak = 0.7  # log10 C of the best score
    tried = []

    def score(c):
        tried.append(np.log10(c))
        return -abs(np.log10(c) - peak)

    best, sweep = linear_probe.sweep_regularisation(score)
    # Every 2 decades from 1e-6 to 1e6, then +-1, +-1/2, +-1/4, +-1/8 decade around the best so far.
    assert tried[:7] == pytest.approx([-6, -4, -2, 0, 2, 4, 6])
    assert np.log10(best) == pytest.approx(0.75) and len(tried) == len(set(tried)) == 7 + 4 * 2
    assert [s["C"] for s in sweep] == sorted(s["C"] for s in sweep)
    # Ties go to the smaller C; nothing outside [1e-6, 1e6] is tried.
    flat_best, flat = linear_probe.sweep_regularisation(lambda c: 1.0)
    assert flat_best == pytest.approx(1e-6) and min(s["C"] for s in flat) == pytest.approx(1e-6)


def test_linear_probe_logistic_probe_sweeps_then_refits_on_train_and_val():
    train, val, test = _blobs(120), _blobs(60, seed=1), _blobs(100, seed=2)
    result = linear_probe.logistic_probe(train, val, test, num_classes=4, max_iter=50)
    both = tuple(np.concatenate(p) for p in zip(train, val))
    refit = linear_probe.fit_logistic_regression(*both, result["C"], num_classes=4, max_iter=50)
    assert result["test_top1"] == linear_probe.logistic_accuracy(refit, *test) > 0.6
    assert result["C"] in [s["C"] for s in result["sweep"]]
    assert max(s["val_top1"] for s in result["sweep"]) == next(s["val_top1"] for s in result["sweep"]
                                                               if s["C"] == result["C"])


def _numpy_ridge_accuracy(x, y, test_x, test_y, classes, l2):
    mean, std = x.mean(0), x.std(0) + 1e-5
    design = lambda v: np.hstack([(v - mean) / std, np.full((len(v), 1), 100.0)])
    a = design(x.astype(np.float64))
    w = np.linalg.inv(a.T @ a + l2 * np.eye(a.shape[1])) @ a.T @ (2 * np.eye(classes)[y] - 1)
    return np.mean(np.argmax(design(test_x.astype(np.float64)) @ w, 1) == test_y)


@pytest.mark.parametrize("n, l2", [(8, 1.0), (40, 2.0**10)])  # fewer / more examples than features
def test_linear_probe_fewshot_ridge_equals_numpy_closed_form(n, l2):
    x, y = _blobs(n, dim=16, spread=2.5)
    test_x, test_y = _blobs(300, dim=16, seed=1, spread=2.5)
    got = float(linear_probe.ridge_fewshot_accuracy(x, y, test_x, test_y, num_classes=4, l2_reg=l2))
    assert got == pytest.approx(_numpy_ridge_accuracy(x, y, test_x, test_y, 4, l2), abs=1 / 300 + 1e-9)


def test_linear_probe_fewshot_samples_k_per_class_with_a_fixed_seed():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 0, 0])
    idx = linear_probe.sample_shots(labels, 2, 3, seed=5)
    assert sorted(labels[idx].tolist()) == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(idx, linear_probe.sample_shots(labels, 2, 3, seed=5))
    assert any(not np.array_equal(idx, linear_probe.sample_shots(labels, 2, 3, seed=s)) for s in range(1, 6))
    x, y = _blobs(200, dim=16)
    test_x, test_y = _blobs(100, dim=16, seed=1)
    accs = linear_probe.fewshot_accuracies(x, y, test_x, test_y, num_classes=4, shots=(1, 10), num_seeds=2)
    one = [_numpy_ridge_accuracy(x[i], y[i], test_x, test_y, 4, 2.0**10)
           for i in (linear_probe.sample_shots(y, 1, 4, s) for s in range(2))]
    assert set(accs) == {"1shot", "10shot"} and accs["1shot"] == pytest.approx(np.mean(one), abs=0.02)


@pytest.fixture(scope="module")
def tiny_bundle():
    """A random tiny CLIP, shared by the tests that encode images (its programs compile once)."""
    model = CLIP(TINY)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *dummy_inputs(TINY)))
    return CLIPBundle(model, variables, TINY, "random-init")


def test_linear_probe_fewshot_evaluator_on_sharded_parameters(n_devices, tiny_bundle):
    mesh = sharding.make_mesh("fsdp")
    bundle = tiny_bundle
    shardings = sharding.logical_to_shardings(
        jax.eval_shape(bundle.model.init, jax.random.key(0), *dummy_inputs(TINY)), mesh)
    params = jax.device_put(bundle.params, shardings["params"])  # the bundle's values, FSDP-sharded
    assert not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(40) % 4
    evaluate = linear_probe.fewshot_evaluator(bundle.model, TINY, (images[:24], labels[:24]),
                                              (images[24:], labels[24:]), num_classes=4, mesh=mesh, shots=(1, 5),
                                              num_seeds=1, batch_size=8)
    result = evaluate(params, {})
    features = np.array(bundle.encode_image(images))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    idx = linear_probe.sample_shots(labels[:24], 5, 4, 0)
    want = _numpy_ridge_accuracy(features[idx], labels[idx], features[24:], labels[24:], 4, 2.0**10)
    assert set(result) == {"1shot", "5shot"} and result["5shot"] == pytest.approx(want, abs=1 / 16 + 1e-6)


def test_linear_probe_cli_on_shapes_writes_json(tmp_path, monkeypatch, n_devices, tiny_bundle):
    monkeypatch.setattr(clip_jax, "load", lambda name: tiny_bundle)
    out = tmp_path / "probe.json"
    returned = linear_probe.main(["--weights", "tiny.ckpt", "--dataset", "shapes", "--label", "color",
                                  "--num-examples", "64", "--test-examples", "32", "--shots", "1,2",
                                  "--max-iter", "30", "--batch-size", "16", "--num-threads", "2", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    assert written["n_train"] + written["n_val"] == 64 and written["n_test"] == 32
    assert written["num_classes"] == len(shapes.COLORS)
    assert written["feature_dim"] == 32 and written["test_split"] == "validation"
    assert 0 <= written["logistic_regression"]["test_top1"] <= 1 and 1e-6 <= written["logistic_regression"]["C"] <= 1e6
    assert set(written["fewshot_ridge"]) >= {"1shot", "2shot"} and len(written["sweep"]) >= 7
