"""Hostile and careless data (issue 10): nothing reads outside a root unnoticed, hangs, explodes or is lost.

Each test builds its tiny input in tmp_path: paths that leave a dataset's
root, special files named like images, oversized members, degenerate image
shapes, damaged caches, captions that break TSV lines or tokenizers, failed
writes and records skipped at the end of an epoch.
"""

import concurrent.futures
import logging
import os
import struct
import zlib

import grain
import numpy as np
import pytest
from PIL import Image

from common.data import pipeline, sources
from common.data.transforms import (
    CenterCrop,
    ClipTextTokenizer,
    DalleAugment,
    DecodeImage,
    RandomResizedCrop,
    Select,
    SkipRecord,
    Tokenize,
)
from common.data.writers import encode_image, write_array_records, write_image_folder, write_tar_shards
from common.images import ImageDecodeError, clip_preprocess, decode_image
from common.tokenizers.clip_bpe import ClipTokenizer, default_tokenizer
from common.tokenizers.sentencepiece import train_bpe

READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
PIXELS = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)


def _png(array: np.ndarray = PIXELS) -> bytes:
    return encode_image(array)


def _examples(n: int, **fields) -> list[dict]:
    return [{"image": PIXELS, "caption": f"picture {i}", "shape": "square", **fields} for i in range(n)]


def _pipe(source, transform, batch_size=4, **kwargs):
    return pipeline.make_pipeline(source, transform, global_batch_size=batch_size, train=False, num_epochs=1,
                                  shard_index=0, shard_count=1, read_options=READ, **kwargs)


def _skip_reason(transform, record) -> str:
    with pytest.raises(SkipRecord) as info:
        transform(record, np.random.default_rng(0))
    return info.value.reason


# --------------------------------------------------------------------------
# Paths outside a dataset's root are read, but said once
# --------------------------------------------------------------------------


def test_caption_list_entries_outside_the_root_are_logged_once(tmp_path, caplog):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    root.mkdir(), elsewhere.mkdir()
    for path in (root / "inside.png", tmp_path / "outside.png", elsewhere / "far.png"):
        path.write_bytes(_png())
    os.symlink(elsewhere / "far.png", root / "link.png")
    lines = ["inside.png\tok", "../outside.png\tup", f"{elsewhere / 'far.png'}\tabsolute", "link.png\tlinked"]
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="common.data.sources"):
        source = sources.ImageFolderSource(root)
    warnings = [r.getMessage() for r in caplog.records if "outside" in r.getMessage()]
    assert source.outside_root == 3 and len(warnings) == 1
    assert "3 of the 4 images" in warnings[0] and "../outside.png" in warnings[0]
    assert [decode_image(source[i]["image"]).size for i in range(4)] == [(8, 8)] * 4  # read anyway


def test_class_folder_images_and_tar_shards_linked_from_outside_are_logged(tmp_path, caplog):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "cat.png").write_bytes(_png())
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "cat" / "own.png").write_bytes(_png())
    os.symlink(tmp_path / "outside" / "cat.png", tmp_path / "classes" / "cat" / "linked.png")
    write_tar_shards(_examples(2), tmp_path / "outside" / "tars")
    (tmp_path / "tars").mkdir()
    os.symlink(tmp_path / "outside" / "tars" / "shard-00000.tar", tmp_path / "tars" / "shard-00000.tar")
    with caplog.at_level(logging.WARNING, logger="common.data.sources"):
        folder = sources.ImageFolderSource(tmp_path / "classes")
        tars = sources.TarShardSource(tmp_path / "tars")
        quiet = sources.TarShardSource(tmp_path / "outside" / "tars")
    messages = [r.getMessage() for r in caplog.records]
    assert folder.outside_root == 1 and len(folder) == 2 and len(tars) == len(quiet) == 2
    assert sum("1 of the 2 images" in m and "linked.png" in m for m in messages) == 1
    assert sum("1 of the 1 .tar files" in m for m in messages) == 1 and len(messages) == 2


def test_a_relative_class_folder_root_reads_its_images(tmp_path, monkeypatch):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "a.png").write_bytes(_png())
    monkeypatch.chdir(tmp_path)
    source = sources.ImageFolderSource("imgs")
    assert decode_image(source[0]["image"]).size == (8, 8) and source[0]["label"] == 0


# --------------------------------------------------------------------------
# Special files and oversized records: refused unread, skipped and counted
# --------------------------------------------------------------------------


def _finishes(fn, unblock, seconds=10.0):
    """fn() within `seconds`; else unblock() so the thread ends, and fail."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(fn)
    try:
        return future.result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        unblock()
        pytest.fail(f"still running after {seconds} s")
    finally:
        pool.shutdown(wait=True)


def test_fifos_and_devices_named_like_images_are_skipped_unread(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "good.png").write_bytes(_png())
    os.mkfifo(tmp_path / "cls" / "fifo.png")
    os.symlink("/dev/zero", tmp_path / "cls" / "zero.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "cls" / "dangling.png")

    def unblock():  # a reader blocked on the FIFO returns once a writer opens and closes it
        os.close(os.open(tmp_path / "cls" / "fifo.png", os.O_WRONLY | os.O_NONBLOCK))

    source = sources.ImageFolderSource(tmp_path)
    it = _pipe(source, [DecodeImage(), CenterCrop(8), Select("image", "label")], batch_size=1)
    batches = _finishes(lambda: list(it), unblock)
    assert len(batches) == 1
    assert it.stats()["skipped"] == {"special_file": 2, "missing_image": 1}


def test_images_over_the_byte_cap_are_skipped_as_too_large(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(_png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    assert _skip_reason(DecodeImage(max_bytes=1000), {"image": str(big)}) == "image_too_large"
    assert _skip_reason(DecodeImage(max_bytes=1000), {"image": big.read_bytes()}) == "image_too_large"
    assert DecodeImage()({"image": str(big)}, None)["image"].size == (64, 64)
    # A tar member over the cap is never read: its field says why, and the record is skipped and counted.
    examples = _examples(4)
    examples[2]["image"] = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    write_tar_shards(examples, tmp_path / "tars")
    source = sources.TarShardSource(tmp_path / "tars", max_member_bytes=2000)
    assert source[2]["image"] == sources.Unreadable("image_too_large", source[2]["image"].detail)
    it = _pipe(source, [DecodeImage(), Select("image")], batch_size=3)
    assert len(list(it)) == 1 and it.stats()["skipped"] == {"image_too_large": 1}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grey pixels, with almost no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_decoded_pixels_are_bounded_even_when_pils_guard_is_lifted(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # as some libraries do, process-wide
    with pytest.raises(ImageDecodeError, match="pixels") as info:
        decode_image(_png_header_only(20_000, 20_000))
    assert info.value.reason == "image_too_large"
    assert _skip_reason(DecodeImage(), {"image": _png_header_only(20_000, 20_000)}) == "image_too_large"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(_png(), max_pixels=63)
    assert info.value.reason == "image_too_large" and decode_image(_png(), max_pixels=64).size == (8, 8)


def test_special_tar_shards_are_refused_when_listed(tmp_path):
    os.mkfifo(tmp_path / "fifo.tar")
    with pytest.raises(sources.DatasetNotFoundError, match="not regular files"):
        sources.TarShardSource(tmp_path)


# --------------------------------------------------------------------------
# Degenerate image shapes: bounded work
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 100_000), (100_000, 1)])
def test_a_one_pixel_strip_is_cropped_without_resizing_it_whole(shape, monkeypatch):
    data = _png(np.full(shape, 128, np.uint8))
    assert len(data) < 1000
    resize = Image.Image.resize

    def bounded_resize(img, size, *args, **kwargs):  # no resize may produce far more than the kept pixels
        assert size[0] * size[1] <= 4 * 224 * 224, f"resized {img.size} to {size}"
        return resize(img, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    assert clip_preprocess(decode_image(data)).shape == (224, 224, 3)
    for crop in (CenterCrop(224), RandomResizedCrop(224), DalleAugment(224)):
        record = crop(DecodeImage()({"image": data}, None), np.random.default_rng(0))
        assert record["image"].shape == (224, 224, 3) and (record["image"] == 128).all()


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece():
    return train_bpe([f"a picture of {w} number {i}" for i in range(40) for w in ("cats", "dogs")],
                     vocab_size=300, allow_smaller_vocab=True)


def test_a_lone_surrogate_is_a_bad_caption_not_a_stopped_pipeline(sentencepiece):
    with pytest.raises(ValueError, match="surrogate"):
        sentencepiece.encode("cats \ud800 dogs")
    with pytest.raises(ValueError, match="text 1 .*surrogate"):
        sentencepiece.encode_batch(["cats", "\udfff"], 8)
    records = [{"caption": c} for c in ("cats", "dogs \ud800", "a picture", "cats dogs", "dogs")]
    it = _pipe(sources.ListSource(records), [Tokenize(sentencepiece, 8), Select("text")])
    assert len(list(it)) == 1 and it.stats()["skipped"] == {"bad_caption": 1}


def test_clip_truncation_flag_is_exact_without_a_full_encode():
    class NoFullEncode(ClipTokenizer):
        def encode(self, text):
            raise AssertionError("the truncated flag must not encode the whole caption")

    bounded, reference = ClipTextTokenizer(NoFullEncode()), default_tokenizer()
    for n_words in (3, 4, 5, 6, 7, 5000):
        caption = " ".join(["cat"] * n_words)
        ids, truncated = bounded(caption, 7)
        assert truncated == (len(reference.encode(caption)) + 2 > 7), n_words
        np.testing.assert_array_equal(ids, reference.tokenize(caption, 7, truncate=True)[0])


def test_tsv_captions_with_a_carriage_return_stay_one_record(tmp_path):
    with pytest.raises(ValueError, match="carriage return"):
        write_image_folder(_examples(1, caption="first line\rsecond line"), tmp_path / "out", by=None)
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "captions.tsv").write_bytes(b"a.png\tfirst line\rsecond line\r\na.png\tplain\n")
    source = sources.ImageFolderSource(tmp_path)
    assert [source[i]["caption"] for i in range(len(source))] == ["first line\rsecond line", "plain"]


# --------------------------------------------------------------------------
# Writers: nothing outside the output directory, no temporary files left behind
# --------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["../../escaped", "a/b", "..", ".hidden", ""])
def test_labels_that_are_not_one_path_component_are_refused(tmp_path, label):
    out = tmp_path / "deep" / "out"
    with pytest.raises(ValueError, match="one path component"):
        write_image_folder(_examples(1, shape=label), out)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []
    with pytest.raises(ValueError, match="one path component"):
        write_array_records([{"x": np.zeros(1)}], out, prefix=label or "../x")


def test_a_failed_shard_write_leaves_no_temporary_file(tmp_path):
    examples = _examples(3)
    examples[1]["image"] = np.zeros((4, 4, 3), np.float32)  # not uint8: refused part way through the shard
    with pytest.raises(ValueError, match="uint8"):
        write_tar_shards(examples, tmp_path / "tars")
    with pytest.raises(TypeError, match="Cannot store record 1"):
        write_array_records([{"x": np.zeros(2)}, {"x": object()}], tmp_path / "records")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


# --------------------------------------------------------------------------
# Tar index cache, end-of-epoch counts
# --------------------------------------------------------------------------


def test_a_damaged_tar_index_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    write_tar_shards(_examples(3), tmp_path / "tars")
    index_dir = tmp_path / "index"
    first = sources.TarShardSource(tmp_path / "tars", index_dir=str(index_dir))
    (cache,) = index_dir.iterdir()
    for damage in (b"not a zip file", cache.read_bytes()[: cache.stat().st_size // 2]):
        cache.write_bytes(damage)
        with caplog.at_level(logging.WARNING, logger="common.data.sources"):
            again = sources.TarShardSource(tmp_path / "tars", index_dir=str(index_dir))
        assert [again[i]["caption"] for i in range(3)] == [first[i]["caption"] for i in range(3)]
        assert "damaged" in caplog.records[-1].getMessage()
        with np.load(cache) as rebuilt:
            assert rebuilt["keys"].shape == (3,)


@pytest.mark.parametrize("good", [8, 10])
def test_records_skipped_after_the_last_full_batch_are_counted(good):
    records = [{"image": PIXELS} for _ in range(good)] + [{"image": None}, {"image": b"not an image"}]
    it = _pipe(sources.ListSource(records), [DecodeImage(), Select("image")])
    assert len(list(it)) == 2
    assert it.stats()["skipped"] == {"missing_image": 1, "corrupt_image": 1} and it.stats()["examples"] == 8
