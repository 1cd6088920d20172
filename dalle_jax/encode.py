"""Encode an image-caption source into array_record shards of (caption, int16 dVAE codes).

    python -m dalle_jax.encode --encoder encoder.pkl --trust-pickle --shards '/data/cc3m/*.tar' --out /data/cc3m_codes

Stage 2 of DALL·E trains on the codes of a frozen dVAE, so every image is
encoded once: the source goes through the shared pipeline in evaluation mode
(one pass, each record exactly once, corrupt images skipped and counted),
resized and centre-cropped to the dVAE's input size, encoded on every device
of the mesh, and each host writes its own records to
`out/codes-p<process>-<n>.array_record` (`common.data.writers`), which
`common.data.sources.ArrayRecordSource` reads back for training. Codes are
stored as int16 (codebooks up to 32,768) with their (h, w) shape.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from common import sharding
from common.cli import output_dir, positive_int, start_data_parallel
from common.data.pipeline import make_pipeline
from common.data.sources import ImageFolderSource, TarShardSource
from common.data.transforms import CenterCrop, DecodeImage, Select, SkipRecord, field_value
from common.data.writers import write_array_records
from common.metrics import progress_bar
from dalle_jax.api import encode_to_codes, load_dvae

EncodeFn = Callable[[jax.Array], jax.Array]  # uint8 (B, S, S, 3) -> int (B, h, w), jittable


def captions_as_json(record: dict, rng: np.random.Generator) -> dict:
    """caption (one string or several) -> "captions": a JSON list, which batches as one string per record."""
    caption = field_value(record, "caption")
    if caption is None or not any(c.strip() for c in ((caption,) if isinstance(caption, str) else caption)):
        raise SkipRecord("missing_caption", f"{record.get('key')}: no usable caption")
    return {**record, "captions": json.dumps([caption] if isinstance(caption, str) else list(caption))}


def encoded_records(source: Any, encode: EncodeFn, *, image_size: int, global_batch_size: int,
                    mesh: jax.sharding.Mesh) -> Iterator[dict[str, Any]]:
    """{"caption": str or tuple of str, "codes": int16 (h, w), "source_index": int64} for every usable
    record of this host; records without a caption are skipped and counted."""
    sharding.check_batch_divisible(global_batch_size, mesh)
    transform = [captions_as_json, DecodeImage(), CenterCrop(image_size), Select("image", "captions", "index")]
    batches = make_pipeline(source, transform,
                            global_batch_size=global_batch_size, train=False, num_epochs=1, pad_last_batch=True)
    step = jax.jit(encode, out_shardings=sharding.batch_sharding(mesh, 3))
    bar = progress_bar(batches.num_batches, "encoding", enabled=None if jax.process_index() == 0 else False)
    with sharding.use_mesh(mesh):
        for batch in batches:
            codes = step(sharding.shard_batch(batch["image"], mesh))  # (B, h, w), split over the batch axes
            codes = np.asarray(multihost_utils.global_array_to_host_local_array(codes, mesh, P(sharding.BATCH_AXES)))
            for row in np.flatnonzero(batch["valid"]):
                captions = tuple(json.loads(str(batch["captions"][row])))
                yield {"caption": captions[0] if len(captions) == 1 else captions, "codes": codes[row].astype(np.int16),
                       "source_index": np.int64(batch["index"][row])}
            bar.update(1)
    bar.close()
    stats = batches.stats()
    if stats["skipped_total"]:
        print(f"skipped {stats['skipped_total']} records: {stats['skipped']}")


def write_code_shards(source: Any, encode: EncodeFn, out_dir: str, *, image_size: int, global_batch_size: int,
                      mesh: jax.sharding.Mesh, records_per_shard: int = 10_000) -> list[str]:
    """Writes this host's records (`encoded_records`) to `out_dir`; returns the paths written."""
    records = encoded_records(source, encode, image_size=image_size, global_batch_size=global_batch_size, mesh=mesh)
    return write_array_records(records, out_dir, records_per_shard=records_per_shard,
                               prefix=f"codes-p{jax.process_index():03d}")


def dvae_encoder(params: Any, config: Any, dtype: Any = jnp.float32) -> EncodeFn:
    """The `EncodeFn` of a dVAE encoder: argmax codes of uint8 images (`dalle_jax.api.encode_to_codes`)."""
    return lambda images: encode_to_codes(params, images.astype(jnp.float32) / 255.0, config=config, dtype=dtype)


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, help="dVAE encoder weights (OpenAI encoder.pkl or a state dict)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow OpenAI's pickled encoder.pkl")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--shards", help="img2dataset tar shards: a directory, glob or file")
    where.add_argument("--images", help="an image folder with captions.tsv or captions.jsonl")
    parser.add_argument("--out", type=output_dir, required=True, help="output directory of array_record shards")
    parser.add_argument("--image-size", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=64, help="global batch size")
    parser.add_argument("--records-per-shard", type=positive_int, default=10_000)
    args = parser.parse_args(argv)
    mesh = start_data_parallel(parser, args.batch_size)
    dvae = load_dvae(args.encoder, None, trust_pickle=args.trust_pickle)
    source = TarShardSource(args.shards) if args.shards else ImageFolderSource(args.images)
    return write_code_shards(source, dvae_encoder(dvae.encoder_params, dvae.config), args.out,
                             image_size=args.image_size, global_batch_size=args.batch_size, mesh=mesh,
                             records_per_shard=args.records_per_shard)


if __name__ == "__main__":
    main()
