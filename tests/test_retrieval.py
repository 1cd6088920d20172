"""Image-text retrieval recall@k: hand-computed similarity matrices and an end-to-end CLI run."""

import json

import numpy as np
import pytest

from clip_jax import retrieval
from tests.helpers.fake_clip import FakeClip, code_image


def test_recall_hand_computed_with_ties():
    # One-hot image features make similarity[i, j] = text_features[j, i] (text rows are unit norm).
    images = np.eye(3, dtype=np.float32)
    texts = np.array([[1.0, 0.0, 0.0],   # caption 0 of image 0: its image first
                      [0.0, 0.8, 0.6],   # caption 1 of image 0: image 0 scores 0, ranked third
                      [0.6, 0.8, 0.0],   # caption 2 of image 1: first
                      [0.8, 0.0, 0.6],   # caption 3 of image 2: image 0 beats it, second
                      [0.0, 0.6, 0.8]],  # caption 4 of image 2: first
                     np.float32)
    owner = np.array([0, 0, 1, 2, 2])
    metrics = retrieval.retrieval_metrics(images, texts, owner, ks=(1, 2, 3))
    # Image 0: best own caption (0) scores 1, nothing else reaches it. Image 1: its caption 2 scores 0.8,
    # tied by caption 1 of image 0 -> counted as second. Image 2: caption 4 scores 0.8, nothing above.
    assert metrics == pytest.approx({
        "image_to_text_R@1": 2 / 3, "image_to_text_R@2": 1.0, "image_to_text_R@3": 1.0,
        "text_to_image_R@1": 3 / 5, "text_to_image_R@2": 4 / 5, "text_to_image_R@3": 1.0})
    # Scaling features changes nothing: they are normalised first.
    assert retrieval.retrieval_metrics(7 * images, 0.5 * texts, owner, ks=(1, 2, 3)) == pytest.approx(metrics)
    # Chunking the similarity matrix changes nothing either.
    assert retrieval.retrieval_metrics(images, texts, owner, ks=(1, 2, 3), chunk_size=2) == pytest.approx(metrics)


def test_recall_rejects_bad_inputs():
    images, texts = np.eye(3), np.eye(3)
    with pytest.raises(ValueError, match=r"Images \[2\] have no caption"):
        retrieval.retrieval_metrics(images, texts, [0, 1, 1])
    with pytest.raises(ValueError, match="values in"):
        retrieval.retrieval_metrics(images, texts, [0, 1, 3])
    with pytest.raises(ValueError, match="Expected features"):
        retrieval.retrieval_metrics(images, np.eye(4), [0, 1, 2, 2])


def _write_set(root):
    """Four readable images (codes 0-3) and one corrupt; captions per image as listed."""
    for code in range(4):
        code_image(code).save(root / f"img{code}.png")
    (root / "img4.png").write_bytes(b"not a png at all")
    return [("img0.png", "a red thing"), ("img0.png", "something blue"), ("img1.png", "green"),
            ("img2.png", "a yellow blob"), ("img3.png", "yellow"), ("img4.png", "a photo of red")]


def test_caption_files_tsv_and_jsonl_agree(tmp_path):
    pairs = _write_set(tmp_path)
    (tmp_path / "c.tsv").write_text("image\tcaption\n" + "".join(f"{i}\t{c}\n" for i, c in pairs))
    grouped = {}
    for image, caption in pairs:
        grouped.setdefault(image, []).append(caption)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"image": i, "captions": cs}) + "\n"
                                              for i, cs in grouped.items()))
    tsv, jsonl = retrieval.read_captions(str(tmp_path / "c.tsv")), retrieval.read_captions(str(tmp_path / "c.jsonl"))
    assert tsv.image_paths == jsonl.image_paths == tuple(str(tmp_path / f"img{i}.png") for i in range(5))
    assert tsv.captions == jsonl.captions == tuple(c for _, c in pairs)
    assert tsv.text_to_image.tolist() == jsonl.text_to_image.tolist() == [0, 0, 1, 2, 3, 4]
    (tmp_path / "bad.tsv").write_text("img0.png\tok\nmissing.png\tgone\n")
    with pytest.raises(FileNotFoundError, match="1 of 2 images"):
        retrieval.read_captions(str(tmp_path / "bad.tsv"))


def test_cli_end_to_end(tmp_path, monkeypatch, n_devices):
    import clip_jax

    pairs = _write_set(tmp_path)
    (tmp_path / "captions.tsv").write_text("".join(f"{i}\t{c}\n" for i, c in pairs))
    eye = np.eye(4, dtype=np.float32)
    bundle = FakeClip(eye, {w: eye[i] for i, w in enumerate(("red", "green", "blue", "yellow"))})
    monkeypatch.setattr(clip_jax, "load", lambda name: bundle, raising=False)
    out = tmp_path / "r.json"
    result = retrieval.main(["--captions", str(tmp_path / "captions.tsv"), "--batch-size", "8",
                             "--ks", "1,5", "--num-threads", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    # img4 is corrupt: it and its caption leave. Text->image ranks: 0, 3 ("blue" of img0 prefers img2),
    # 0, 3 ("yellow" of img2 prefers img3), 0. Image->text: img0 and img1 first; img2's only caption
    # scores 0 below four others (rank 4); img3's caption ties with img2's "yellow" (rank 1).
    assert (result["n_images"], result["n_captions"], result["skipped"]) == (4, 5, 1)
    assert result["text_to_image_R@1"] == pytest.approx(3 / 5) and result["text_to_image_R@5"] == 1.0
    assert result["image_to_text_R@1"] == pytest.approx(2 / 4) and result["image_to_text_R@5"] == 1.0
    # One image batch of 5 rows padded to 8 and split over the devices.
    assert bundle.image_calls == [((8, 16, 16, 3), n_devices)]
