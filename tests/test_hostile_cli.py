"""Careless command lines (issue 10): bad arguments are usage errors before any work; odd data is reported honestly.

The evaluation CLIs run on a `FakeClip` (tests/helpers/fake_clip.py) over a
few solid-colour images, so each run takes about a second.
"""

import json
import logging
import os

import numpy as np
import pytest

import clip_jax
from clip_jax import retrieval, zeroshot
from dalle_jax import encode, memory_plan
from tests.helpers.fake_clip import FakeClip, code_image

EYE = np.eye(3, dtype=np.float32)
COLOURS = ("red", "green", "blue")


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")


@pytest.fixture
def bundle(monkeypatch):
    fake = FakeClip(EYE, {c: EYE[i] for i, c in enumerate(COLOURS)})
    monkeypatch.setattr(clip_jax, "load", lambda name: fake, raising=False)
    return fake


def _usage_error(main, argv, capsys, mentions):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert mentions in capsys.readouterr().err


@pytest.mark.parametrize("argv, mentions", [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-8"], "--batch-size"),
    (["--batch-size", "12"], "--batch-size"),  # does not split over the 8 devices
    (["--num-threads", "0"], "--num-threads"),
    (["--out", "{tmp}"], "is a directory"),
    (["--out", "{tmp}/missing/r.json"], "does not exist"),
    (["--dataset", "folder"], "--image-folder"),
])
def test_zeroshot_usage_errors_come_before_any_work(argv, mentions, tmp_path, capsys, monkeypatch, n_devices):
    monkeypatch.setattr(clip_jax, "load", _no_work, raising=False)
    argv = [a.format(tmp=tmp_path) for a in argv]
    folder = [] if "folder" in argv else ["--image-folder", str(tmp_path / "no_such_folder")]
    _usage_error(zeroshot.main, [*folder, *argv], capsys, mentions)


@pytest.mark.parametrize("argv, mentions", [
    (["--ks", "a,b"], "--ks"),
    (["--ks", "1,0"], "--ks"),
    (["--batch-size", "0"], "--batch-size"),
    (["--out", "{tmp}"], "is a directory"),
])
def test_retrieval_usage_errors_come_before_any_work(argv, mentions, tmp_path, capsys, monkeypatch, n_devices):
    monkeypatch.setattr(clip_jax, "load", _no_work, raising=False)
    monkeypatch.setattr(retrieval, "read_captions", _no_work)
    argv = [a.format(tmp=tmp_path) for a in argv]
    _usage_error(retrieval.main, ["--captions", "c.tsv", *argv], capsys, mentions)


def test_encode_and_memory_plan_usage_errors_come_before_any_work(tmp_path, capsys, monkeypatch, n_devices):
    monkeypatch.setattr(encode, "load_dvae", _no_work)
    (tmp_path / "file").write_text("")
    base = ["--encoder", "e.pkl", "--images", str(tmp_path)]
    _usage_error(encode.main, [*base, "--out", str(tmp_path / "file")], capsys, "not a directory")
    _usage_error(encode.main, [*base, "--out", str(tmp_path / "o"), "--batch-size", "0"], capsys, "--batch-size")
    _usage_error(encode.main, [*base, "--out", str(tmp_path / "o"), "--batch-size", "4"], capsys, "--batch-size")
    _usage_error(memory_plan.main, ["--global-batch", "0"], capsys, "--global-batch")
    _usage_error(memory_plan.main, ["--devices", "8", "-1"], capsys, "--devices")
    _usage_error(memory_plan.main, ["--variant", "13B"], capsys, "--variant")


def _colour_folder(root, layout):
    for folder, codes in layout.items():
        (root / folder).mkdir(parents=True)
        for i, code in enumerate(codes):
            code_image(code).save(root / folder / f"{i}.png")


def test_zeroshot_skips_a_dangling_link_and_names_a_non_imagenet_folder_honestly(tmp_path, bundle, caplog,
                                                                                  n_devices):
    root = tmp_path / "colours"
    _colour_folder(root, {"blue": [2], "green": [1, 1], "red": [0]})
    os.symlink(tmp_path / "gone.png", root / "red" / "dangling.png")
    with caplog.at_level(logging.WARNING, logger="clip_jax.eval_data"):
        result = zeroshot.main(["--image-folder", str(root), "--batch-size", "8", "--num-threads", "2",
                                "--templates", "single"])  # --dataset defaults to imagenet2012
    assert (result["n"], result["skipped"], result["top1"]) == (4, 1, 1.0)
    assert (result["dataset"], result["split"], result["num_classes"]) == ("colours", "folder", 3)
    assert "classes named by folder" in result["source"]
    assert any("not as imagenet2012" in r.getMessage() for r in caplog.records)


def test_retrieval_truncates_an_over_long_caption_and_counts_it(tmp_path, bundle, n_devices):
    for code in range(3):
        code_image(code).save(tmp_path / f"img{code}.png")
    captions = ["red", "green", " ".join(["blue"] * 100)]  # the last is 100 tokens: over CLIP's 77
    (tmp_path / "captions.tsv").write_text("".join(f"img{i}.png\t{c}\n" for i, c in enumerate(captions)))
    out = tmp_path / "r.json"
    result = retrieval.main(["--captions", str(tmp_path / "captions.tsv"), "--batch-size", "8", "--ks", "1",
                             "--num-threads", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert (result["n_captions"], result["truncated_captions"]) == (3, 1)
    assert result["text_to_image_R@1"] == result["image_to_text_R@1"] == 1.0


def test_an_unsupported_compute_dtype_is_refused_naming_the_supported_ones(n_devices):
    from common.config import compute_dtype
    from common.sharding import make_mesh
    from experiments import train_clip, train_dvae
    from experiments.configs import clip_vit_b32, dvae

    assert [compute_dtype(n).name for n in ("float32", "bfloat16", "float16")] == ["float32", "bfloat16", "float16"]
    clip_config, dvae_config = clip_vit_b32.get_config("smoke"), dvae.get_config("smoke")
    clip_config.model.dtype = dvae_config.model.dtype = "float64"
    allowed = "config.model.dtype='float64' is not a compute dtype; expected one of float32, bfloat16, float16"
    with pytest.raises(ValueError, match=allowed):
        train_clip.make_task(clip_config, make_mesh("data_parallel"))
    with pytest.raises(ValueError, match=allowed):
        train_dvae.make_task(dvae_config)


def test_retrieval_captions_with_a_carriage_return_stay_one_line(tmp_path):
    code_image(0).save(tmp_path / "img0.png")
    (tmp_path / "captions.tsv").write_bytes(b"img0.png\tred\rsquare\r\nimg0.png\tred\n")
    assert retrieval.read_captions(str(tmp_path / "captions.tsv")).captions == ("red\rsquare", "red")
