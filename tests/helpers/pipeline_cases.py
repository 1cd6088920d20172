"""Shared by the data-pipeline tests (tests/test_pipeline.py, tests/test_transforms.py): the shapes records
they write to disk, and a pipeline built the way CLIP's training builds it. Registered as a pytest plugin in
tests/conftest.py, so the fixtures below are visible to every test module."""

import grain
import numpy as np
import pytest

from common.data import pipeline
from common.data.shapes import ShapesConfig, ShapesDataset
from common.data.transforms import CenterCrop, DecodeImage, RandomResizedCrop, Select, Tokenize
from common.data.writers import write_image_folder, write_tar_shards
from common.images import decode_image

N = 120  # records in the shapes split used throughout
SIZE = 32
READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset("train", N, ShapesConfig(image_size=SIZE))


@pytest.fixture(scope="module")
def tar_dir(shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("tars")
    write_tar_shards(shapes, root, examples_per_shard=50)
    return root


@pytest.fixture(scope="module")
def folder(shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_image_folder(shapes, root)
    return root


def image_text(train=True, image_size=SIZE, context_length=77, tokenizer="clip", crop=None):
    """CLIP's steps, keeping the source index for the checks."""
    crop = crop or (RandomResizedCrop(image_size) if train else CenterCrop(image_size))
    return [Tokenize(tokenizer, context_length, random_caption=train), DecodeImage(), crop,
            Select("image", "text", "index")]


def pipe(source, transform=None, *, train=True, image_size=SIZE, context_length=77, tokenizer="clip", crop=None,
          **kwargs):
    kwargs = {"global_batch_size": 8, "shard_index": 0, "shard_count": 1, "read_options": READ, **kwargs}
    transform = transform or image_text(train, image_size, context_length, tokenizer, crop)
    return pipeline.make_pipeline(source, transform, train=train, **kwargs)


def take(it, n):
    return [next(it) for _ in range(n)]


def pixels(record):
    data = record["image"]
    return np.asarray(decode_image(data).convert("RGB")) if not isinstance(data, np.ndarray) else data
