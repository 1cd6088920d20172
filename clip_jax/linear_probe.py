"""Linear probes on frozen CLIP image features: few-shot ridge regression and the paper's logistic regression.

Two classifiers over L2-normalised image features (`zeroshot.embed_rows` / `extract_features`):

* Few-shot ridge regression, as big_vision's few-shot evaluator (big_vision/evaluators/fewshot.py,
  configs/common.py: 1, 5, 10, 25 shots, l2_reg 2**10, 3 seeds): per seed, k examples of every class
  drawn from the train split (a seeded permutation per class, the first k); features standardised
  with the k-shot set's mean and std, a constant column of 100 appended as a nearly unregularised
  bias; one-hot targets scaled to {-1, +1}; the closed-form least squares
  W = (X^T X + l2 I)^{-1} X^T Y (or X^T (X X^T + l2 I)^{-1} Y when there are fewer examples than
  features); accuracy of argmax(x W) on the test split, averaged over seeds. Cheap enough to run
  during training (`fewshot_evaluator`).

* Logistic regression, the CLIP paper's linear probe (Radford et al. 2021, appendix A.3): multinomial
  logistic regression with an L2 penalty, fitted by L-BFGS (optax.lbfgs, zoom line search), with the
  regularisation found on a validation split by the paper's parametric binary search: C (the inverse
  regularisation strength) starts at 10^-6, 10^-4, ..., 10^6, then the interval around the best value
  is halved until 8 steps per decade; the final classifier is fitted on train + validation with that
  C and scored on the test split. The objective is scikit-learn's LogisticRegression(C=C) one,
  sum_i CE_i + ||W||^2 / (2 C) with the bias unpenalised, divided by N:
  mean_i CE_i + ||W||^2 / (2 C N) (tests/test_linear_probe.py compares the two).

    python -m clip_jax.linear_probe --weights ckpt.pt --dataset cifar10 --out probe.json
    python -m clip_jax.linear_probe --model ViT-B/32 --dataset folder --train-folder A --test-folder B
    python -m clip_jax.linear_probe --weights ckpt.pt --dataset shapes --label shape

Datasets: the names of `clip_jax.zeroshot` (tfds; the train split trains, the dataset's evaluation
split tests), "folder" (--train-folder and --test-folder, one sub-folder per class), and "shapes"
(the built-in data: its train split trains, --test-split validation or heldout tests). When the
dataset has no validation split, --val-fraction of the train split is held out for the sweep.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

import clip_jax
from clip_jax import eval_data, zeroshot
from clip_jax.api import CLIPBundle
from clip_jax.model import CLIP, normalize
from clip_jax.variants import CLIPConfig
from common.cli import (
    output_file,
    positive_int,
    positive_ints,
    report_results,
    start_data_parallel,
)
from common.data import shapes
from common.data.sources import DatasetNotFoundError, ShapesSource
from common.sharding import (
    replicated,
)

log = logging.getLogger(__name__)

FEWSHOT_SHOTS = (1, 5, 10, 25)
FEWSHOT_L2_REG = 2.0**10  # big_vision configs/common.py
FEWSHOT_SEEDS = 3
BIAS_CONSTANT = 100.0  # big_vision: a large constant feature, so the bias is almost unregularised
# The paper's sweep: log10 C from -6 to 6, first every 2 decades, then halved around the best to 1/8 decade.
SWEEP_LOG10_RANGE, SWEEP_START_STEP, SWEEP_RESOLUTION = (-6.0, 6.0), 2.0, 1 / 8


# -- features ------------------------------------------------------------------------------------

def extract_features(bundle: Any, batches: Iterable[Mapping[str, np.ndarray]], *, mesh: Mesh,
                     label_field: str = "label", desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (N, D) unit rows, labels int32 (N,)) of every valid row of `batches`.

    `batches` are this host's rows as `zeroshot.image_batches` makes them ({"image", label_field,
    "valid"}); every host gets the rows of all hosts back (the features are replicated).
    """
    gather = jax.jit(lambda f, y, v: (normalize(f), y, v), out_shardings=replicated(mesh))
    features, labels = [], []
    for batch in tqdm(batches, total=getattr(batches, "num_batches", None), desc=desc, unit="batch",
                      disable=jax.process_index() != 0):
        encoded, placed = zeroshot.encode_image_batch(bundle, {**batch, "label": batch[label_field]}, mesh)
        f, y, valid = (np.asarray(a) for a in gather(encoded, placed["label"], placed["valid"]))
        features.append(f[valid])
        labels.append(y[valid])
    if not features:
        raise ValueError(f"Expected at least one image ({desc}), found none.")
    return np.concatenate(features), np.concatenate(labels).astype(np.int32)


# -- few-shot ridge regression --------------------------------------------------------------------

def sample_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int) -> np.ndarray:
    """Indices of `shots` examples of every class (fewer where a class has fewer), as big_vision draws them:
    each class's indices in a permutation seeded by `seed`, the first `shots` of each."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(num_classes)]
    return np.concatenate(per_class)


@functools.partial(jax.jit, static_argnames="num_classes")
def ridge_fewshot_accuracy(train_x: jax.Array, train_y: jax.Array, test_x: jax.Array, test_y: jax.Array, *,
                           num_classes: int, l2_reg: float | jax.Array = FEWSHOT_L2_REG) -> jax.Array:
    """Test accuracy of big_vision's closed-form ridge classifier fitted on (train_x (N, D), train_y (N,))."""
    mean = train_x.mean(axis=0, keepdims=True)
    std = train_x.std(axis=0, keepdims=True) + 1e-5

    def design(x):  # standardised features and the bias column, (N, D + 1)
        return jnp.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)

    x = design(train_x)
    y = 2.0 * jax.nn.one_hot(train_y, num_classes) - 1.0  # (N, C) in {-1, +1}
    n, d = x.shape
    if n >= d:
        w = jnp.linalg.solve(x.T @ x + l2_reg * jnp.eye(d), x.T @ y)  # (D + 1, C)
    else:  # the same solution through the N x N system
        w = x.T @ jnp.linalg.solve(x @ x.T + l2_reg * jnp.eye(n), y)
    return jnp.mean(jnp.argmax(design(test_x) @ w, axis=1) == test_y)


def fewshot_accuracies(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                       num_classes: int, shots: Sequence[int] = FEWSHOT_SHOTS, l2_reg: float = FEWSHOT_L2_REG,
                       num_seeds: int = FEWSHOT_SEEDS) -> dict[str, float]:
    """{"<k>shot": test accuracy of the k-shot ridge classifier, averaged over seeds 0 .. num_seeds-1}."""
    out = {}
    for k in shots:
        accs = [ridge_fewshot_accuracy(train_x[idx], train_y[idx], test_x, test_y, num_classes=num_classes,
                                       l2_reg=l2_reg)
                for idx in (sample_shots(train_y, k, num_classes, seed) for seed in range(num_seeds))]
        out[f"{k}shot"] = float(np.mean(accs))
    return out


def fewshot_evaluator(model: CLIP, config: CLIPConfig, train: tuple[np.ndarray, np.ndarray],
                      test: tuple[np.ndarray, np.ndarray], *, num_classes: int, mesh: Mesh,
                      shots: Sequence[int] = FEWSHOT_SHOTS, l2_reg: float = FEWSHOT_L2_REG,
                      num_seeds: int = FEWSHOT_SEEDS, batch_size: int = 256) -> Callable[[Any, Any], dict[str, float]]:
    """A trainer evaluator (common.trainer.Evaluator): `fewshot_accuracies` of the trained image tower.

    `train` and `test` are (uint8 images (N, S, S, 3), int labels (N,)) that every host holds whole;
    the features are computed on the mesh from the trainer's (sharded) parameters at each evaluation.
    """
    train_images, train_labels = train
    test_images, test_labels = test

    def evaluate(params: Any, model_state: Any) -> dict[str, float]:
        bundle = CLIPBundle(model, {"params": params, **model_state}, config, "trained")
        embed = functools.partial(zeroshot.embed_rows, bundle.encode_image, batch_size=batch_size, mesh=mesh)
        return fewshot_accuracies(embed(train_images, desc="few-shot train"), np.asarray(train_labels),
                                  embed(test_images, desc="few-shot test"), np.asarray(test_labels),
                                  num_classes=num_classes, shots=shots, l2_reg=l2_reg, num_seeds=num_seeds)

    return evaluate


# -- logistic regression ----------------------------------------------------------------------------

def _logistic_objective(params: tuple[jax.Array, jax.Array], x: jax.Array, y: jax.Array,
                        c: jax.Array) -> jax.Array:
    """mean cross-entropy + ||W||^2 / (2 C N): scikit-learn's objective divided by N (the bias unpenalised)."""
    w, b = params
    logits = x @ w + b  # (N, K)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + jnp.sum(w * w) / (2.0 * c * x.shape[0])


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def fit_logistic_regression(x: jax.Array, y: jax.Array, c: float | jax.Array, *, num_classes: int,
                            max_iter: int = 1000, tol: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """(W (D, K), b (K,)) of multinomial logistic regression with inverse regularisation `c`, fitted by
    L-BFGS until the gradient's norm is below `tol` or after `max_iter` iterations. `c` is traced:
    a sweep over it compiles once."""
    x = jnp.asarray(x, jnp.float32)
    objective = functools.partial(_logistic_objective, x=x, y=y, c=jnp.asarray(c, jnp.float32))
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(params, updates), state

    def unfinished(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        return (count == 0) | ((count < max_iter) & (optax.tree.norm(optax.tree.get(state, "grad")) >= tol))

    params = (jnp.zeros((x.shape[1], num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))
    params, _ = jax.lax.while_loop(unfinished, step, (params, solver.init(params)))
    return params


def logistic_accuracy(params: tuple[jax.Array, jax.Array], x: np.ndarray, y: np.ndarray) -> float:
    w, b = params
    return float(np.mean(np.argmax(np.asarray(x) @ np.asarray(w) + np.asarray(b), axis=1) == np.asarray(y)))


def sweep_regularisation(score: Callable[[float], float]) -> tuple[float, list[dict[str, float]]]:
    """(best C, every (C, score) tried) by the CLIP paper's parametric binary search (appendix A.3).

    log10 C in {-6, -4, ..., 6} first; then, with the step halved each round down to 1/8 decade, the
    points one step either side of the best so far. Ties go to the smaller C (the stronger penalty).
    """
    lo, hi = SWEEP_LOG10_RANGE
    tried: dict[float, float] = {}

    def best() -> float:
        return max(sorted(tried), key=lambda e: tried[e])  # max keeps the first of equals: the smallest C

    for e in np.arange(lo, hi + SWEEP_START_STEP / 2, SWEEP_START_STEP):
        tried[float(e)] = score(10.0 ** e)
    step = SWEEP_START_STEP
    while step > SWEEP_RESOLUTION:
        step /= 2
        centre = best()
        for e in (centre - step, centre + step):
            if lo <= e <= hi and e not in tried:
                tried[e] = score(10.0 ** e)
    return 10.0 ** best(), [{"C": 10.0 ** e, "val_top1": tried[e]} for e in sorted(tried)]


def logistic_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                   test: tuple[np.ndarray, np.ndarray], *, num_classes: int, max_iter: int = 1000) -> dict[str, Any]:
    """The CLIP paper's linear probe: C swept on `val`, refitted on train + val, scored on `test`.

    Each of train / val / test is (features (N, D), labels (N,)). Returns {"C", "test_top1", "sweep"}.
    """
    fit = functools.partial(fit_logistic_regression, num_classes=num_classes, max_iter=max_iter)
    best_c, sweep = sweep_regularisation(lambda c: logistic_accuracy(fit(*train, c), *val))
    both = tuple(np.concatenate(parts) for parts in zip(train, val))
    return {"C": best_c, "test_top1": logistic_accuracy(fit(*both, best_c), *test), "sweep": sweep}


def split_validation(features: np.ndarray, labels: np.ndarray, fraction: float, seed: int = 0):
    """((train features, labels), (validation features, labels)): a seeded random `fraction` held out."""
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = int(round(fraction * len(labels)))
    if not 0 < n_val < len(labels):
        raise ValueError(f"--val-fraction {fraction} of {len(labels)} training examples leaves no train or no "
                         "validation examples; pick a fraction in (0, 1) or a larger train split.")
    val, tr = order[:n_val], order[n_val:]
    return (features[tr], labels[tr]), (features[val], labels[val])


# -- command line ------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clip_jax.linear_probe",
        description="Linear-probe accuracy of frozen CLIP image features (CLIP paper appendix A.3) and "
                    "few-shot ridge regression (big_vision).")
    parser.add_argument("--model", default="ViT-B/32", help="variant name (random init unless --weights)")
    parser.add_argument("--weights", help="checkpoint path given to clip_jax.load (default: --model)")
    parser.add_argument("--dataset", default="cifar10", choices=sorted(eval_data.DATASETS) + ["folder", "shapes"])
    parser.add_argument("--data-dir", help="tfds data_dir")
    parser.add_argument("--tfds-name", help="tfds name with config/version")
    parser.add_argument("--train-split", default="train", help="tfds split to train on")
    parser.add_argument("--test-split", help="split to test on (default: the dataset's evaluation split; "
                                             "shapes: validation)")
    parser.add_argument("--train-folder", help="--dataset folder: DIR/<class>/... to train on")
    parser.add_argument("--test-folder", help="--dataset folder: DIR/<class>/... to test on")
    parser.add_argument("--label", default="shape", choices=["shape", "color"], help="--dataset shapes: the label")
    parser.add_argument("--num-examples", type=positive_int, default=2000, help="--dataset shapes: train examples")
    parser.add_argument("--test-examples", type=positive_int, default=1000, help="--dataset shapes: test examples")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="train examples held out for the C sweep")
    parser.add_argument("--max-iter", type=positive_int, default=1000, help="L-BFGS iterations per fit")
    parser.add_argument("--shots", type=positive_ints, default=",".join(map(str, FEWSHOT_SHOTS)),
                        help="few-shot ridge regression shots, e.g. 1,5,10,25")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="global batch size (all hosts)")
    parser.add_argument("--num-threads", type=positive_int, default=16, help="image decoding threads per host")
    parser.add_argument("--out", type=output_file, help="write the results JSON to this file")
    return parser


def _eval_sets(args: argparse.Namespace, image_size: int) -> tuple[Any, Any, str]:
    """(train EvalSet-like, test EvalSet-like, label field) for the CLI's dataset."""
    if args.dataset == "shapes":
        config = shapes.ShapesConfig(image_size=image_size)
        names = shapes.SHAPES if args.label == "shape" else shapes.COLORS

        def split(name: str, n: int) -> eval_data.EvalSet:
            return eval_data.EvalSet("shapes", name, tuple(names), ShapesSource(shapes.ShapesDataset(name, n, config)),
                                     (), f"built-in shapes data, {n} examples, label {args.label}")

        return split("train", args.num_examples), split(args.test_split or "validation", args.test_examples), \
            f"{args.label}_id"
    if args.dataset == "folder":
        train = eval_data.image_folder_source(args.train_folder, split="train")
        test = eval_data.image_folder_source(args.test_folder, split="test")
        if train.classnames != test.classnames:
            raise SystemExit(f"The class folders of {args.train_folder} and {args.test_folder} differ: "
                             f"{train.classnames} and {test.classnames}; give both the same class sub-folders.")
        return train, test, "label"
    name = args.tfds_name or args.dataset
    return (eval_data.open_source(name, split=args.train_split, data_dir=args.data_dir),
            eval_data.open_source(name, split=args.test_split, data_dir=args.data_dir), "label")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.dataset == "folder" and not (args.train_folder and args.test_folder):
        parser.error("--dataset folder needs --train-folder DIR and --test-folder DIR")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction: expected a fraction in (0, 1), found {args.val_fraction}")
    mesh = start_data_parallel(parser, args.batch_size)
    started = time.time()
    bundle = clip_jax.load(args.weights or args.model)
    try:
        train_set, test_set, label_field = _eval_sets(args, bundle.image_size)
    except DatasetNotFoundError as err:
        raise SystemExit(str(err)) from err
    num_classes = len(train_set.classnames)
    features = {}
    for role, eval_set in (("train", train_set), ("test", test_set)):
        batches = zeroshot.image_batches(eval_set.source, bundle.image_size, fields=(label_field,),
                                         transforms=eval_set.transforms, global_batch_size=args.batch_size,
                                         num_threads=args.num_threads)
        features[role] = extract_features(bundle, batches, mesh=mesh, label_field=label_field,
                                          desc=f"{role} features")
        log.info("%s: %d %s images from %s", role, len(features[role][1]), eval_set.split, eval_set.description)
    train, val = split_validation(*features["train"], args.val_fraction)
    probe = logistic_probe(train, val, features["test"], num_classes=num_classes, max_iter=args.max_iter)
    fewshot = fewshot_accuracies(*features["train"], *features["test"], num_classes=num_classes, shots=args.shots)
    results = {"model": args.model if not args.weights else f"inferred from {args.weights}", "weights": args.weights,
               "dataset": test_set.name, "train_split": train_set.split, "test_split": test_set.split,
               "num_classes": num_classes, "feature_dim": int(features["train"][0].shape[1]),
               "n_train": len(train[1]), "n_val": len(val[1]), "n_test": len(features["test"][1]),
               "logistic_regression": {"C": probe["C"], "test_top1": probe["test_top1"]},
               "fewshot_ridge": {"l2_reg": FEWSHOT_L2_REG, "num_seeds": FEWSHOT_SEEDS, **fewshot},
               "sweep": probe["sweep"], "time": round(time.time() - started, 2)}
    headline = (f"{results['dataset']} {results['test_split']}: linear probe top-1 {100 * probe['test_top1']:.2f}% "
                f"(C={probe['C']:.3g}); few-shot " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in fewshot.items()))
    report_results(results, headline, args.out)
    return results


if __name__ == "__main__":
    main()
