"""Tests for the shapes dataset (common/data/shapes.py) and its writers (common/data/writers.py)."""

import hashlib
import io
import json
import os
import pickle
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.shapes import (
    BACKGROUND_STYLES,
    COLOR_RGB,
    COLORS,
    POSITION_GRID,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesConfig,
    ShapesDataset,
    heldout_combinations,
)
from common.data.writers import write_image_folder, write_tar_shards

LABEL_KEYS = ("shape", "color", "size", "position", "background", "background_style")
LABEL_LISTS = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS,
               "background": COLORS, "background_style": BACKGROUND_STYLES}
PLAIN = ShapesConfig(background_styles=("plain",))


def _words(caption, vocabulary):
    return {w for w in vocabulary if re.search(rf"\b{w}\b", caption)}


@pytest.fixture(scope="module")
def train():
    ds = ShapesDataset("train", 400)
    return ds, [ds[i] for i in range(len(ds))]


def test_items_have_images_captions_and_consistent_labels(train):
    ds, items = train
    assert len(ds) == 400
    for item in items:
        assert item["image"].shape == (64, 64, 3) and item["image"].dtype == np.uint8
        assert isinstance(item["caption"], str) and item["caption"]
        for key in LABEL_KEYS:
            assert LABEL_LISTS[key][item[f"{key}_id"]] == item[key]
        assert item["background"] != item["color"]


def test_every_shape_color_and_label_value_appears(train):
    _, items = train
    for key in ("shape", "color", "size", "position", "background_style"):
        assert {item[key] for item in items} == set(LABEL_LISTS[key]), key
    assert len(COLORS) >= 8 and len(SHAPES) >= 5


def test_deterministic_and_independent_of_access_order():
    a, b = ShapesDataset("train", 50), ShapesDataset("train", 50)
    forward = [a[i] for i in range(50)]
    backward = [b[i] for i in reversed(range(50))][::-1]
    for x, y in zip(forward, backward):
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["caption"] == y["caption"]
    np.testing.assert_array_equal(a[-1]["image"], forward[49]["image"])
    clone = pickle.loads(pickle.dumps(a))  # grain ships sources to worker processes
    np.testing.assert_array_equal(clone[7]["image"], forward[7]["image"])
    other = ShapesDataset("train", 50, ShapesConfig(seed=1))
    assert sum(np.array_equal(other[i]["image"], forward[i]["image"]) for i in range(50)) == 0
    validation = ShapesDataset("validation", 50)
    assert sum(np.array_equal(validation[i]["image"], forward[i]["image"]) for i in range(50)) == 0


def test_heldout_combinations_never_in_training():
    heldout = heldout_combinations(ShapesConfig())
    n_pairs = len(COLORS) * len(SHAPES)
    assert len(heldout) == round(0.2 * n_pairs)
    train_pairs = {(c, s) for c in COLORS for s in SHAPES} - heldout
    # Every colour and every shape keeps most of its pairs in training.
    for color in COLORS:
        assert sum((color, s) in train_pairs for s in SHAPES) >= len(SHAPES) // 2
    for shape in SHAPES:
        assert sum((c, shape) in train_pairs for c in COLORS) >= len(COLORS) // 2
    for split in ("train", "validation"):
        ds = ShapesDataset(split, 600)
        seen = {(ds[i]["color"], ds[i]["shape"]) for i in range(len(ds))}
        assert not seen & heldout, split
        assert {c for c, _ in seen} == set(COLORS) and {s for _, s in seen} == set(SHAPES)
    ds = ShapesDataset("heldout", 300)
    seen = {(ds[i]["color"], ds[i]["shape"]) for i in range(len(ds))}
    assert seen == heldout
    # The held-out pairs depend on heldout_seed / heldout_fraction, not on the image seed.
    assert heldout_combinations(ShapesConfig(seed=5)) == heldout
    assert heldout_combinations(ShapesConfig(heldout_seed=1)) != heldout
    assert len(heldout_combinations(ShapesConfig(heldout_fraction=0.5))) == n_pairs // 2


def test_captions_name_the_right_things(train):
    _, items = train
    phrases = {name: phrase for name, (_, _, phrase) in POSITION_GRID.items()}
    for item in items:
        caption = item["caption"]
        assert _words(caption, SHAPES) == {item["shape"]}, caption
        assert item["color"] in _words(caption, COLORS), caption
        assert _words(caption, COLORS) <= {item["color"], item["background"]}, caption
        if re.search(r"\b(background|backdrop)\b", caption):
            assert item["background"] in _words(caption, COLORS), caption
        assert _words(caption, SIZES) <= {item["size"]}, caption
        mentioned = {name for name, phrase in phrases.items() if phrase in caption}
        assert mentioned <= {item["position"]}, caption
        assert not re.search(r"\ba [aeiou]", caption), caption  # "an orange", not "a orange"


def test_caption_templates_vary(train):
    _, items = train
    skeletons = Counter()
    for item in items[:200]:
        text = item["caption"]
        for key in ("position", "shape", "size", "color", "background"):
            value = POSITION_GRID[item[key]][2] if key == "position" else item[key]
            text = re.sub(rf"\b{value}\b", f"<{key}>", text)
        skeletons[re.sub(r"\ban\b", "a", text)] += 1
    assert len(skeletons) >= 5, skeletons
    assert max(skeletons.values()) < 0.5 * 200


def _shape_mask(item):
    """Pixels fully covered by the shape: exactly the shape colour (backgrounds never are)."""
    return (item["image"] == np.array(COLOR_RGB[item["color"]])).all(-1)


def test_pixels_match_labels():
    ds = ShapesDataset("train", 300, PLAIN)
    areas = {}
    for i in range(len(ds)):
        item = ds[i]
        img, mask = item["image"], _shape_mask(item)
        assert mask.sum() >= 20, item["caption"]
        # Plain background: every pixel is the background, the shape, or an antialiased edge.
        bg = (img == np.array(COLOR_RGB[item["background"]])).all(-1)
        assert bg.sum() > 0.5 * img.shape[0] * img.shape[1]
        assert (~(bg | mask)).sum() < mask.sum() + 4 * np.sqrt(mask.sum()) + 60
        ys, xs = np.nonzero(mask)
        col, row, _ = POSITION_GRID[item["position"]]
        # Centre of the shape's bounding box, as a fraction of the side, along x then y.
        for cell, center in ((col, (xs.min() + xs.max() + 1) / 128), (row, (ys.min() + ys.max() + 1) / 128)):
            if cell == 0:
                assert center < 0.4, (item["caption"], item["position"], center)
            elif cell == 1:
                assert abs(center - 0.5) < 0.08, (item["caption"], item["position"], center)
            else:
                assert center > 0.6, (item["caption"], item["position"], center)
        areas.setdefault((item["shape"], item["size"]), []).append(mask.sum())
    for shape in SHAPES:
        small, medium, large = (areas.get((shape, s), []) for s in SIZES)
        assert small and large, shape
        assert max(small) < min(large), shape
        if medium:
            assert np.mean(small) < np.mean(medium) < np.mean(large), shape


def test_background_styles():
    for style in BACKGROUND_STYLES:
        ds = ShapesDataset("train", 20, ShapesConfig(background_styles=(style,)))
        for i in range(len(ds)):
            item = ds[i]
            assert item["background_style"] == style
            # The 8x8 corner farthest from the shape holds only background.
            ys, xs = np.nonzero(_shape_mask(item))
            rows = slice(56, 64) if ys.mean() < 32 else slice(0, 8)
            cols = slice(56, 64) if xs.mean() < 32 else slice(0, 8)
            corner = item["image"][rows, cols].reshape(-1, 3).astype(float)
            spread = corner.std(0).max()
            mean_dist = np.linalg.norm(corner.mean(0) - COLOR_RGB[item["background"]])
            if style == "plain":
                assert spread == 0 and mean_dist == 0
            elif style == "noise":
                assert spread > 4 and mean_dist < 20
            else:
                assert spread < 8 and mean_dist < 80


@pytest.mark.parametrize("size", [8, 17, 200])
def test_any_resolution(size):
    ds = ShapesDataset("heldout", 3, ShapesConfig(image_size=size))
    assert ds[2]["image"].shape == (size, size, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("test", 10)
    with pytest.raises(ValueError, match="image_size"):
        ShapesConfig(image_size=4)
    with pytest.raises(ValueError, match="heldout_fraction"):
        ShapesConfig(heldout_fraction=0.0)
    with pytest.raises(ValueError, match="background_styles"):
        ShapesConfig(background_styles=("stripes",))
    with pytest.raises(IndexError):
        ShapesDataset("train", 5)[5]
    with pytest.raises(ValueError, match="min_contrast"):
        ShapesDataset("train", 5, ShapesConfig(min_contrast=1000.0))


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------


def _read_shard(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _labels_of(item):
    return {k: v for k, v in item.items() if k != "image"}


def test_tar_shards_round_trip(tmp_path):
    ds = ShapesDataset("train", 25, ShapesConfig(image_size=32))
    paths = write_tar_shards(ds, tmp_path / "shards", examples_per_shard=10)
    assert [os.path.basename(p) for p in paths] == [f"shard-0000{i}.tar" for i in range(3)]
    assert sorted(os.listdir(tmp_path / "shards")) == sorted(os.path.basename(p) for p in paths)
    index = 0
    for shard, expected_count in zip(paths, (10, 10, 5)):
        members = _read_shard(shard)
        assert len(members) == 3 * expected_count
        for (img_name, img), (txt_name, txt), (json_name, meta) in zip(*[iter(members)] * 3):
            key = f"{index:09d}"
            item = ds[index]
            assert (img_name, txt_name, json_name) == (f"{key}.png", f"{key}.txt", f"{key}.json")
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(img))), item["image"])
            assert txt.decode("utf-8") == item["caption"]
            assert json.loads(meta) == {"key": key, **_labels_of(item)}
            index += 1
    assert index == 25


def test_tar_shards_are_reproducible(tmp_path):
    def digest(paths):
        return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]

    config = ShapesConfig(image_size=24)
    first = digest(write_tar_shards(ShapesDataset("train", 12, config), tmp_path / "a", 5))
    second = digest(write_tar_shards(ShapesDataset("train", 12, config), tmp_path / "b", 5))
    assert first == second
    reseeded = digest(write_tar_shards(ShapesDataset("train", 12, ShapesConfig(image_size=24, seed=3)),
                                       tmp_path / "c", 5))
    assert not set(first) & set(reseeded)


def test_tar_shards_jpeg(tmp_path):
    ds = ShapesDataset("heldout", 4, ShapesConfig(image_size=48, background_styles=("plain",)))
    (path,) = write_tar_shards(ds, tmp_path, examples_per_shard=10, image_format="jpg")
    members = _read_shard(path)
    assert [name for name, _ in members][:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    decoded = np.asarray(Image.open(io.BytesIO(members[0][1])), dtype=float)
    assert np.abs(decoded - ds[0]["image"]).mean() < 3
    with pytest.raises(ValueError, match="image_format"):
        write_tar_shards(ds, tmp_path, image_format="gif")
    with pytest.raises(ValueError, match="examples_per_shard"):
        write_tar_shards(ds, tmp_path, examples_per_shard=0)


@pytest.mark.parametrize("by", ["shape", "color", "position", None])
def test_image_folder(tmp_path, by):
    ds = ShapesDataset("train", 15, ShapesConfig(image_size=16))
    paths = write_image_folder(ds, tmp_path, by=by)
    assert len(paths) == 15
    tsv = (tmp_path / "captions.tsv").read_text("utf-8").splitlines()
    jsonl = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text("utf-8").splitlines()]
    for index, (path, line, meta) in enumerate(zip(paths, tsv, jsonl)):
        item = ds[index]
        relative, caption = line.split("\t")
        assert os.path.join(str(tmp_path), relative) == path
        expected_dir = "" if by is None else item[by].replace(" ", "_")
        assert os.path.dirname(relative) == expected_dir
        assert caption == item["caption"]
        assert meta == {"path": relative, "key": f"{index:09d}", **_labels_of(item)}
        with Image.open(path) as img:
            np.testing.assert_array_equal(np.asarray(img), item["image"])
    if by is not None:
        class_dirs = {d for d in os.listdir(tmp_path) if os.path.isdir(tmp_path / d)}
        assert class_dirs == {ds[i][by].replace(" ", "_") for i in range(15)}


def test_image_folder_rejects_unknown_label(tmp_path):
    with pytest.raises(ValueError, match="group by"):
        write_image_folder(ShapesDataset("train", 2, ShapesConfig(image_size=16)), tmp_path, by="mood")
