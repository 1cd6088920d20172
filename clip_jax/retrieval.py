"""Zero-shot image-text retrieval with CLIP: recall@k in both directions.

The protocol of CLIP's Flickr30k / MSCOCO evaluation (Radford et al. 2021,
section 3.1 and table 13, following Karpathy & Fei-Fei's test splits): images
and captions are embedded, L2-normalised and ranked by cosine similarity.

* image -> text recall@k: an image is a hit when ANY of its captions is among
  the k captions most similar to it;
* text -> image recall@k: a caption is a hit when its image is among the k
  images most similar to it.

Ties count against the model: a correct item is within the top k when fewer
than k wrong items score at least as high as it (for image -> text, as its best
caption), so results never depend on the order of the candidates.

Caption files: TSV lines `image_path<TAB>caption` (an optional header
`image<TAB>caption`), or JSON lines `{"image": path, "caption": text}` /
`{"image": path, "captions": [text, ...]}`; several lines may name the same
image. Paths are relative to --images-root. Captions longer than the text
context are truncated as `clip.tokenize(truncate=True)` does (EOT kept last)
and counted in the results ("truncated_captions").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

import clip_jax
from clip_jax.model import normalize
from clip_jax.zeroshot import embed_rows, encode_image_batch, image_batches
from common.cli import (
    output_file,
    positive_int,
    positive_ints,
    report_results,
    start_data_parallel,
)
from common.data.sources import ListSource
from common.data.transforms import ClipTextTokenizer
from common.sharding import (
    check_batch_divisible,
    make_mesh,
    replicated,
)
from common.tokenizers.clip_bpe import default_tokenizer

log = logging.getLogger(__name__)


def retrieval_metrics(image_features: Any, text_features: Any, text_to_image: Any,
                      ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k of cosine-similarity retrieval, both directions.

    Args:
      image_features: (N_img, D), unnormalised.
      text_features: (N_txt, D), unnormalised.
      text_to_image: (N_txt,) index of each caption's image; every image needs
        at least one caption.
      ks: the k of recall@k.
      chunk_size: rows of the similarity matrix held in memory at once.
    Returns:
      {"image_to_text_R@k": fraction, ..., "text_to_image_R@k": fraction, ...}.
    """
    images = _unit(image_features)  # (N_img, D)
    texts = _unit(text_features)  # (N_txt, D)
    owner = np.asarray(text_to_image, np.int64)
    n_img, n_txt = len(images), len(texts)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(f"Expected features (N_img, D) and (N_txt, D), found {images.shape} and {texts.shape}.")
    if owner.shape != (n_txt,) or (n_txt and not 0 <= owner.min() <= owner.max() < n_img):
        raise ValueError(f"Expected text_to_image of shape ({n_txt},) with values in [0, {n_img}), "
                         f"found shape {owner.shape}" + (f", range [{owner.min()}, {owner.max()}]" if n_txt else ""))
    captionless = np.setdiff1d(np.arange(n_img), owner)
    if len(captionless):
        raise ValueError(f"Images {captionless[:5].tolist()} have no caption; every image needs one.")

    text_rank = np.empty(n_txt, np.int64)
    for start in range(0, n_txt, chunk_size):
        sims = texts[start:start + chunk_size] @ images.T  # (c, N_img)
        own = sims[np.arange(len(sims)), owner[start:start + chunk_size]][:, None]
        text_rank[start:start + chunk_size] = np.sum(~(sims < own), axis=1) - 1
    image_rank = np.empty(n_img, np.int64)
    for start in range(0, n_img, chunk_size):
        sims = images[start:start + chunk_size] @ texts.T  # (c, N_txt)
        mine = owner[None, :] == np.arange(start, start + len(sims))[:, None]  # (c, N_txt)
        best = np.max(np.where(mine, sims, -np.inf), axis=1, keepdims=True)
        image_rank[start:start + chunk_size] = np.sum(~(sims < best) & ~mine, axis=1)
    metrics = {f"image_to_text_R@{k}": float(np.mean(image_rank < k)) for k in ks}
    metrics.update({f"text_to_image_R@{k}": float(np.mean(text_rank < k)) for k in ks})
    return metrics


def _unit(x: Any) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class CaptionSet:
    """Images (first-appearance order) and their captions."""

    image_paths: tuple[str, ...]
    captions: tuple[str, ...]
    text_to_image: np.ndarray  # (N_txt,) int


def read_captions(path: str, images_root: str | None = None) -> CaptionSet:
    """Reads a TSV or JSON-lines caption file (see the module docstring); checks the images exist."""
    images_root = images_root if images_root is not None else os.path.dirname(os.path.abspath(path))
    pairs: list[tuple[str, str]] = []
    with open(path, encoding="utf-8", newline="\n") as f:  # a "\r" inside a caption does not end its line
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith((".jsonl", ".json")):
                entry = json.loads(line)
                texts = entry.get("captions", [entry["caption"]] if "caption" in entry else None)
                if "image" not in entry or not isinstance(texts, list):
                    raise ValueError(f"{path}:{number}: expected {{\"image\": ..., \"caption\": ...}} or "
                                     f"{{\"image\": ..., \"captions\": [...]}}, found {line.strip()[:200]}")
                pairs += [(entry["image"], str(t)) for t in texts]
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 2:
                raise ValueError(f"{path}:{number}: expected 'image<TAB>caption', found {len(fields)} "
                                 f"tab-separated fields in {line.strip()[:200]!r}")
            if number == 1 and [x.strip().lower() for x in fields] == ["image", "caption"]:
                continue
            pairs.append((fields[0], fields[1]))
    if not pairs:
        raise ValueError(f"No captions found in {path}.")
    position: dict[str, int] = {}
    for image, _ in pairs:
        position.setdefault(image, len(position))
    paths = tuple(os.path.join(images_root, image) for image in position)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} images named in {path} are missing under "
                                f"{images_root!r}, e.g. {missing[:5]}. Check --images-root.")
    return CaptionSet(paths, tuple(c for _, c in pairs), np.array([position[i] for i, _ in pairs], np.int64))


def tokenize_captions(captions: Sequence[str], context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """CLIP BPE ids int32 (N, context_length) of `captions`, over-long ones truncated with EOT last, and a
    bool (N,) mask of those truncated. Each distinct caption is tokenized once, as far as the context reaches."""
    to_ids = ClipTextTokenizer(default_tokenizer())
    encoded = {caption: to_ids(caption, context_length) for caption in dict.fromkeys(captions)}
    tokens = np.zeros((len(captions), context_length), np.int32)
    for row, caption in enumerate(captions):
        tokens[row] = encoded[caption][0]
    return tokens, np.array([encoded[c][1] for c in captions], bool)


def embed_images(bundle: Any, paths: Sequence[str], *, batch_size: int = 256, mesh: Mesh | None = None,
                 num_threads: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised features (N, D) float32 of the image files, and a bool (N,) mask of decodable ones.

    Each host reads a contiguous shard of `paths` (`zeroshot.image_batches`); every host gets all
    features. Rows of corrupt images are zero and False in the mask.
    """
    mesh = mesh or make_mesh("data_parallel")
    check_batch_divisible(batch_size, mesh)
    source = ListSource([{"image": path} for path in paths], name="images")
    batches = image_batches(source, bundle.image_size, fields=("index",), global_batch_size=batch_size,
                            num_threads=num_threads)
    gather = jax.jit(lambda f, index, valid: (normalize(f), index, valid), out_shardings=replicated(mesh))
    features, decoded = None, np.zeros(len(paths), bool)
    for batch in tqdm(batches, total=batches.num_batches, desc="images", unit="batch",
                      disable=jax.process_index() != 0):
        encoded, placed = encode_image_batch(bundle, batch, mesh)
        rows, index, valid = map(np.asarray, gather(encoded, placed["index"], placed["valid"]))
        if features is None:
            features = np.zeros((len(paths), rows.shape[1]), np.float32)
        features[index[valid]], decoded[index[valid]] = rows[valid], True
    return features, decoded


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clip_jax.retrieval",
                                     description="Zero-shot image-text retrieval recall@k of a CLIP model.")
    parser.add_argument("--model", default="ViT-B/32", help="variant name, e.g. ViT-B/32 or RN50")
    parser.add_argument("--weights", help="checkpoint path given to clip_jax.load (default: --model)")
    parser.add_argument("--captions", required=True, help="TSV (image<TAB>caption) or JSON-lines caption file")
    parser.add_argument("--images-root", help="directory the image paths are relative to "
                                              "(default: the caption file's directory)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="global batch size (all hosts)")
    parser.add_argument("--ks", type=positive_ints, default="1,5,10", help="comma-separated k of recall@k")
    parser.add_argument("--num-threads", type=positive_int, default=16, help="image decoding threads per host")
    parser.add_argument("--out", type=output_file, help="write the results JSON to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = _parser()
    args = parser.parse_args(argv)
    mesh = start_data_parallel(parser, args.batch_size)
    started = time.time()
    data = read_captions(args.captions, args.images_root)
    bundle = clip_jax.load(args.weights or args.model)
    tokens, truncated = tokenize_captions(data.captions, bundle.context_length)  # before the long image pass
    if truncated.any():
        log.warning("%d of %d captions are longer than the %d-token context and were truncated (EOT kept last).",
                    truncated.sum(), len(data.captions), bundle.context_length)
    image_features, decoded = embed_images(bundle, data.image_paths, batch_size=args.batch_size, mesh=mesh,
                                           num_threads=args.num_threads)
    # Corrupt images leave the evaluation together with their captions.
    kept_captions = decoded[data.text_to_image]
    new_index = np.cumsum(decoded) - 1
    text_features = embed_rows(bundle.encode_text, tokens[kept_captions], batch_size=args.batch_size, mesh=mesh,
                               desc="captions")
    metrics = retrieval_metrics(image_features[decoded], text_features, new_index[data.text_to_image[kept_captions]],
                                ks=args.ks)
    results = {"model": args.model, "weights": args.weights, "captions": args.captions,
               "images_root": args.images_root, "n_images": int(decoded.sum()), "n_captions": int(kept_captions.sum()),
               "skipped": int((~decoded).sum()), "truncated_captions": int(truncated[kept_captions].sum()), **metrics,
               "time": round(time.time() - started, 2)}
    report_results(results, "  ".join(f"{name} {100 * value:.2f}%" for name, value in metrics.items()), args.out)
    return results


if __name__ == "__main__":
    main()
