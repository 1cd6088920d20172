"""Loading weights runs no code from the file, and every unreadable input gets an error naming it.

Issue 10 ("Security", "Errors that don't explain"). The parity of the safe TorchScript reader
with the reference model is tests/test_clip_weights.py::test_openai_torchscript_archive.
"""

import json
import os
import pickle
import struct
import zipfile
from typing import Tuple

import jax
import numpy as np
import pytest
import torch
from flax import linen as nn

import clip_jax
from clip_jax.model import CLIP, dummy_inputs
from clip_jax.variants import CLIPConfig, TextConfig, VisionConfig
from common.tokenizers.sentencepiece import SentencePieceTokenizer
from common.torch_io import CheckpointFormatError, PickledObjectsError, read_torchscript_state_dict
from dalle_jax import load_dvae
from dalle_jax.dvae_weights import read_state_dict

TINY = CLIPConfig(16, VisionConfig(16, 1, 32, 2, patch_size=8), TextConfig(32, 2, 1, context_length=8, vocab_size=50))


class SideEffectOnLoad(torch.nn.Module):
    """A module whose TorchScript `__setstate__`, run by torch.jit.load, creates the file `marker`."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.mapped = torch.zeros(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.marker = state[0]
        self.weight = state[1]
        self.training = state[2]
        self.mapped = torch.from_file(self.marker, True, 2)  # opens the path with O_CREAT: the file appears


class ManyDtypes(torch.nn.Module):
    """Tensors of every kind a release holds: fp16, bf16, int64, views with offsets and strides, nesting."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fp16 = torch.nn.Linear(3, 4).half()
        self.blocks = torch.nn.Sequential(torch.nn.Linear(4, 2).to(torch.bfloat16), torch.nn.LayerNorm(2))
        self.offset_view = torch.nn.Parameter(torch.randn(6, generator=gen)[2:5])
        self.register_buffer("transposed", torch.arange(12).reshape(3, 4).t())
        self.register_buffer("empty", torch.zeros(0, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _script_archive(module: torch.nn.Module, path) -> str:
    torch.jit.script(module).save(str(path))
    return str(path)


def _with_data_pkl(archive, data_pkl: bytes, out) -> str:
    """A copy of a TorchScript archive whose data.pkl is replaced."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = data_pkl if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info, data)
    return str(out)


class _Call:
    """Pickles as a call of `fn(*args)`: what a crafted data.pkl would do on load."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# -- TorchScript archives run nothing -------------------------------------------------------------


def test_reader_rebuilds_every_tensor_kind_like_torch_jit_load(tmp_path):
    path = _script_archive(ManyDtypes(), tmp_path / "m.pt")
    got = read_torchscript_state_dict(path, opt_in="-")
    want = torch.jit.load(path).state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape, name
        np.testing.assert_array_equal(got[name], expected, err_msg=name)
    # The dVAE loader reads TorchScript archives the same way, as float32.
    dvae_sd = read_state_dict(path)
    assert set(dvae_sd) == set(want) and all(v.dtype == np.float32 for v in dvae_sd.values())


def test_setstate_hook_runs_only_with_opt_in(tmp_path):
    marker = tmp_path / "marker"
    path = _script_archive(SideEffectOnLoad(str(marker)), tmp_path / "hook.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointFormatError, match=r"hook\.pt.*custom __getstate__/__setstate__.*trust_torchscript"):
        clip_jax.load(path)
    with pytest.raises(CheckpointFormatError, match="trust_pickle=True"):
        load_dvae(path, None)
    assert not marker.exists(), "the archive's __setstate__ ran without the opt-in"
    # With the opt-in torch.jit.load runs the archive's code (then finds no CLIP weights).
    with pytest.raises(CheckpointFormatError):
        clip_jax.load(path, trust_torchscript=True)
    assert marker.exists()


@pytest.mark.parametrize("fn", [os.system, eval])
def test_forbidden_global_is_refused_and_not_called(fn, tmp_path):
    marker = tmp_path / "marker"
    command = f"open({str(marker)!r}, 'w')" if fn is eval else f"touch {marker}"
    archive = _script_archive(ManyDtypes(), tmp_path / "good.pt")
    evil = _with_data_pkl(archive, pickle.dumps(_Call(fn, command), protocol=2), tmp_path / "evil.pt")
    refused = rf"evil\.pt is refused: its data\.pkl references the global \w+\.{fn.__name__}"  # posix, __builtin__
    with pytest.raises(CheckpointFormatError, match=refused):
        clip_jax.load(evil)
    with pytest.raises(CheckpointFormatError, match=refused):
        load_dvae(evil, None)
    assert not marker.exists()


def test_storage_larger_than_the_archive_is_refused_before_reading(tmp_path):
    archive = _script_archive(ManyDtypes(), tmp_path / "good.pt")
    with zipfile.ZipFile(archive) as zf:
        data = next(zf.read(n) for n in zf.namelist() if n.endswith("/data.pkl"))
    # The first storage's numel (BININT1 after 'cpu' and its memo slot) becomes 2**31 - 1 elements.
    at = data.index(b"cpu") + len(b"cpu") + 2
    assert data[at:at + 1] == b"K" and data[at + 2:at + 3] == b"t"
    huge = data[:at] + b"J" + struct.pack("<i", 2**31 - 1) + data[at + 2:]
    with pytest.raises(CheckpointFormatError, match=r"big\.pt: storage 0 claims \d+ bytes, more than the archive"):
        read_torchscript_state_dict(_with_data_pkl(archive, huge, tmp_path / "big.pt"), opt_in="-")


# -- unreadable files say what is wrong ------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """State dicts (zip and legacy format), a TorchScript archive and a safetensors file, each empty,
    cut short and random."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("bad")
    torch.save({"w": torch.zeros(64, 64)}, d / "good.pt")
    torch.save({"w": torch.zeros(64, 64)}, d / "good_legacy.pt", _use_new_zipfile_serialization=False)
    _script_archive(ManyDtypes(), d / "good_script.pt")
    save_file({"w": torch.zeros(64, 64)}, str(d / "good.safetensors"))
    rng = np.random.default_rng(0)
    files = {}
    for good in ("good.pt", "good_legacy.pt", "good_script.pt", "good.safetensors"):
        data, stem, suffix = (d / good).read_bytes(), good.split(".")[0], "." + good.split(".")[1]
        for kind, content in (("empty", b""), ("truncated", data[: len(data) // 2]),
                              ("random", rng.bytes(4096))):
            files[(good, kind)] = d / f"{stem}_{kind}{suffix}"
            files[(good, kind)].write_bytes(content)
    return files


EXPECTED = {"empty": "is empty", "truncated": "is truncated or damaged", "random": "is not a PyTorch checkpoint"}


@pytest.mark.parametrize("kind", ["empty", "truncated", "random"])
@pytest.mark.parametrize("good", ["good.pt", "good_legacy.pt", "good_script.pt"])
def test_broken_torch_files_are_described_not_blamed_on_pickles(bad_files, good, kind):
    path = bad_files[(good, kind)]
    for load in (clip_jax.load, lambda p: load_dvae(p, None)):
        with pytest.raises(CheckpointFormatError) as err:
            load(path)
        message = str(err.value)
        assert str(path) in message and EXPECTED[kind] in message, message
        assert not isinstance(err.value, PickledObjectsError) and "trust_pickle" not in message, message
    with pytest.raises(CheckpointFormatError, match=EXPECTED[kind]):  # also when unpickling is allowed
        load_dvae(path, None, trust_pickle=True)


@pytest.mark.parametrize("kind", ["empty", "truncated", "random"])
def test_broken_safetensors_name_the_file(bad_files, kind):
    path = bad_files[("good.safetensors", kind)]
    for load in (clip_jax.load, lambda p: load_dvae(p, None)):
        with pytest.raises(CheckpointFormatError, match=rf"{path.name} is not a valid safetensors file"):
            load(path)


@pytest.mark.parametrize("content, problem", [("[1, 2]", "must hold a JSON object.*found a list"),
                                              ("{not json", "is not valid JSON")])
def test_bad_config_json_names_the_file(tmp_path, content, problem):
    from safetensors.numpy import save_file

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(content)
    save_file({"logit_scale": np.zeros(())}, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointFormatError, match=rf"hf/config\.json {problem}"):
        clip_jax.load(tmp_path / "hf")
    save_file({"logit_scale": np.zeros(())}, str(tmp_path / "w.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(content)
    with pytest.raises(CheckpointFormatError, match=rf"open_clip_config\.json {problem}"):
        clip_jax.load(tmp_path / "w.safetensors")


def test_bad_sentencepiece_model_names_the_file(tmp_path):
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.model is empty"):
        SentencePieceTokenizer.load(tmp_path / "empty.model")
    (tmp_path / "random.model").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(ValueError, match=r"random\.model \(300 bytes\) is not a SentencePiece model: it does not parse"):
        SentencePieceTokenizer.load(tmp_path / "random.model")


# -- arguments that do not apply are refused ------------------------------------------------------


def test_overrides_that_do_not_apply_are_refused(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    save_file({"logit_scale": np.zeros(())}, str(tmp_path / "hf" / "model.safetensors"))
    for override in ({"act": "gelu"}, {"text_heads": 4}, {"vision_heads": 2}):
        with pytest.raises(TypeError, match=r"Hugging Face CLIP directory.*do not apply"):
            clip_jax.load(tmp_path / "hf", **override)
    with pytest.raises(TypeError, match="unexpected keyword argument 'heads'"):
        clip_jax.load(tmp_path / "hf", heads=4)
    with pytest.raises(TypeError, match=r"\['trust_torchscript'\] only apply when loading a checkpoint"):
        clip_jax.load("ViT-B/32", trust_torchscript=True)


def test_token_ids_outside_the_vocabulary_are_refused():
    model = CLIP(TINY)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *dummy_inputs(TINY)))
    bundle = clip_jax.CLIPBundle(model, variables, TINY, "random-init")
    ids = np.zeros((2, 8), np.int32)
    assert np.isfinite(np.asarray(bundle.encode_text(ids))).all()
    for bad in (50, -1):
        ids[1, 3] = bad
        with pytest.raises(ValueError, match=rf"token ids in \[0, 50\), found ids from {min(bad, 0)} to {max(bad, 0)}"):
            bundle.encode_text(ids)
