"""Evaluation datasets by name: which tfds split, which classes, how labels map.

An `EvalSet` is a `common.data` source of records {image, label} plus its
class names; zero-shot evaluation reads it through the one grain pipeline
(`common.data.pipeline.make_pipeline`, padded last batch). Two ways in:

* tfds (`TfdsSource`): ArrayRecord preparations without TensorFlow, TFRecord
  (tfds' default) through TensorFlow, the `tf` extra;
* an image-folder tree, one sub-folder per class (`ImageFolderSource`).

Class spaces. Every ImageNet variant in tfds labels its images with the 1,000
ILSVRC2012 classes; ImageNet-A and ImageNet-R contain only 200 of them, and are
evaluated, as in Hendrycks et al. and the CLIP paper, with a 200-way classifier
(equivalently, the 1000-way logits restricted to those classes). Labels are
mapped through WordNet ids, never assumed to line up. CIFAR class names are the
tfds label names with "_" -> " ".
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.data.sources import DatasetNotFoundError, ImageFolderSource, TfdsSource, folder_class_space

log = logging.getLogger(__name__)

_WNID = re.compile(r"n\d{8}")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one evaluation set is found and labelled.

    tfds_name: tfds builder name (append "/config" or ":version" on the
      command line to pick another).
    split: the split reported for it (the CLIP paper's evaluation split).
    classes: "imagenet", "imagenet_a", "imagenet_r" (WordNet-id class spaces)
      or "tfds" (class names from the tfds label feature).
    download: how to obtain the source files, for the missing-data message.
    """

    tfds_name: str
    split: str
    classes: str
    download: str


_AUTOMATIC = "nothing to download by hand: `tfds build` fetches the files (the building machine needs network)"
DATASETS: dict[str, DatasetSpec] = {
    "imagenet2012": DatasetSpec(
        "imagenet2012", "validation", "imagenet",
        "download ILSVRC2012_img_val.tar (https://image-net.org/download-images, registration "
        "needed) into {data_dir}/downloads/manual/; the train tar is optional"),
    "imagenet_v2": DatasetSpec("imagenet_v2", "test", "imagenet", _AUTOMATIC),
    "imagenet_a": DatasetSpec("imagenet_a", "test", "imagenet_a", _AUTOMATIC),
    "imagenet_r": DatasetSpec("imagenet_r", "test", "imagenet_r", _AUTOMATIC),
    "imagenet_sketch": DatasetSpec("imagenet_sketch", "test", "imagenet", _AUTOMATIC),
    "cifar10": DatasetSpec("cifar10", "test", "tfds", _AUTOMATIC),
    "cifar100": DatasetSpec("cifar100", "test", "tfds", _AUTOMATIC),
}
_IMAGE_FOLDER_HINT = ("Or pass --image-folder DIR with one sub-folder of images per class (ImageNet WordNet ids "
                      "such as n01440764 map to ImageNet classes).")


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A labelled evaluation set: records {image, label} of `source`, after `transforms`."""

    name: str
    split: str
    classnames: tuple[str, ...]
    source: Any  # a common.data source
    transforms: tuple[Any, ...]  # record steps before the images are decoded (label mapping)
    description: str  # where the records come from, for logs and result files


@dataclasses.dataclass(frozen=True)
class MapLabel:
    """A transform: source label index -> class index through `table`; -1 is a class outside the set."""

    table: np.ndarray
    where: str

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        label = int(self.table[record["label"]])
        if label < 0:
            raise ValueError(f"Record {record['key']} of {self.where} has label {record['label']}, outside its "
                             "evaluation classes.")
        return {**record, "label": label}


@functools.cache
def data_lines(filename: str) -> tuple[str, ...]:
    """Non-empty lines of a file in clip_jax/data (see its NOTICE for sources)."""
    text = importlib.resources.files("clip_jax").joinpath("data", filename).read_text("utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def imagenet_class_space(kind: str = "imagenet") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(wnids, CLIP class names) of "imagenet" (1000), "imagenet_a" or "imagenet_r" (200 each)."""
    synsets, names = data_lines("imagenet_synsets.txt"), data_lines("imagenet_classnames.txt")
    if kind == "imagenet":
        return synsets, names
    if kind not in ("imagenet_a", "imagenet_r"):
        raise ValueError(f"Unknown ImageNet class space {kind!r}; expected imagenet, imagenet_a or imagenet_r.")
    position = {wnid: i for i, wnid in enumerate(synsets)}
    subset = data_lines(f"{kind}_synsets.txt")
    return subset, tuple(names[position[wnid]] for wnid in subset)


def _spec(dataset: str) -> DatasetSpec:
    base = re.split(r"[/:]", dataset, maxsplit=1)[0]
    if base not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; supported: {sorted(DATASETS)}.")
    return DATASETS[base]


def _label_map(source_labels: Sequence[str], class_wnids: Sequence[str], where: str) -> np.ndarray:
    """Source label index -> index in `class_wnids`, -1 where a source class is outside it."""
    position = {wnid: i for i, wnid in enumerate(class_wnids)}
    if not all(_WNID.fullmatch(name) for name in source_labels):
        raise ValueError(f"Expected WordNet ids (n01440764, ...) as the label names of {where}, "
                         f"found {list(source_labels[:5])}...")
    return np.array([position.get(name, -1) for name in source_labels], np.int64)


def open_source(dataset: str, *, split: str | None = None, data_dir: str | None = None,
                image_folder: str | None = None) -> EvalSet:
    """The evaluation set `dataset` (a `DATASETS` key, optionally "/config" or ":version").

    With `image_folder`, the images come from that tree (see `image_folder_source`);
    otherwise from tfds in `data_dir` (tfds' default when None).
    """
    spec = _spec(dataset)
    if image_folder is not None:
        return image_folder_source(image_folder, dataset=dataset, split=split)
    return tfds_source(dataset, split=split or spec.split, data_dir=data_dir)


def image_folder_source(root: str, *, dataset: str | None = None, split: str | None = None) -> EvalSet:
    """Images under `root/<class folder>/...` (any depth), in sorted path order.

    Folder names decide the labels:
    * ImageNet WordNet ids (n01440764, ...): the dataset's ImageNet class space
      (the 200 classes for imagenet_a / imagenet_r, else all 1000) with CLIP's names;
    * integers, for an ImageNet-family dataset: ImageNet class indices (the
      layout of the ImageNetV2 tarballs, folders 0 .. 999);
    * anything else: sorted folder names are classes 0, 1, ..., named by the
      folder name with "_" replaced by " ". For an ImageNet-family `dataset`
      that is not its class space, so the set is named after the folder
      (split "folder"), with a warning.

    `split` (default: the dataset's evaluation split, or "folder") is what the results report.
    """
    kind = _spec(dataset).classes if dataset else "tfds"
    imagenet_kind = kind if kind != "tfds" else "imagenet"
    named_by_folder = False

    def class_space(folders: Sequence[str]) -> tuple[dict[str, int], tuple[str, ...]]:
        nonlocal named_by_folder
        if not folders:
            raise DatasetNotFoundError(f"Image folder {root!r} has no class sub-folders; expected one per class.")
        if all(_WNID.fullmatch(f) for f in folders):
            wnids, classnames = imagenet_class_space(imagenet_kind)
            labels = _label_map(folders, wnids, f"image folder {root!r}")
        elif kind != "tfds" and all(f.isdigit() for f in folders):
            all_wnids = imagenet_class_space("imagenet")[0]
            wnids, classnames = imagenet_class_space(kind)
            if max(int(f) for f in folders) >= len(all_wnids):
                raise ValueError(f"Integer class folders in {root!r} must be ImageNet indices 0..999.")
            labels = _label_map([all_wnids[int(f)] for f in folders], wnids, f"image folder {root!r}")
        else:
            named_by_folder = True
            return folder_class_space(folders)
        outside = [f for f, label in zip(folders, labels) if label < 0]
        if outside:
            raise ValueError(f"Class folders {outside[:5]} in {root!r} are not classes of {dataset}; "
                             "remove them or pick the matching --dataset.")
        return dict(zip(folders, labels.tolist())), classnames

    source = ImageFolderSource(root, class_space=class_space, classes=True)  # a captions file there is not read
    folder_name = os.path.basename(os.path.abspath(root))
    not_imagenet = named_by_folder and kind != "tfds"  # asked for an ImageNet set, found other folder names
    if not_imagenet:
        log.warning("The class folders of %s are neither ImageNet WordNet ids (n01440764, ...) nor ImageNet "
                    "indices, so they are evaluated as %d classes named by folder and reported as %r, not as %s.",
                    root, len(source.classnames), folder_name, dataset)
    named = dataset is not None and not not_imagenet
    return EvalSet(dataset if named else folder_name, split or (_spec(dataset).split if named else "folder"),
                   source.classnames, source, (),
                   f"image folder {source.root} ({'classes named by folder' if named_by_folder else imagenet_kind})")


def tfds_source(dataset: str, *, split: str, data_dir: str | None = None, spec: DatasetSpec | None = None) -> EvalSet:
    """A prepared tfds dataset, images kept encoded, labels mapped to the spec's class space.

    `spec` describes a dataset outside `DATASETS` (its tfds_name is then the
    builder name); by default it is looked up by `dataset`.
    """
    if spec is None:
        spec = _spec(dataset)
        name = spec.tfds_name + dataset[len(re.split(r"[/:]", dataset, maxsplit=1)[0]):]
    else:
        name = spec.tfds_name
    try:
        source = TfdsSource(name, split=split, data_dir=data_dir, fields={"image": "image", "label": "label"},
                            download=spec.download)
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(f"Dataset {dataset!r}: {err} {_IMAGE_FOLDER_HINT}") from None
    transforms: tuple[Any, ...] = ()
    classnames = source.classnames
    if spec.classes != "tfds":
        wnids, classnames = imagenet_class_space(spec.classes)
        transforms = (MapLabel(_label_map(source.classnames, wnids, f"tfds {name}"), f"{name} {split}"),)
    return EvalSet(dataset, split, classnames, source, transforms,
                   f"tfds {name} {split} ({source.file_format}) in {data_dir or 'the default data_dir'}")
