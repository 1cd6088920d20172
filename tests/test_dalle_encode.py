"""Encoding an image-caption source into (caption, int16 codes) array_record shards, read back for training."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from common import sharding
from common.data.shapes import ShapesConfig, ShapesDataset
from common.data.sources import ArrayRecordSource, ImageFolderSource, ListSource
from common.data.writers import write_image_folder
from dalle_jax.api import encode_to_codes
from dalle_jax.dvae import DVAE, DVAEConfig
from dalle_jax.encode import dvae_encoder, write_code_shards

CONFIG = DVAEConfig(group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=16, n_init=8)
SIZE, N = 16, 13  # 13 images: not a multiple of the batch


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_image_folder(ShapesDataset("train", N, ShapesConfig(image_size=SIZE)), root, by=None)
    with open(root / "captions.tsv", "a") as f:
        f.write("broken.png\ta corrupt image\n")
    (root / "broken.png").write_bytes(b"\x89PNG not an image")
    return root


def test_codes_round_trip_through_array_records(folder, tmp_path):
    params = DVAE(CONFIG).init({"params": jax.random.key(0), "gumbel": jax.random.key(1)},
                               jnp.zeros((1, SIZE, SIZE, 3)), 1.0)["params"]["encoder"]
    paths = write_code_shards(ImageFolderSource(folder), dvae_encoder(params, CONFIG), str(tmp_path / "codes"),
                              image_size=SIZE, global_batch_size=8, mesh=sharding.make_mesh("data_parallel"),
                              records_per_shard=5)
    assert len(paths) == 3 and all(os.path.exists(p) for p in paths)
    source = ArrayRecordSource(str(tmp_path / "codes"))
    assert len(source) == N  # every readable image exactly once; the corrupt one skipped
    listing = ImageFolderSource(folder)
    for i in range(N):
        record = source[i]
        original = listing[int(record["source_index"])]
        assert record["caption"] == original["caption"]
        assert record["codes"].dtype == np.int16 and record["codes"].shape == (SIZE // 2, SIZE // 2)
        pixels = np.asarray(Image.open(original["image"]).convert("RGB"), np.float32)[None] / 255.0
        expected = encode_to_codes(params, jnp.asarray(pixels), config=CONFIG)[0]
        np.testing.assert_array_equal(record["codes"], expected)
    assert sorted(int(source[i]["source_index"]) for i in range(N)) == list(range(N))


def test_several_captions_are_kept_and_caption_less_records_skipped(tmp_path):
    images = ShapesDataset("train", 3, ShapesConfig(image_size=SIZE))
    records = [{"index": 0, "key": "a", "image": images[0]["image"], "caption": ("one", "two")},
               {"index": 1, "key": "b", "image": images[1]["image"], "caption": None},
               {"index": 2, "key": "c", "image": images[2]["image"], "caption": "three"}]
    encode = lambda x: jnp.zeros((x.shape[0], 2, 2), jnp.int32)  # noqa: E731
    write_code_shards(ListSource(records), encode, str(tmp_path), image_size=SIZE, global_batch_size=8,
                      mesh=sharding.make_mesh("data_parallel"))
    source = ArrayRecordSource(str(tmp_path))
    assert [source[i]["caption"] for i in range(len(source))] == [("one", "two"), "three"]
