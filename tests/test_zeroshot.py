"""Zero-shot classification: the bundled CLIP lists, prompt ensembling, top-k accuracy, the CLI.

Expected numbers are worked out by hand from constructions whose answers are
known (tests/helpers/fake_clip.py), never computed by the code under test.
"""

import json
import re

import numpy as np
import pytest

from clip_jax import eval_data, zeroshot
from common.data.sources import ListSource
from common.data.writers import encode_image
from tests.helpers.fake_clip import FakeClip, code_image

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "pink")


def test_templates_are_clips_80_prompts():
    templates = zeroshot.load_templates("all")
    assert len(templates) == 80 == len(set(templates))
    assert all(t.count("{}") == 1 for t in templates)
    # First and last of the notebook's list, and the paper's baseline prompt.
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    assert "a photo of a {}." in templates
    assert zeroshot.load_templates("single") == ("a photo of a {}.",)
    with pytest.raises(ValueError, match="'all' or 'single'"):
        zeroshot.load_templates("some")


def test_classnames_synsets_and_robustness_subsets():
    names = zeroshot.load_classnames()
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert names[21] == "kite (bird of prey)" and names[134] == "crane bird" and names[517] == "construction crane"
    # The original list repeats two names, under different class indices.
    repeated = {n: [i for i, m in enumerate(names) if m == n] for n in set(names) if names.count(n) > 1}
    assert repeated == {"missile": [657, 744], "sunglasses": [836, 837]}

    synsets = eval_data.data_lines("imagenet_synsets.txt")
    assert len(set(synsets)) == 1000 and list(synsets) == sorted(synsets)
    assert all(re.fullmatch(r"n\d{8}", s) for s in synsets)
    assert synsets[0] == "n01440764" and synsets[-1] == "n15075141"
    import tensorflow_datasets as tfds  # an independent copy of the ILSVRC2012 order

    tfds_labels = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
    assert list(synsets) == tfds_labels

    for kind in ("imagenet_a", "imagenet_r"):
        wnids, subset_names = eval_data.imagenet_class_space(kind)
        assert len(set(wnids)) == 200 and list(wnids) == sorted(wnids) and set(wnids) <= set(synsets)
        assert subset_names == tuple(names[synsets.index(w)] for w in wnids)
    # ImageNet-A's first classes in the 1000-class index (natural-adv-examples, thousand_k_to_200).
    a_wnids = eval_data.imagenet_class_space("imagenet_a")[0]
    assert [synsets.index(w) for w in a_wnids[:6]] == [6, 11, 13, 15, 17, 22]
    assert eval_data.imagenet_class_space("imagenet") == (synsets, names)


def test_prompt_ensembling_normalises_each_prompt_then_the_mean(n_devices):
    # Prompt "a photo of a C." -> 3 e_C + 4 e_aux (norm 5); "a drawing of a C." -> 10 (3 e_C - 4 e_aux)
    # (norm 50). Unit prompts (0.6 e_C +- 0.8 e_aux) average to 0.6 e_C, renormalised to e_C. Skipping the
    # per-prompt normalisation would leave an e_aux component; skipping the last one a norm of 0.6.
    dim = len(COLOURS) + 1
    eye = np.eye(dim, dtype=np.float32)
    bundle = FakeClip(np.zeros((1, dim)), {**{c: 3 * eye[i] for i, c in enumerate(COLOURS)},
                                          "photo": 4 * eye[-1], "drawing": -4 * eye[-1]},
                      word_scales={"drawing": 10.0})
    weights = zeroshot.zero_shot_weights(bundle, COLOURS, ("a photo of a {}.", "a drawing of a {}."), batch_size=5)
    assert weights.shape == (dim, len(COLOURS)) and weights.dtype == np.float32
    np.testing.assert_allclose(weights, eye[:, :len(COLOURS)], atol=1e-6)
    # 14 prompts in batches rounded up to the 8 devices: two batches of 8.
    assert bundle.text_calls == [(8, 77), (8, 77)]


def test_accuracy_hand_computed_with_ties():
    logits = np.array([[0.1, 0.9, 0.3],   # label 1: first
                       [0.5, 0.5, 0.0],   # label 1: tied with class 0 -> counts as second
                       [0.2, 0.3, 0.1]])  # label 2: third
    labels = np.array([1, 1, 2])
    result = zeroshot.accuracy(logits, labels, topk=(1, 2, 5))
    assert result == pytest.approx({"top1": 1 / 3, "top2": 2 / 3, "top5": 1.0})
    with pytest.raises(ValueError, match="Expected logits"):
        zeroshot.accuracy(logits, labels[:2])


def _colour_bundle():
    """Text: class word c -> e_c. Images: code 0 -> e_0; 1 -> e_1 + .5 e_2; 2 -> e_2 + .9 e_3 + ... + .6 e_6."""
    eye = np.eye(len(COLOURS) + 1, dtype=np.float32)
    table = np.stack([eye[0], eye[1] + 0.5 * eye[2],
                      eye[2] + 0.9 * eye[3] + 0.8 * eye[4] + 0.7 * eye[5] + 0.6 * eye[6]])
    return FakeClip(table, {c: eye[i] for i, c in enumerate(COLOURS)})


# (image code, label, within top-1, within top-5)
SAMPLES = [(0, 0, 1, 1), (0, 0, 1, 1), (1, 1, 1, 1), (1, 2, 0, 1), (2, 2, 1, 1), (2, 6, 0, 1),
           (2, 0, 0, 0),   # label scores 0; six classes tie or beat it
           (0, 1, 0, 0),   # tie at 0 with five classes: rank 6 under the ties-against policy
           (1, 3, 0, 0), (2, 5, 0, 1), (2, 4, 0, 1)]


def _pixels(code, size=16):
    return np.asarray(code_image(code, (size, size)))  # uint8 (size, size, 3)


def test_evaluate_hand_computed_sharded_padded_and_masked(n_devices):
    bundle = _colour_bundle()
    weights = zeroshot.zero_shot_weights(bundle, COLOURS, zeroshot.load_templates("single"))
    images = np.stack([_pixels(code) for code, *_ in SAMPLES])
    labels = np.array([label for _, label, *_ in SAMPLES])
    # Host batches of 6 and 6 rows; the second has an invalid (padding) row, so 5 images.
    valid = np.ones(12, bool)
    valid[7] = False
    images = np.insert(images, 7, 0, axis=0)
    labels = np.insert(labels, 7, 3)
    batches = [{"image": images[:6], "label": labels[:6], "valid": valid[:6]},
               {"image": images[6:], "label": labels[6:], "valid": valid[6:]}]
    result = zeroshot.evaluate(bundle, batches, weights)
    assert result["n"] == 11 and result["skipped"] == 0
    assert result["correct"] == {"top1": sum(s[2] for s in SAMPLES), "top5": sum(s[3] for s in SAMPLES)} \
        == {"top1": 4, "top5": 8}
    assert result["top1"] == pytest.approx(4 / 11) and result["top5"] == pytest.approx(8 / 11)
    # Each 6-row batch was padded to 8 and split over all 8 devices.
    assert bundle.image_calls == [((8, 16, 16, 3), n_devices)] * 2


def test_a_set_that_is_not_a_batch_multiple_counts_each_image_once(n_devices):
    # 13 images (codes 0..12) and one corrupt, global batch 8 over 8 devices: batches of 8, 5 + 3 padding.
    eye = np.eye(3, dtype=np.float32)
    bundle = FakeClip(eye[np.arange(13) % 3], {c: eye[i] for i, c in enumerate(COLOURS[:3])})
    labels = [code % 3 for code in range(13)]
    labels[12] = 1  # the one wrong answer: code 12 looks like class 0
    records = [{"image": encode_image(_pixels(code, 10)), "label": label} for code, label in enumerate(labels)]
    records.insert(5, {"image": b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "label": 0})  # corrupt
    weights = zeroshot.zero_shot_weights(bundle, COLOURS[:3], zeroshot.load_templates("single"))
    batches = zeroshot.image_batches(ListSource(records), 16, global_batch_size=8, num_threads=2)
    result = zeroshot.evaluate(bundle, batches, weights)
    assert batches.num_batches == 2 and bundle.image_calls == [((8, 16, 16, 3), n_devices)] * 2
    assert result["n"] == 13 and result["skipped"] == 1
    assert result["correct"]["top1"] == 12 and result["top1"] == pytest.approx(12 / 13)


def test_cli_on_an_image_folder(tmp_path, monkeypatch, n_devices):
    import clip_jax

    root = tmp_path / "images"
    # Folders sort to blue=0, green=1, red=2; codes 0/1/2 look like red/green/blue (see the bundle below).
    layout = {"red": [0, 0, 0, 1], "green": [1, 1], "blue": [2, 2]}
    for folder, codes in layout.items():
        (root / folder).mkdir(parents=True)
        for i, code in enumerate(codes):
            code_image(code).save(root / folder / f"{i}.png")
    (root / "blue" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    eye = np.eye(3, dtype=np.float32)
    bundle = FakeClip(eye[[2, 1, 0]], {"blue": eye[0], "green": eye[1], "red": eye[2]})
    loaded = []
    monkeypatch.setattr(clip_jax, "load", lambda name: loaded.append(name) or bundle, raising=False)
    out = tmp_path / "results.json"
    returned = zeroshot.main(["--weights", "ckpt/vit", "--dataset", "folder", "--image-folder", str(root),
                              "--batch-size", "8", "--num-threads", "2", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == returned and loaded == ["ckpt/vit"]
    # 8 good images, the red-folder image of code 1 (green) is the only top-1 miss; 3 classes <= 5.
    assert written["n"] == 8 and written["skipped"] == 1
    assert written["top1"] == pytest.approx(7 / 8) and written["top5"] == 1.0
    assert written["num_classes"] == 3 and written["num_templates"] == 80 and written["split"] == "folder"
    assert {"model", "dataset", "time"} <= set(written)
