"""Metric logging: JSONL records, TensorBoard events read back from disk, chief-only writing, plots."""

import io
import json
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from common.metrics import MetricWriter, plot_curves, progress_bar, read_jsonl, set_postfix_metrics


def _crc32c(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), independent of tensorboardX."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:  # TFRecord's mask, from tensorflow/core/lib/hash/crc32c.h
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(logdir):
    """Every Event in the TFRecord event files of ``logdir``, with both CRCs of each record checked."""
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}: {list(logdir.iterdir())}"
    events = []
    for file in files:
        data, pos = file.read_bytes(), 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            payload = data[pos + 12 : pos + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            assert header_crc == _masked(_crc32c(header)) and payload_crc == _masked(_crc32c(payload))
            event = event_pb2.Event()
            event.ParseFromString(payload)
            events.append(event)
            pos += 16 + length
    return events


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
    steps = [0, 10, 20]
    with MetricWriter(tmp_path, enabled=True) as writer:
        for step in steps:
            writer.write_scalars(step, {
                "loss": jnp.asarray(2.0 / (step + 1), jnp.float32),  # jax scalar
                "acc": np.float64(step / 100),  # numpy scalar
                "tokens": step * 1000,  # python int
            })
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == steps
    for record, step in zip(records, steps):
        assert set(record) == {"step", "time", "loss", "acc", "tokens"}
        assert record["loss"] == pytest.approx(2.0 / (step + 1), rel=1e-6)
        assert record["acc"] == step / 100 and record["tokens"] == step * 1000
    assert all(a["time"] <= b["time"] for a, b in zip(records, records[1:]))
    # The file is plain JSON, one object per line.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == steps

    scalars = {}
    for event in _read_events(tmp_path):
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    assert sorted(scalars) == ["acc", "loss", "tokens"]
    assert [s for s, _ in scalars["loss"]] == steps
    np.testing.assert_allclose([v for _, v in scalars["loss"]], [2.0 / (s + 1) for s in steps], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars["tokens"]], [s * 1000 for s in steps])


def test_images_go_to_tensorboard(tmp_path):
    images = np.zeros((2, 8, 6, 3), np.float32)
    images[..., 0] = 1.0  # red
    with MetricWriter(tmp_path, enabled=True) as writer:
        writer.write_images(5, {"samples": jnp.asarray(images)})
        with pytest.raises(ValueError, match=r"expected \(N, H, W, C\)"):
            writer.write_images(5, {"bad": images[0]})
    encoded = [(e.step, v) for e in _read_events(tmp_path) for v in e.summary.value if v.HasField("image")]
    assert len(encoded) == 1 and encoded[0][0] == 5
    picture = np.asarray(Image.open(io.BytesIO(encoded[0][1].image.encoded_image_string)).convert("RGB"))
    assert picture.shape[0] >= 8 and picture.shape[1] >= 2 * 6  # a grid of both images
    reds = np.all(picture == [255, 0, 0], axis=-1)
    assert reds.sum() == 2 * 8 * 6


def test_errors(tmp_path):
    writer = MetricWriter(tmp_path, enabled=True)
    with pytest.raises(ValueError, match="reserved"):
        writer.write_scalars(0, {"step": 1.0})
    with pytest.raises(ValueError, match="expected a scalar"):
        writer.write_scalars(0, {"loss": np.ones(3)})
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_scalars(1, {"loss": 1.0})


def test_non_chief_process_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    logdir = tmp_path / "host1"
    with MetricWriter(logdir) as writer:
        assert not writer.enabled
        writer.write_scalars(0, {"loss": 1.0})
        writer.write_images(0, {"x": np.zeros((1, 4, 4, 3))})
    assert not logdir.exists()
    bar = progress_bar(3, "train")
    assert bar.disable
    set_postfix_metrics(bar, {"loss": 1.0})
    bar.close()
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with MetricWriter(logdir) as writer:
        assert writer.enabled
    with MetricWriter(tmp_path / "off", enabled=False):
        pass
    assert not (tmp_path / "off").exists()


def test_resume_appends_after_a_cut_line(tmp_path):
    with MetricWriter(tmp_path, enabled=True) as writer:
        writer.write_scalars(1, {"loss": 1.0})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')  # preempted mid-write
    with MetricWriter(tmp_path, enabled=True) as writer:
        writer.write_scalars(2, {"loss": 0.5})
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        records = read_jsonl(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5)]


def test_progress_bar_postfix():
    out = io.StringIO()
    bar = progress_bar(range(4), "train", enabled=True, file=out, mininterval=0)
    for _ in bar:
        time.sleep(0.01)  # the bar's rate needs a measurable interval between updates
        set_postfix_metrics(bar, {"loss": jnp.asarray(0.123456)}, examples_per_second=1234.5678)
    bar.close()
    text = out.getvalue()
    assert "train" in text and "loss=0.1235" in text and "examples/s=1235" in text and "step/s" in text
    assert progress_bar(7, enabled=True, file=io.StringIO()).total == 7


def test_plot_curves(tmp_path):
    with MetricWriter(tmp_path, enabled=True) as writer:
        for step in range(50):
            writer.write_scalars(step, {"loss": 3.0 * np.exp(-step / 20) + 0.1 * np.sin(step), "lr": step * 1e-5})
    out = plot_curves(tmp_path / "metrics.jsonl", ["loss", "lr"], tmp_path / "plots" / "curves.png", smoothing=0.6)
    image = Image.open(out)
    assert image.format == "PNG" and image.width >= 400 and image.height >= 400
    assert np.asarray(image.convert("L")).std() > 5  # something was drawn
    records = read_jsonl(tmp_path)
    assert plot_curves(records, ["loss"], tmp_path / "one.png").exists()
    with pytest.raises(ValueError, match=r"available: \['loss', 'lr', 'time'\]"):
        plot_curves(records, ["accuracy"], tmp_path / "missing.png")



def test_resume_drops_what_was_logged_after_the_checkpoint(tmp_path):
    """The records past a checkpoint (its `bytes_written`) go, whatever their steps (an evaluation
    at the checkpoint's step written after it included); without that length, the steps past it go."""
    with MetricWriter(tmp_path, enabled=True) as writer:
        for step in (1, 2, 3):
            writer.write_scalars(step, {"loss": 1.0 / step})
        at_checkpoint = writer.bytes_written  # flushed: on disk even if the process is killed now
        assert (tmp_path / "metrics.jsonl").stat().st_size == at_checkpoint
        writer.write_scalars(3, {"eval/acc": 0.5})  # after the checkpoint of step 3
        writer.write_scalars(4, {"loss": 0.25})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # killed mid-write
    with MetricWriter(tmp_path, enabled=True, resume_step=3, resume_bytes=at_checkpoint) as writer:
        writer.write_scalars(3, {"eval/acc": 0.75})
        writer.write_scalars(4, {"loss": 0.2})
    assert [(r["step"], r.get("loss", r.get("eval/acc"))) for r in read_jsonl(tmp_path)] == [
        (1, 1.0), (2, 0.5), (3, 1 / 3), (3, 0.75), (4, 0.2)]
    # A checkpoint from before the lengths were recorded: keep the records up to its step.
    with MetricWriter(tmp_path, enabled=True, resume_step=2) as writer:
        writer.write_scalars(3, {"loss": 0.3})
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2, 3]
    assert not list(tmp_path.glob("*.tmp"))
    # A fresh start (no checkpoint) on an old log: none of it is this run's.
    with MetricWriter(tmp_path, enabled=True, resume_step=0, resume_bytes=0):
        pass
    assert read_jsonl(tmp_path) == []
