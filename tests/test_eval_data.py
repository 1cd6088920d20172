"""Evaluation data: tfds through ArrayRecord (no TensorFlow) and TFRecord (TensorFlow), image folders,
read through the one grain pipeline in evaluation mode.

Tiny tfds datasets are built here, in both file formats; every image is a
solid colour encoding a code (tests/helpers/fake_clip.py), so what is read can
be compared with what was written.
"""

import io

import numpy as np
import pytest

from clip_jax import eval_data, zeroshot
from common.data.sources import DatasetNotFoundError
from tests.helpers.fake_clip import CODE_STEP, code_image
from tests.helpers.without_tensorflow import run_without_tensorflow

tfds = pytest.importorskip("tensorflow_datasets")

# ClassLabel names in a deliberately unsorted order: label index 2 is stingray (ImageNet class 6,
# ImageNet-A class 0), index 0 is goldfinch (ImageNet 11, ImageNet-A 1).
WNID_NAMES = ["n01531178", "n01440764", "n01498041", "n15075141"]
WNID_RECORDS = [(0, 2), (1, 0), (2, 2), (3, 0), (4, 2), (None, 0)]  # (code, label index); None: corrupt
NAMED_NAMES = ["apple", "aquarium_fish", "maple_tree"]
NAMED_RECORDS = [(5, 1), (6, 2), (7, 0), (None, 1)]


def _png(code):
    if code is None:
        return b"\x89PNG\r\n\x1a\n" + b"\x00" * 40  # a PNG signature and garbage: corrupt
    buf = io.BytesIO()
    code_image(code, size=(12 + code, 9)).save(buf, format="PNG")
    return buf.getvalue()


def _builder_class(class_name, names, records):
    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="png"),
            "label": tfds.features.ClassLabel(names=names)}))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for key, (code, label) in enumerate(records):
            yield key, {"image": _png(code), "label": label}

    with tfds.core.registered.skip_registration():
        return type(class_name, (tfds.core.GeneratorBasedBuilder,), {
            "VERSION": tfds.core.Version("1.0.0"), "_info": _info,
            "_split_generators": _split_generators, "_generate_examples": _generate_examples})


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """{file format: data_dir} with the datasets wnid_tiny and named_tiny prepared in it."""
    pytest.importorskip("tensorflow")  # tfds needs TensorFlow to *write* any format
    dirs = {}
    for file_format in ("tfrecord", "array_record"):
        dirs[file_format] = str(tmp_path_factory.mktemp(file_format))
        for name, names, records in (("WnidTiny", WNID_NAMES, WNID_RECORDS),
                                     ("NamedTiny", NAMED_NAMES, NAMED_RECORDS)):
            builder = _builder_class(name, names, records)(data_dir=dirs[file_format], file_format=file_format)
            builder.download_and_prepare()
    return dirs


def _spec(name, classes):
    return eval_data.DatasetSpec(name, "test", classes, "made by the test")


def _read(eval_set, batch_size=4, transforms=None):
    """([(code, label)] in record order, records skipped), through the evaluation pipeline."""
    batches = zeroshot.image_batches(eval_set.source, 4, global_batch_size=batch_size, num_threads=2,
                                     transforms=eval_set.transforms if transforms is None else transforms)
    pairs = [(round(int(image[0, 0, 0]) / CODE_STEP), int(label)) for b in batches
             for image, label, valid in zip(b["image"], b["label"], b["valid"]) if valid]
    return pairs, batches.stats()["skipped_total"]


def _expected(records, label_map):
    return sorted((code, label_map[label]) for code, label in records if code is not None)


def test_tfrecord_through_tensorflow(data_dirs):
    eval_set = eval_data.tfds_source("wnid_tiny", split="test", data_dir=data_dirs["tfrecord"],
                                     spec=_spec("wnid_tiny", "imagenet"))
    assert "(tfrecord)" in eval_set.description and len(eval_set.source) == 6 and eval_set.source.sequential
    assert len(eval_set.classnames) == 1000 and eval_set.classnames[6] == "stingray"
    pairs, skipped = _read(eval_set)
    assert sorted(pairs) == _expected(WNID_RECORDS, {2: 6, 0: 11}) and skipped == 1
    # A sliced split reads the same records in the same order, in both formats.
    full = [eval_set.source[i]["image"] for i in range(6)]
    for file_format in ("tfrecord", "array_record"):
        sliced = eval_data.tfds_source("wnid_tiny", split="test[2:]", data_dir=data_dirs[file_format],
                                       spec=_spec("wnid_tiny", "imagenet")).source
        assert len(sliced) == 4 and [sliced[i]["image"] for i in (2, 3)] == full[4:]


def test_array_record_and_tfrecord_agree(data_dirs):
    for classes, label_map, names in (("imagenet_a", {2: 0, 0: 1}, None),
                                      ("tfds", {0: 0, 1: 1, 2: 2}, ("apple", "aquarium fish", "maple tree"))):
        name = "wnid_tiny" if classes != "tfds" else "named_tiny"
        records = WNID_RECORDS if classes != "tfds" else NAMED_RECORDS
        read = {fmt: eval_data.tfds_source(name, split="test", data_dir=data_dirs[fmt], spec=_spec(name, classes))
                for fmt in ("array_record", "tfrecord")}
        assert "(array_record)" in read["array_record"].description
        (pairs_ar, skipped_ar), (pairs_tf, skipped_tf) = _read(read["array_record"]), _read(read["tfrecord"])
        assert pairs_ar == pairs_tf and sorted(pairs_ar) == _expected(records, label_map)
        assert skipped_ar == skipped_tf == 1
        assert len(read["array_record"].classnames) == (200 if names is None else 3)
        if names:
            assert read["array_record"].classnames == names


def test_array_record_reads_without_tensorflow(data_dirs):
    result = run_without_tensorflow(f"""
        from clip_jax import eval_data, zeroshot
        spec = eval_data.DatasetSpec("wnid_tiny", "test", "imagenet", "")
        eval_set = eval_data.tfds_source("wnid_tiny", split="test", data_dir={data_dirs['array_record']!r}, spec=spec)
        batches = zeroshot.image_batches(eval_set.source, 4, transforms=eval_set.transforms, global_batch_size=4,
                                         num_threads=2)
        pairs = [(round(int(im[0, 0, 0]) / {CODE_STEP}), int(label)) for b in batches
                 for im, label, valid in zip(b["image"], b["label"], b["valid"]) if valid]
        try:
            eval_data.tfds_source("wnid_tiny", split="test", data_dir={data_dirs['tfrecord']!r}, spec=spec)
            error = ""
        except ImportError as err:
            error = str(err)
        result = {{"pairs": pairs, "skipped": batches.stats()["skipped_total"], "error": error}}
    """)
    assert sorted(map(tuple, result["pairs"])) == _expected(WNID_RECORDS, {2: 6, 0: 11})
    assert result["skipped"] == 1 and result["tf"] is False
    assert "`tf` extra" in result["error"] and "--file_format array_record" in result["error"]


def test_split_errors_and_labels_outside_the_classes(data_dirs):
    spec = _spec("named_tiny", "tfds")
    with pytest.raises(DatasetNotFoundError, match=r"prepared splits: \['test'\]"):
        eval_data.tfds_source("named_tiny", split="validation", data_dir=data_dirs["array_record"], spec=spec)
    # Label 1 of wnid_tiny is tench (n01440764), outside ImageNet-A's 200 classes: a wrong --dataset, not a
    # bad record.
    imagenet_a = eval_data.tfds_source("wnid_tiny", split="test", data_dir=data_dirs["array_record"],
                                       spec=_spec("wnid_tiny", "imagenet_a"))
    with pytest.raises(ValueError, match="label 1, outside its evaluation classes"):
        imagenet_a.transforms[0]({"key": "tench", "label": 1}, None)


def test_missing_dataset_says_what_to_do(tmp_path):
    with pytest.raises(eval_data.DatasetNotFoundError) as info:
        eval_data.open_source("imagenet2012", data_dir=str(tmp_path))
    message = str(info.value)
    for expected in ("'imagenet2012'", "'validation'", str(tmp_path), "ILSVRC2012_img_val.tar",
                     f"{tmp_path}/downloads/manual", f"tfds build imagenet2012 --data_dir {tmp_path}",
                     "--file_format array_record", "--image-folder"):
        assert expected in message
    with pytest.raises(eval_data.DatasetNotFoundError, match=f"tfds build cifar10 --data_dir {tmp_path}"):
        eval_data.open_source("cifar10", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
        eval_data.open_source("mnist", data_dir=str(tmp_path))
    with pytest.raises(eval_data.DatasetNotFoundError, match="does not exist"):
        eval_data.open_source("imagenet2012", image_folder=str(tmp_path / "nowhere"))


def _folder(root, layout):
    """layout: {relative path: code or None (corrupt)}."""
    for relative, code in layout.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if code is None:
            path.write_bytes(_png(None))
        else:
            code_image(code).save(path)
    return str(root)


def test_image_folder_with_wnids(tmp_path):
    root = _folder(tmp_path, {"n01498041/a.png": 0, "n01498041/deeper/b.png": 1, "n01531178/c.jpg": 2,
                              "n01531178/d.png": None})
    (tmp_path / "n01531178" / "notes.txt").write_text("not an image")
    eval_set = eval_data.open_source("imagenet2012", image_folder=root)
    assert len(eval_set.source) == 4 and len(eval_set.classnames) == 1000
    pairs, skipped = _read(eval_set)
    assert pairs == [(0, 6), (1, 6), (2, 11)] and skipped == 1
    subset = eval_data.open_source("imagenet_a", image_folder=root)
    assert _read(subset)[0] == [(0, 0), (1, 0), (2, 1)] and len(subset.classnames) == 200
    _folder(tmp_path, {"n01440764/e.png": 3})  # tench: not an ImageNet-A class
    with pytest.raises(ValueError, match=r"\['n01440764'\].*not classes of imagenet_a"):
        eval_data.open_source("imagenet_a", image_folder=root)


def test_image_folder_with_plain_and_integer_names(tmp_path):
    plain = eval_data.image_folder_source(_folder(tmp_path / "p", {"sea_lion/a.png": 0, "apple/b.png": 1}))
    assert plain.classnames == ("apple", "sea lion") and _read(plain)[0] == [(1, 0), (0, 1)]
    # ImageNetV2's layout: class-index folders, compared as numbers (9 < 10), not as strings.
    v2 = eval_data.open_source("imagenet_v2", image_folder=_folder(tmp_path / "v", {"9/a.png": 0, "10/b.png": 1}))
    assert sorted(_read(v2)[0]) == [(0, 9), (1, 10)] and len(v2.classnames) == 1000


def test_batches_are_fixed_size_ordered_padded_and_count_corrupt_records(tmp_path):
    root = _folder(tmp_path, {f"k/{i}.png": (None if i == 3 else i) for i in range(5)})
    eval_set = eval_data.image_folder_source(root)
    out = list(zeroshot.image_batches(eval_set.source, 4, fields=("index",), global_batch_size=2, num_threads=2))
    assert len(out) == 3 and all(b["image"].shape == (2, 4, 4, 3) and b["image"].dtype == np.uint8 for b in out)
    assert np.concatenate([b["valid"] for b in out]).tolist() == [True] * 4 + [False] * 2
    assert np.concatenate([b["index"] for b in out]).tolist()[:4] == [0, 1, 2, 4]  # record order, 3 skipped
    codes = [round(int(b["image"][r, 0, 0, 0]) / CODE_STEP) for b in out for r in range(2)]
    assert codes[:4] == [0, 1, 2, 4] and codes[4:] == [0, 0]
