"""Zero-shot classification with CLIP: prompt-ensembled classifier weights and top-k accuracy.

Follows OpenAI's notebooks/Prompt_Engineering_for_ImageNet.ipynb (Radford et al. 2021,
section 3.1.4, "prompt engineering and ensembling"): every class name is put into
each of 80 templates, each prompt's text embedding is L2-normalised, the
normalised embeddings are averaged over templates and the mean is normalised
again; those unit vectors, one per class, are the columns of a linear
classifier over L2-normalised image features.

Works with any "CLIP bundle": an object with `encode_image(images NHWC float32)
-> (B, D)`, `encode_text(token_ids int32 (B, 77)) -> (B, D)` (unnormalised),
`preprocess(pil) -> (H, W, 3) float32`, `tokenize(list[str]) -> int32 (B, 77)`
and `image_size`, e.g. the one `clip_jax.load` returns.

Image batches are split over every device of a data-parallel mesh (each host
passes only the rows it read); the counts are reduced on the devices, so a
multi-host run reports global numbers.

Ties: a label counts as within the top k when fewer than k *other* classes
score at least as high as it (ties and NaN scores count against the model), so
results never depend on class order.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from clip_jax import eval_data
from clip_jax.model import normalize
from common.metrics import configure_logging
from common.sharding import (batch_axis_size, batch_sharding, check_batch_divisible, make_mesh,
                             replicated, shard_batch)

log = logging.getLogger(__name__)

# The paper's baseline prompt (section 3.1.4: "A photo of a {label}.").
SINGLE_TEMPLATE = "a photo of a {}."


def load_templates(kind: str = "all") -> tuple[str, ...]:
    """CLIP's 80 ImageNet prompt templates ("all") or the single baseline prompt ("single").

    Each template holds "{}" where the class name goes.
    """
    if kind == "all":
        return eval_data.data_lines("imagenet_templates.txt")
    if kind == "single":
        return (SINGLE_TEMPLATE,)
    raise ValueError(f"Unknown template set {kind!r}; expected 'all' or 'single'.")


def load_classnames() -> tuple[str, ...]:
    """CLIP's 1,000 cleaned ImageNet class names, in ILSVRC2012 class-index order."""
    return eval_data.data_lines("imagenet_classnames.txt")


def _pad_rows(x: np.ndarray, rows: int, fill: Any = 0) -> np.ndarray:
    x = np.asarray(x)
    if len(x) == rows:
        return x
    return np.concatenate([x, np.full((rows - len(x), *x.shape[1:]), fill, x.dtype)])


def _host_multiple(mesh: Mesh) -> int:
    """Rows per host must be a multiple of this for the batch to split over the mesh."""
    return max(1, batch_axis_size(mesh) // jax.process_count())


def embed_texts(bundle: Any, texts: Sequence[str], *, batch_size: int = 256, mesh: Mesh | None = None,
                desc: str = "text") -> np.ndarray:
    """L2-normalised text features (N, D) float32 of `texts`; every host passes the same texts."""
    tokens = np.asarray(bundle.tokenize(list(texts)), np.int32)  # (N, context_length)
    return embed_rows(bundle.encode_text, tokens, batch_size=batch_size, mesh=mesh, desc=desc)


def embed_rows(encode: Any, rows: np.ndarray, *, batch_size: int = 256, mesh: Mesh | None = None,
               desc: str = "rows") -> np.ndarray:
    """L2-normalised features (N, D) float32 of `encode` over `rows` (N, ...), which every host holds whole.

    Each device encodes its slice of a batch; the features come back replicated, so every host gets
    them all, whatever the sharding of the parameters `encode` closes over (FSDP across hosts too).
    """
    mesh = mesh or make_mesh("data_parallel")
    ways = batch_axis_size(mesh)
    batch_size = math.ceil(batch_size / ways) * ways  # one compiled shape, split evenly
    gather = jax.jit(normalize, out_shardings=replicated(mesh))
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=jax.process_index() != 0):
        chunk = rows[start:start + batch_size]
        host = _pad_rows(chunk, batch_size)  # (B, ...)
        placed = jax.make_array_from_callback(host.shape, batch_sharding(mesh, host.ndim), lambda idx: host[idx])
        out.append(np.asarray(gather(encode(placed)))[:len(chunk)])
    if not out:
        raise ValueError(f"Expected at least one row to embed ({desc}), found none.")
    return np.concatenate(out)


def zero_shot_weights(bundle: Any, classnames: Sequence[str], templates: Sequence[str], *,
                      batch_size: int = 256, mesh: Mesh | None = None) -> np.ndarray:
    """Prompt-ensembled zero-shot classifier, float32 (D, C) with unit-norm columns.

    Column c = normalize(mean_t normalize(encode_text(template_t.format(classname_c)))),
    as `zeroshot_classifier` in the CLIP notebook.
    """
    if not classnames or not templates:
        raise ValueError(f"Expected class names and templates, found {len(classnames)} and {len(templates)}.")
    if any("{}" not in t for t in templates):
        raise ValueError(f"Every template needs a '{{}}' for the class name; found {list(templates)}.")
    prompts = [t.replace("{}", name) for name in classnames for t in templates]
    features = embed_texts(bundle, prompts, batch_size=batch_size, mesh=mesh, desc="class prompts")
    per_class = features.reshape(len(classnames), len(templates), -1).mean(axis=1, dtype=np.float64)  # (C, D)
    per_class /= np.linalg.norm(per_class, axis=-1, keepdims=True)
    return per_class.T.astype(np.float32)  # (D, C)


def _correct_at_k(logits: jax.Array, labels: jax.Array, ks: tuple[int, ...]) -> jax.Array:
    """(B, C) scores, (B,) labels -> bool (B, len(ks)): label within the top k (ties count against)."""
    logits = logits.astype(jnp.float32)
    label_score = jnp.take_along_axis(logits, labels[:, None], axis=1)  # (B, 1)
    # Classes not strictly below the label's score, the label itself excluded.
    rank = jnp.sum(~(logits < label_score), axis=1) - 1  # (B,)
    return rank[:, None] < jnp.asarray(ks)[None, :]


def accuracy(logits: Any, labels: Any, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of (N, C) scores against (N,) labels: {"top1": ..., "top5": ...}, fractions.

    A k at or above the number of classes gives 1.0 (for finite scores).
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels, jnp.int32)
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or not len(labels):
        raise ValueError(f"Expected logits (N, C) and labels (N,) with N > 0, found {logits.shape}, {labels.shape}.")
    correct = _correct_at_k(logits, labels, tuple(topk)).mean(axis=0)
    return {f"top{k}": float(c) for k, c in zip(topk, correct)}


def _batch_counts(features: jax.Array, weights: jax.Array, labels: jax.Array, status: jax.Array,
                  ks: tuple[int, ...]) -> jax.Array:
    """int32 [valid rows, corrupt rows, correct@k for k in ks] of one global batch."""
    logits = normalize(features) @ weights  # (B, C)
    valid = status == eval_data.STATUS_OK
    correct = _correct_at_k(logits, labels, ks) & valid[:, None]
    return jnp.concatenate([jnp.stack([valid.sum(), (status == eval_data.STATUS_CORRUPT).sum()]),
                            correct.sum(axis=0)]).astype(jnp.int32)


def encode_image_batch(bundle: Any, batch: Mapping[str, np.ndarray], mesh: Mesh) -> tuple[jax.Array, dict]:
    """Pads this host's batch to split over the mesh, places it, encodes it.

    Returns (features (B_global, D) sharded over the batch axes, the placed batch
    with "label", "status" and "index" where present). Padded rows get status
    STATUS_PADDING.
    """
    rows = len(batch["image"])
    padded_rows = math.ceil(rows / _host_multiple(mesh)) * _host_multiple(mesh)
    status = batch.get("status", np.full((rows,), eval_data.STATUS_OK, np.int8))
    host = {"image": _pad_rows(np.asarray(batch["image"], np.float32), padded_rows),
            "status": _pad_rows(np.asarray(status, np.int8), padded_rows, eval_data.STATUS_PADDING)}
    for key in ("label", "index"):
        if key in batch:
            host[key] = _pad_rows(np.asarray(batch[key], np.int32), padded_rows, -1 if key == "index" else 0)
    placed = shard_batch(host, mesh)
    return bundle.encode_image(placed.pop("image")), placed


def evaluate(bundle: Any, batches: Iterable[Mapping[str, np.ndarray]], weights: Any, *,
             topk: Sequence[int] = (1, 5), mesh: Mesh | None = None, total: int | None = None) -> dict[str, Any]:
    """Zero-shot top-k accuracy of `weights` (D, C) over streamed image batches.

    Each batch is this host's rows: {"image": (B, H, W, 3) preprocessed, "label":
    (B,)} and optionally "status" (B,) as `eval_data.batches` makes it (rows that
    are not STATUS_OK are left out of the counts; STATUS_CORRUPT rows are
    counted as skipped). Rows are padded to split over all devices.

    Returns {"top1": fraction, "top5": ..., "n": images scored, "correct":
    {"top1": count, ...}, "skipped": corrupt images}.
    """
    mesh = mesh or make_mesh("data_parallel")
    ks = tuple(int(k) for k in topk)
    weights = jax.device_put(jnp.asarray(weights, jnp.float32), replicated(mesh))
    count = jax.jit(functools.partial(_batch_counts, ks=ks), out_shardings=replicated(mesh))
    totals = np.zeros(2 + len(ks), np.int64)
    for batch in tqdm(batches, total=total, desc="zero-shot", unit="batch", disable=jax.process_index() != 0):
        features, placed = encode_image_batch(bundle, batch, mesh)
        totals += np.asarray(count(features, weights, placed["label"], placed["status"]))
    n, skipped = int(totals[0]), int(totals[1])
    correct = {f"top{k}": int(c) for k, c in zip(ks, totals[2:])}
    fractions = {name: (c / n if n else float("nan")) for name, c in correct.items()}
    return {**fractions, "n": n, "correct": correct, "skipped": skipped}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clip_jax.zeroshot",
        description="Zero-shot classification accuracy of a CLIP model (CLIP paper section 3.1).")
    parser.add_argument("--model", default="ViT-B/32", help="variant name, e.g. ViT-B/32 or RN50")
    parser.add_argument("--weights", help="checkpoint path given to clip_jax.load (default: --model)")
    parser.add_argument("--dataset", default="imagenet2012", choices=sorted(eval_data.DATASETS) + ["folder"],
                        help="evaluation set; 'folder' is any --image-folder tree, classes named by folder")
    parser.add_argument("--data-dir", help="tfds data_dir (default: tfds' own, ~/tensorflow_datasets)")
    parser.add_argument("--tfds-name", help="tfds name with config/version, e.g. imagenet_v2/topimages")
    parser.add_argument("--split", help="split (default: the dataset's evaluation split)")
    parser.add_argument("--image-folder", help="read images from DIR/<class>/... instead of tfds")
    parser.add_argument("--reader", default="auto", choices=["auto", "data_source", "tf"],
                        help="tfds reader: data_source (ArrayRecord, no TensorFlow) or tf (TFRecord)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size (all hosts)")
    parser.add_argument("--templates", default="all", choices=["all", "single"],
                        help="80 ensembled prompts, or 'a photo of a {}.'")
    parser.add_argument("--num-threads", type=int, default=16, help="image decoding threads per host")
    parser.add_argument("--out", help="write the results JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    configure_logging()
    from common.sharding import initialize_distributed
    initialize_distributed()
    import clip_jax

    started = time.time()
    try:
        if args.dataset == "folder":
            if not args.image_folder:
                raise SystemExit("--dataset folder needs --image-folder DIR.")
            source = eval_data.image_folder_source(args.image_folder, split=args.split or "folder")
        else:
            source = eval_data.open_source(args.tfds_name or args.dataset, split=args.split,
                                           data_dir=args.data_dir, image_folder=args.image_folder,
                                           reader=args.reader)
    except eval_data.DatasetNotFoundError as err:
        raise SystemExit(str(err)) from err
    bundle = clip_jax.load(args.weights or args.model)
    mesh = make_mesh("data_parallel")
    check_batch_divisible(args.batch_size, mesh)
    host_batch = args.batch_size // jax.process_count()
    templates = load_templates(args.templates)
    log.info("%s: %d images, %d classes, %d templates", source.description, source.num_examples,
             len(source.classnames), len(templates))
    weights = zero_shot_weights(bundle, source.classnames, templates, batch_size=args.batch_size, mesh=mesh)

    shard = (jax.process_index(), jax.process_count())
    num_batches = math.ceil(math.ceil(source.num_examples / shard[1]) / host_batch)
    skip_log = eval_data.SkipLog()
    stream = eval_data.batches(source.records(*shard), bundle.preprocess, batch_size=host_batch,
                               image_size=bundle.image_size, num_batches=num_batches,
                               num_threads=args.num_threads, skip_log=skip_log)
    metrics = evaluate(bundle, stream, weights, mesh=mesh, total=num_batches)
    for reason in skip_log.reasons:
        log.warning("skipped %s", reason)
    results = {"model": args.model if not args.weights else f"inferred from {args.weights}", "weights": args.weights, "dataset": source.name, "split": source.split,
               "source": source.description, "templates": args.templates, "num_templates": len(templates),
               "num_classes": len(source.classnames), "top1": metrics["top1"], "top5": metrics["top5"],
               "n": metrics["n"], "correct": metrics["correct"], "skipped": metrics["skipped"], "time": round(time.time() - started, 2)}
    if jax.process_index() == 0:
        print(f"{source.name} {source.split}: top-1 {100 * results['top1']:.2f}%  "
              f"top-5 {100 * results['top5']:.2f}%  ({results['n']} images, {results['skipped']} skipped)")
        print(json.dumps(results, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
