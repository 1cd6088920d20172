"""The grain pipeline: sources, sharding, determinism, bad records, truncation, resume, evaluation
(transforms: tests/test_transforms.py; the shared records and builder: tests/helpers/pipeline_cases.py).

Data comes from the shapes dataset written to disk by `common/data/writers.py`
(tar shards, an image folder, array_record shards) or built into a tiny tfds
dataset, so what the pipeline reads can be compared with what was written.
Images are 32 px.
"""

import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from common.data import sources
from common.data.shapes import ShapesConfig, ShapesDataset
from common.data.transforms import (
    CenterCrop,
    DalleAugment,
    DecodeImage,
    Select,
)
from common.data.writers import encode_image, write_array_records, write_image_folder, write_tar_shards
from common.tokenizers.clip_bpe import default_tokenizer
from tests.helpers.pipeline_cases import N, SIZE, image_text, pipe, pixels, take
from tests.helpers.without_tensorflow import run_without_tensorflow

# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


def test_sources_read_what_the_writers_wrote(shapes, tar_dir, folder, tmp_path):
    write_array_records(({"image": shapes[i]["image"], "caption": shapes[i]["caption"],
                          "codes": np.full((2, 2), i, np.int16)} for i in range(N)), tmp_path, records_per_shard=50)
    all_sources = {
        "tar": sources.TarShardSource(tar_dir),
        "folder_tsv": sources.ImageFolderSource(folder),
        "folder_jsonl": sources.ImageFolderSource(folder, captions_file=folder / "labels.jsonl", image_field="path"),
        "shapes": sources.ShapesSource(shapes),
        "array_record": sources.ArrayRecordSource(tmp_path),
        "list": sources.ListSource([{"image": shapes[i]["image"], "caption": shapes[i]["caption"]} for i in range(N)]),
    }
    for name, source in all_sources.items():
        assert len(source) == N, name
        for i in (0, 49, 50, 77, N - 1):  # across tar and array_record shard boundaries
            record = source[i]
            assert record["index"] == i and record["caption"] == shapes[i]["caption"], name
            np.testing.assert_array_equal(pixels(record), shapes[i]["image"], err_msg=name)
    assert len(all_sources["tar"].paths) == 3 and len(all_sources["array_record"].paths) == 3
    codes = all_sources["array_record"][77]["codes"]
    assert codes.dtype == np.int16 and codes.tolist() == [[77, 77], [77, 77]]
    assert all_sources["shapes"][5]["color_id"] == shapes[5]["color_id"]
    with pytest.raises(IndexError):
        all_sources["tar"][N]


def test_tar_index_cache_is_reused_until_the_shard_changes(shapes, tmp_path):
    write_tar_shards([shapes[i] for i in range(6)], tmp_path / "tars", examples_per_shard=3)
    index_dir = tmp_path / "index"
    first = sources.TarShardSource(tmp_path / "tars", index_dir=str(index_dir))
    caches = sorted(os.listdir(index_dir))
    assert len(caches) == 2 and all(c.endswith(".index.npz") for c in caches)
    stamps = [os.stat(index_dir / c).st_mtime_ns for c in caches]
    again = sources.TarShardSource(tmp_path / "tars", index_dir=str(index_dir))
    assert [os.stat(index_dir / c).st_mtime_ns for c in caches] == stamps  # read, not rewritten
    assert [again[i]["caption"] for i in range(6)] == [first[i]["caption"] for i in range(6)]
    # Rewriting a shard with other content invalidates its cached index.
    write_tar_shards([shapes[i] for i in range(10, 14)], tmp_path / "tars", examples_per_shard=4)
    changed = sources.TarShardSource(tmp_path / "tars", index_dir=str(index_dir))
    assert len(changed) == 4 + 3 and changed[0]["caption"] == shapes[10]["caption"]


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _bad_tar(path, shapes, good, long_captions=False):
    """A shard mixing good records (shapes indices `good`) with bad ones; returns expected skip counts.

    With `long_captions`, every third good record's caption is too long for 77 tokens.
    """
    png = lambda i: encode_image(shapes[i]["image"])  # noqa: E731
    with tarfile.open(path, "w") as tar:
        for n, i in enumerate(good):
            caption = shapes[i]["caption"] + " on a sunny day" * (30 if long_captions and n % 3 == 0 else 0)
            _add(tar, f"g{i:04d}.png", png(i))
            if n % 2:  # caption from the .json when there is no .txt, as img2dataset may write
                _add(tar, f"g{i:04d}.json", json.dumps({"caption": caption}).encode())
            else:
                _add(tar, f"g{i:04d}.txt", caption.encode())
            if n % 5 == 1:
                _add(tar, f"c{i:04d}.png", png(i)[:40])  # truncated PNG: corrupt
                _add(tar, f"c{i:04d}.txt", b"a corrupt one")
            if n % 7 == 2:
                _add(tar, f"e{i:04d}.png", png(i))
                _add(tar, f"e{i:04d}.txt", b" \t ")  # whitespace-only caption
            if n % 9 == 4:
                _add(tar, f"m{i:04d}.txt", b"a caption without its image")
                _add(tar, f"n{i:04d}.png", png(i))  # an image without any caption
    n = range(len(good))
    return {"missing_image": sum(k % 9 == 4 for k in n), "corrupt_image": sum(k % 5 == 1 for k in n),
            "missing_caption": sum(k % 9 == 4 for k in n), "empty_caption": sum(k % 7 == 2 for k in n)}


def test_tfds_source_array_record_without_tensorflow_tfrecord_for_evaluation(shapes, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")  # tfds needs TensorFlow to *write* a dataset, not to read it

    data_dir = str(tmp_path / "tfds")
    with tfds.core.registered.skip_registration():  # read back from its files, as a user would
        class TinyCaptions(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(encoding_format="png"), "caption": tfds.features.Text(),
                    "alt": tfds.features.Sequence(tfds.features.Text())}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i in range(10):
                    yield i, {"image": shapes[i]["image"], "caption": shapes[i]["caption"],
                              "alt": [shapes[i]["caption"], f"alt {i}"]}

        TinyCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()
        TinyCaptions(data_dir=str(tmp_path / "tfrecord")).download_and_prepare()  # tfds' default format
    source = sources.TfdsSource("tiny_captions", split="train", data_dir=data_dir)
    # tfds stores examples in hashed-key order: compare (caption, pixels) as collections.
    assert len(source) == 10 and not source.sequential
    written = sorted((shapes[i]["caption"], shapes[i]["image"].tobytes()) for i in range(10))
    assert sorted((source[i]["caption"], pixels(source[i]).tobytes()) for i in range(10)) == written
    alt = sources.TfdsSource("tiny_captions", split="train[2:]", data_dir=data_dir,
                             fields={"image": "image", "caption": "alt"})
    alt_captions = {alt[i]["caption"] for i in range(len(alt))}
    assert len(alt) == 8 and alt_captions < {(shapes[i]["caption"], f"alt {i}") for i in range(10)}
    with pytest.raises(ValueError, match="no feature 'text'"):
        sources.TfdsSource("tiny_captions", split="train", data_dir=data_dir, fields={"caption": "text"})

    # TFRecord: the same records in the same order, read through TensorFlow; no shuffling for training.
    tfrecord = sources.TfdsSource("tiny_captions", split="train[2:]", data_dir=str(tmp_path / "tfrecord"),
                                  fields={"image": "image", "caption": "alt"})
    assert tfrecord.sequential and [tfrecord[i] for i in (7, 0, 3)] == [alt[i] for i in (7, 0, 3)]
    small_chunks = sources.TfdsSource("tiny_captions", split="train[:3]+train[4:]", data_dir=str(tmp_path / "tfrecord"))
    small_chunks.TFRECORD_CHUNK = 2  # chunk boundaries inside and across the two parts of the split
    full = sources.TfdsSource("tiny_captions", split="train", data_dir=data_dir)
    assert [small_chunks[i]["image"] for i in range(9)] == [full[i]["image"] for i in (0, 1, 2, 4, 5, 6, 7, 8, 9)]
    with pytest.raises(ValueError, match="no random access.*--file_format array_record"):
        pipe(tfrecord)

    class UnpreparedPipelineCaptions(TinyCaptions):  # registered, so tfds knows it without files
        pass

    with pytest.raises(sources.DatasetNotFoundError,
                       match="tfds build unprepared_pipeline_captions --data_dir .* --file_format array_record"):
        sources.TfdsSource("unprepared_pipeline_captions", split="train", data_dir=str(tmp_path / "empty"))

    # A fresh interpreter where TensorFlow cannot be imported, as without the `tf` extra.
    result = run_without_tensorflow(f"""
        import grain
        from common.data import pipeline, sources, transforms
        source = sources.TfdsSource("tiny_captions", split="train", data_dir={data_dir!r})
        it = pipeline.make_pipeline(source, [transforms.DecodeImage(), transforms.CenterCrop(16),
            transforms.Select("index")], global_batch_size=5, train=False, num_epochs=1, shard_index=0,
            shard_count=1, read_options=grain.ReadOptions(num_threads=2))
        indices = [next(it)["index"].tolist() for _ in range(2)]
        result = {{"captions": [source[i]["caption"] for i in range(10)], "indices": indices}}
    """)
    assert result["captions"] == [source[i]["caption"] for i in range(10)]
    assert result["indices"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and result["tf"] is False


# --------------------------------------------------------------------------
# Sharding, shuffling, determinism
# --------------------------------------------------------------------------


def test_two_hosts_read_disjoint_shards_covering_every_epoch(shapes):
    source = sources.ShapesSource(shapes)
    epochs = {}
    for host in (0, 1):  # 60 records per host, 6 per host batch: 10 batches per epoch
        it = pipe(source, global_batch_size=12, shard_index=host, shard_count=2, num_epochs=2)
        batches = [b["index"] for b in it]
        assert len(batches) == 20 and all(b.shape == (6,) for b in batches)
        epochs[host] = [np.concatenate(batches[:10]), np.concatenate(batches[10:])]
    for epoch in (0, 1):
        first, second = set(epochs[0][epoch].tolist()), set(epochs[1][epoch].tolist())
        assert len(first) == len(second) == 60 and not first & second and first | second == set(range(N))
    for host in (0, 1):  # shuffled, and differently in every epoch
        assert epochs[host][0].tolist() != sorted(epochs[host][0].tolist())
        assert epochs[host][0].tolist() != epochs[host][1].tolist()
    with pytest.raises(ValueError, match="multiple of the 2 data-loading processes"):
        pipe(source, global_batch_size=7, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        pipe(source, shard_index=2, shard_count=2)


def test_same_seed_same_batches_other_seed_other_order(shapes):
    source = sources.ShapesSource(shapes)
    a, b = take(pipe(source, seed=3), 4), take(pipe(source, seed=3), 4)
    for x, y in zip(a, b):
        for key in ("image", "text", "index"):
            np.testing.assert_array_equal(x[key], y[key])
    other = take(pipe(source, seed=4), 4)
    assert [x["index"].tolist() for x in a] != [x["index"].tolist() for x in other]
    assert set(a[0]) == {"image", "text", "index"}  # the fields the transform selected, nothing else
    assert a[0]["image"].dtype == np.uint8 and a[0]["image"].shape == (8, SIZE, SIZE, 3)  # normalised on device
    assert a[0]["text"].dtype == np.int32 and a[0]["text"].shape == (8, 77)


# --------------------------------------------------------------------------
# Bad records, missing fields, truncation
# --------------------------------------------------------------------------


def test_bad_records_are_skipped_counted_and_logged_while_batches_stay_full(shapes, tmp_path, caplog):
    good = list(range(40))
    expected = _bad_tar(tmp_path / "bad.tar", shapes, good)
    source = sources.TarShardSource(tmp_path / "bad.tar")
    assert len(source) == 40 + sum(expected.values())  # every bad key is a record, skipped when read
    with caplog.at_level(logging.WARNING, logger="common.data.pipeline"):
        it = pipe(source, train=False, num_epochs=1)  # source order: good records are fully consumed
        batches = list(it)
    assert len(batches) == 5 and all(b["image"].shape[0] == b["text"].shape[0] == 8 for b in batches)
    served = [source[i] for b in batches for i in b["index"]]
    assert [r["caption"] for r in served] == [shapes[i]["caption"] for i in good]
    assert it.stats()["skipped"] == expected and it.stats()["examples"] == 40
    assert it.stats()["skipped_total"] == sum(expected.values())
    # Logging is rate-limited: at most the first 5 of each reason (8 records are corrupt).
    corrupt_lines = [r for r in caplog.records if "corrupt_image" in r.getMessage()]
    assert expected["corrupt_image"] == 8 and len(corrupt_lines) == 5

    # An image folder whose list names a missing file, an empty caption and a malformed line.
    root = tmp_path / "folder"
    write_image_folder([shapes[i] for i in range(16)], root, by=None)
    lines = (root / "captions.tsv").read_text().splitlines()
    lines[3] = "nowhere.png\ta file that does not exist"
    lines[5] = lines[5].split("\t")[0] + "\t   "
    lines[9] = "no tab on this line"
    (root / "captions.tsv").write_text("\n".join(lines + [f"{p}\t{c}" for p, c in
                                                          (line.split("\t") for line in lines[:3])]) + "\n")
    it = pipe(sources.ImageFolderSource(root), train=False, num_epochs=1)
    indices = np.concatenate([b["index"] for b in it]).tolist()
    assert indices == [i for i in range(19) if i not in (3, 5, 9)][:16]
    assert it.stats()["skipped"] == {"missing_image": 1, "missing_caption": 1, "empty_caption": 1}


def test_a_record_lacking_a_field_the_task_does_not_read_is_kept(shapes, tmp_path):
    # A flat folder of images, no captions file: an image-only task (the dVAE) reads every one.
    for i in range(12):
        Image.fromarray(shapes[i]["image"]).save(tmp_path / f"{i:02d}.png")
    source = sources.ImageFolderSource(tmp_path)
    assert "caption" not in source[0] and "label" not in source[0] and source.classnames == ()
    it = pipe(source, [DecodeImage(), DalleAugment(16), Select("image", "index")], num_epochs=1)
    batch = next(it)
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert it.stats()["skipped_total"] == 0
    # A task that does read captions skips every one of them, and says why.
    with pytest.raises(RuntimeError, match="all skipped.*'missing_caption': 12"):
        next(pipe(source, num_epochs=1))


def test_a_source_with_no_usable_record_fails_instead_of_spinning(shapes, tmp_path):
    root = tmp_path / "empty_captions"
    write_image_folder([dict(shapes[i], caption=" ") for i in range(4)], root, by=None)
    with pytest.raises(RuntimeError, match="all skipped.*'empty_caption': 4"):
        next(pipe(sources.ImageFolderSource(root), global_batch_size=2))


def test_over_long_captions_are_truncated_with_eot_last_and_counted(shapes, tmp_path):
    long_caption = "a very small red circle on a plain white background " * 12
    examples = [dict(shapes[i], caption=long_caption if i % 4 == 0 else shapes[i]["caption"]) for i in range(8)]
    write_image_folder(examples, tmp_path, by=None)
    it = pipe(sources.ImageFolderSource(tmp_path), train=False, num_epochs=1)
    batch = next(it)
    tok = default_tokenizer()
    for row, i in zip(batch["text"], batch["index"]):
        ids = tok.encode(examples[i]["caption"])
        expected = [tok.sot_token_id, *ids[:75], tok.eot_token_id] if len(ids) > 75 else \
            [tok.sot_token_id, *ids, tok.eot_token_id] + [0] * (75 - len(ids))
        assert row.tolist() == expected
    assert len(tok.encode(long_caption)) > 75 and batch["text"][0, -1] == tok.eot_token_id
    assert it.stats()["counts"]["truncated_captions"] == 2


# --------------------------------------------------------------------------
# Evaluation: one pass, padded, every example once
# --------------------------------------------------------------------------


def test_evaluation_counts_every_example_once_and_hosts_yield_equal_batch_counts(shapes, tmp_path):
    # 13 records, one of them (on host 0) corrupt; two hosts of 6 and 7 records; host batches of 4.
    records = [{"image": encode_image(shapes[i]["image"]), "label": i} for i in range(13)]
    records[4]["image"] = records[4]["image"][:40]
    source = sources.ListSource(records)
    transform = [DecodeImage(), CenterCrop(SIZE), Select("image", "label")]
    per_host = []
    for host in (0, 1):
        it = pipe(source, transform, train=False, num_epochs=1, pad_last_batch=True, global_batch_size=8,
                   shard_index=host, shard_count=2)
        batches = list(it)
        assert len(batches) == 2  # ceil(7 / 4) on both hosts
        assert all(b["image"].shape == (4, SIZE, SIZE, 3) and b["valid"].dtype == bool for b in batches)
        per_host.append((np.concatenate([b["label"][b["valid"]] for b in batches]), it.stats()))
    labels = np.concatenate([labels for labels, _ in per_host])
    assert sorted(labels.tolist()) == [i for i in range(13) if i != 4]
    assert [s["examples"] for _, s in per_host] == [5, 7] and per_host[0][1]["skipped"] == {"corrupt_image": 1}
    # Padded rows are zeros, real rows the records' pixels.
    last = batches[-1]
    assert last["valid"].tolist() == [True, True, True, False] and not last["image"][3:].any()
    np.testing.assert_array_equal(last["image"][0], shapes[int(last["label"][0])]["image"])
    # A host whose records fit in fewer batches pads with whole invalid ones: host 0 has 5 good of 6.
    it = pipe(source, transform, train=False, num_epochs=1, pad_last_batch=True, global_batch_size=4,
               shard_index=0, shard_count=2)
    assert [int(b["valid"].sum()) for b in it] == [2, 2, 1, 0]  # ceil(7 / 2) batches
    # Skips after the last good record are counted too.
    it = pipe(sources.ListSource(records[:5]), transform, train=False, num_epochs=1, pad_last_batch=True)
    assert [int(b["valid"].sum()) for b in it] == [4] and it.stats()["skipped"] == {"corrupt_image": 1}
    with pytest.raises(ValueError, match="num_epochs=1"):
        pipe(source, transform, train=False, pad_last_batch=True)


# --------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------


def _resume_is_bitwise(make, before=7, after=5):
    it = make()
    take(it, before)
    state = json.loads(json.dumps(it.get_state()))  # as stored in checkpoint metadata
    expected, stats = take(it, after), it.stats()
    it.close()
    resumed = make()
    resumed.set_state(state)
    got = take(resumed, after)
    resumed.close()
    for x, y in zip(expected, got):
        for key in ("image", "text", "index"):
            np.testing.assert_array_equal(x[key], y[key])
    assert resumed.stats() == stats
    return state


def test_resume_continues_bitwise_across_epochs_and_bad_records(shapes, tmp_path):
    _bad_tar(tmp_path / "bad.tar", shapes, list(range(30)), long_captions=True)
    source = sources.TarShardSource(tmp_path / "bad.tar")
    # 30 good records and 8-example batches: the 12 batches cross three epoch boundaries.
    state = _resume_is_bitwise(lambda: pipe(source, seed=5))
    assert state["batches"] == 7 and sum(state["skipped"].values()) > 0 and state["counts"]["truncated_captions"] > 0
    with pytest.raises(ValueError, match=r"'seed': \(5, 6\)"):
        pipe(source, seed=6).set_state(state)


def test_resume_with_worker_processes(shapes):
    source = sources.ShapesSource(shapes)
    state = _resume_is_bitwise(lambda: pipe(source, seed=1, worker_count=2), before=3, after=3)
    assert state["pipeline"]["worker_count"] == 2
    # Workers split the records between them; one epoch still serves each record once.
    it = pipe(source, num_epochs=1, worker_count=2)
    indices = np.concatenate([b["index"] for b in it])
    it.close()
    assert len(indices) == len(set(indices.tolist())) >= N - 2 * 8


class _MeanColourTask:
    """A 3-parameter regression on batch images and tokens: enough to see any change in the data order."""

    def init(self, rng):
        import flax.linen as nn

        return {"params": {"w": nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))(rng, (3,))}}

    def loss(self, params, model_state, batch, rng, step):
        import jax.numpy as jnp

        pred = jnp.mean(batch["image"], (1, 2)) @ params["w"]  # (b,)
        loss = jnp.mean((pred - batch["text"][:, 1].astype(jnp.float32) / 49408) ** 2)
        return loss, {}, None


def test_trainer_resumes_the_pipeline_from_its_checkpoint(n_devices, tmp_path):
    import jax

    from common import sharding
    from common.trainer import Trainer

    source = sources.ShapesSource(ShapesDataset("train", 64, ShapesConfig(image_size=16)))

    def fit(workdir, steps):
        data = pipe(source, image_text(image_size=16)[:-1] + [Select("image", "text")], global_batch_size=16)
        trainer = Trainer(_MeanColourTask(), {"total_steps": steps, "global_batch_size": 16, "checkpoint_every": 2,
                                              "progress": False, "async_checkpoints": False},
                          {"learning_rate": 0.1}, workdir, mesh=sharding.make_mesh("data_parallel"))
        result = trainer.fit(data)
        trainer.close()
        return np.asarray(jax.device_get(result.state.params["w"])), data.get_state()

    straight, straight_state = fit(tmp_path / "straight", 6)
    fit(tmp_path / "resumed", 4)  # stops, as if preempted after its step-4 checkpoint
    resumed, resumed_state = fit(tmp_path / "resumed", 6)
    np.testing.assert_array_equal(resumed, straight)
    assert resumed_state == straight_state and straight_state["batches"] == 6
    assert np.any(straight != 0)
