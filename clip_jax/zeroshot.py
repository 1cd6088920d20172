"""Zero-shot classification with CLIP: prompt-ensembled classifier weights and top-k accuracy.

Follows OpenAI's notebooks/Prompt_Engineering_for_ImageNet.ipynb (Radford et al. 2021,
section 3.1.4, "prompt engineering and ensembling"): every class name is put into
each of 80 templates, each prompt's text embedding is L2-normalised, the
normalised embeddings are averaged over templates and the mean is normalised
again; those unit vectors, one per class, are the columns of a linear
classifier over L2-normalised image features.

Works with any "CLIP bundle": an object with `encode_image(images NHWC uint8)
-> (B, D)` (normalising the pixels itself), `encode_text(token_ids int32 (B, 77))
-> (B, D)` (unnormalised), `tokenize(list[str]) -> int32 (B, 77)` and
`image_size`, e.g. the one `clip_jax.load` returns.

Images are read by the one grain pipeline (`image_batches`: one pass, padded
last batch with a `valid` mask, every host the same number of batches) and
split over every device of a data-parallel mesh (each host passes only the
rows it read); the counts are reduced on the devices, so a multi-host run
reports global numbers and counts every image exactly once.

Ties: a label counts as within the top k when fewer than k *other* classes
score at least as high as it (ties and NaN scores count against the model), so
results never depend on class order.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

import clip_jax
from clip_jax import eval_data
from clip_jax.model import normalize
from common.cli import output_file, positive_int, report_results, start_data_parallel
from common.data.pipeline import RecordIterator, make_pipeline
from common.data.sources import DatasetNotFoundError
from common.data.transforms import CenterCrop, DecodeImage, Select
from common.sharding import (
    batch_axis_size,
    batch_sharding,
    make_mesh,
    replicated,
    shard_batch,
)

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


def image_batches(source: Any, image_size: int, *, fields: Sequence[str] = ("label",), transforms: Sequence[Any] = (),
                  global_batch_size: int, num_threads: int = 16) -> RecordIterator:
    """One padded pass over `source` with CLIP's evaluation preprocessing, this host's shard.

    Batches are {"image": uint8 (B, S, S, 3) (resized and center-cropped as OpenAI CLIP does),
    <fields>, "valid": bool (B,)}; `transforms` run first (e.g. a label mapping). Corrupt images
    are skipped and counted in `stats()`.
    """
    steps = [*transforms, DecodeImage(), CenterCrop(image_size), Select("image", *fields)]
    return make_pipeline(source, steps, global_batch_size=global_batch_size, train=False, num_epochs=1,
                         pad_last_batch=True, read_options=grain.ReadOptions(
                             num_threads=num_threads, prefetch_buffer_size=max(128, 2 * global_batch_size)))


def skipped_over_hosts(batches: Any) -> int:
    """Records the pipeline `batches` skipped, summed over all hosts (0 for plain batch lists)."""
    if not hasattr(batches, "stats"):
        return 0
    return int(np.sum(multihost_utils.process_allgather(np.int64(batches.stats()["skipped_total"]))))


def _batch_counts(features: jax.Array, weights: jax.Array, labels: jax.Array, valid: jax.Array,
                  ks: tuple[int, ...]) -> jax.Array:
    """int32 [valid rows, correct@k for k in ks] of one global batch."""
    logits = normalize(features) @ weights  # (B, C)
    correct = _correct_at_k(logits, labels, ks) & valid[:, None]
    return jnp.concatenate([valid.sum()[None], correct.sum(axis=0)]).astype(jnp.int32)


def encode_image_batch(bundle: Any, batch: Mapping[str, np.ndarray], mesh: Mesh) -> tuple[jax.Array, dict]:
    """Pads this host's batch to split over the mesh, places it, encodes it.

    Returns (features (B_global, D) sharded over the batch axes, the placed batch with "valid"
    and "label" and "index" where present). Rows without "valid" count as valid; padded rows do not.
    """
    rows = len(batch["image"])
    padded_rows = math.ceil(rows / _host_multiple(mesh)) * _host_multiple(mesh)
    host = {"image": _pad_rows(batch["image"], padded_rows),
            "valid": _pad_rows(batch.get("valid", np.ones(rows, bool)), padded_rows, False)}
    for key in ("label", "index"):
        if key in batch:
            host[key] = _pad_rows(np.asarray(batch[key], np.int32), padded_rows)
    placed = shard_batch(host, mesh)
    return bundle.encode_image(placed.pop("image")), placed


def evaluate(bundle: Any, batches: Iterable[Mapping[str, np.ndarray]], weights: Any, *,
             topk: Sequence[int] = (1, 5), mesh: Mesh | None = None) -> dict[str, Any]:
    """Zero-shot top-k accuracy of `weights` (D, C) over streamed image batches.

    Each batch is this host's rows: {"image": (B, H, W, 3) uint8 pixels (or preprocessed
    floats), "label": (B,), "valid": bool (B,)}, as `image_batches` makes them; rows that are
    not valid are left out. Rows are padded to split over all devices.

    Returns {"top1": fraction, "top5": ..., "n": images scored, "correct": {"top1": count, ...},
    "skipped": records the pipeline skipped (corrupt images), over all hosts}.
    """
    mesh = mesh or make_mesh("data_parallel")
    ks = tuple(int(k) for k in topk)
    weights = jax.device_put(jnp.asarray(weights, jnp.float32), replicated(mesh))
    count = jax.jit(functools.partial(_batch_counts, ks=ks), out_shardings=replicated(mesh))
    totals = np.zeros(1 + len(ks), np.int64)
    for batch in tqdm(batches, total=getattr(batches, "num_batches", None), desc="zero-shot", unit="batch",
                      disable=jax.process_index() != 0):
        features, placed = encode_image_batch(bundle, batch, mesh)
        totals += np.asarray(count(features, weights, placed["label"], placed["valid"]))
    n = int(totals[0])
    correct = {f"top{k}": int(c) for k, c in zip(ks, totals[1:])}
    fractions = {name: (c / n if n else float("nan")) for name, c in correct.items()}
    return {**fractions, "n": n, "correct": correct, "skipped": skipped_over_hosts(batches)}


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--batch-size", type=positive_int, default=256, help="global batch size (all hosts)")
    parser.add_argument("--templates", default="all", choices=["all", "single"],
                        help="80 ensembled prompts, or 'a photo of a {}.'")
    parser.add_argument("--num-threads", type=positive_int, default=16, help="image decoding threads per host")
    parser.add_argument("--out", type=output_file, help="write the results JSON to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.dataset == "folder" and not args.image_folder:
        parser.error("--dataset folder needs --image-folder DIR")
    mesh = start_data_parallel(parser, args.batch_size)
    started = time.time()
    try:
        if args.dataset == "folder":
            eval_set = eval_data.image_folder_source(args.image_folder, split=args.split)
        else:
            eval_set = eval_data.open_source(args.tfds_name or args.dataset, split=args.split,
                                             data_dir=args.data_dir, image_folder=args.image_folder)
    except DatasetNotFoundError as err:
        raise SystemExit(str(err)) from err
    bundle = clip_jax.load(args.weights or args.model)
    templates = load_templates(args.templates)
    log.info("%s: %d images, %d classes, %d templates", eval_set.description, len(eval_set.source),
             len(eval_set.classnames), len(templates))
    weights = zero_shot_weights(bundle, eval_set.classnames, templates, batch_size=args.batch_size, mesh=mesh)
    batches = image_batches(eval_set.source, bundle.image_size, transforms=eval_set.transforms,
                            global_batch_size=args.batch_size, num_threads=args.num_threads)
    metrics = evaluate(bundle, batches, weights, mesh=mesh)
    results = {"model": args.model if not args.weights else f"inferred from {args.weights}", "weights": args.weights,
               "dataset": eval_set.name, "split": eval_set.split, "source": eval_set.description,
               "templates": args.templates, "num_templates": len(templates), "num_classes": len(eval_set.classnames),
               **{k: metrics[k] for k in ("top1", "top5", "n", "correct", "skipped")},
               "time": round(time.time() - started, 2)}
    headline = (f"{eval_set.name} {eval_set.split}: top-1 {100 * results['top1']:.2f}%  "
                f"top-5 {100 * results['top5']:.2f}%  ({results['n']} images, {results['skipped']} skipped)")
    report_results(results, headline, args.out)
    return results


if __name__ == "__main__":
    main()
