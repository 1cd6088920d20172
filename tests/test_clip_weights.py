"""clip_jax.load on every checkpoint format, architecture inferred; export back to PyTorch."""

import json
import pickle

import jax
import numpy as np
import pytest
import torch

import clip_jax
from clip_jax import weights
from clip_jax.variants import CLIPConfig, TextConfig, VisionConfig
from tests import clip_reference as ref

TOL = 1e-4
TEXTS = ["a photo of a cat.", "a diagram", "", "two dogs playing in the snow at night"]

# OpenAI conventions (64-wide heads), so the architecture is fully inferable from the weights.
VIT = CLIPConfig(64, VisionConfig(32, 2, 128, 2, patch_size=8), TextConfig(128, 2, 2))
RN = CLIPConfig(64, VisionConfig(64, (1, 1, 1, 1), 16, 8), TextConfig(64, 1, 1))


class Evil:
    def __reduce__(self):  # would run code if unpickled
        return (print, ("pwned",))


@pytest.fixture(scope="module", params=["vit", "rn"])
def reference(request):
    cfg = VIT if request.param == "vit" else RN
    torch.manual_seed(0)
    model = ref.build_openai_clip(cfg)
    ref.randomize_(model, seed=3)
    return cfg, model


def _inputs(cfg, batch=4):
    s = cfg.vision.image_size
    images = np.random.default_rng(1).standard_normal((batch, s, s, 3)).astype(np.float32)
    return images, ref.tokenize(TEXTS[:batch], cfg.text.context_length)


def _openai_outputs(model, images, texts):
    img, txt = torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(texts).long()
    with torch.no_grad():
        per_image, _ = model(img, txt)
        return model.encode_image(img).numpy(), model.encode_text(txt).numpy(), per_image.numpy()


def _check(bundle, model, cfg):
    images, texts = _inputs(cfg)
    want = _openai_outputs(model, images, texts)
    got = (bundle.encode_image(images), bundle.encode_text(texts), bundle.logits(images, texts)[0])
    errs = [float(np.abs(np.asarray(g) - w).max()) for g, w in zip(got, want)]
    print(f"max abs diff (image, text, logits) for {bundle.source} {cfg.vision.is_resnet and 'RN' or 'ViT'}: {errs}")
    assert max(errs) <= TOL, errs
    return errs


def _assert_same_architecture(inferred: CLIPConfig, cfg: CLIPConfig):
    assert inferred == cfg, f"\ninferred {inferred}\nexpected {cfg}"


def test_openai_torchscript_archive(reference, tmp_path, monkeypatch):
    """OpenAI's release format, read without torch.jit.load (which would run the archive's code)."""
    cfg, model = reference
    images, texts = _inputs(cfg)
    traced = torch.jit.trace(model, (torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(texts).long()),
                             check_trace=False)
    path = tmp_path / "model.pt"
    traced.save(str(path))

    def no_code_runs(*args, **kwargs):
        raise AssertionError("torch.jit.load was called without trust_torchscript")

    with monkeypatch.context() as patch:
        patch.setattr(torch.jit, "load", no_code_runs)
        bundle = clip_jax.load(path)
    _assert_same_architecture(bundle.config, cfg)
    assert bundle.source == "openai"
    _check(bundle, model, cfg)
    # The opt-in reads the same weights through torch.jit.load.
    trusted = clip_jax.load(path, trust_torchscript=True)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(bundle.variables), jax.tree.leaves(trusted.variables)))


def test_openai_state_dict_pt(reference, tmp_path):
    cfg, model = reference
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    bundle = clip_jax.load(tmp_path / "sd.pt")
    _assert_same_architecture(bundle.config, cfg)
    _check(bundle, model, cfg)


def test_open_clip_training_checkpoint(reference, tmp_path):
    cfg, model = reference
    # open_clip's epoch_N.pt: DDP-prefixed weights inside a dict with training metadata.
    ckpt = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(ckpt, tmp_path / "epoch_3.pt")
    _check(clip_jax.load(tmp_path / "epoch_3.pt"), model, cfg)


def test_safetensors_with_open_clip_config(tmp_path):
    cfg, model = VIT, ref.build_openai_clip(VIT)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    oc = {"model_cfg": {"embed_dim": 64, "quick_gelu": True, "vision_cfg": {"head_width": 64}, "text_cfg": {"heads": 2}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(oc))
    bundle = clip_jax.load(tmp_path / "open_clip_model.safetensors")
    _assert_same_architecture(bundle.config, cfg)
    _check(bundle, model, cfg)
    # The activation is taken from open_clip's config: a GELU model is not silently run as QuickGELU.
    oc["model_cfg"]["quick_gelu"] = False
    (tmp_path / "open_clip_config.json").write_text(json.dumps(oc))
    assert clip_jax.load(tmp_path / "open_clip_model.safetensors").config.vision.act == "gelu"


def test_hugging_face_directory(tmp_path):
    import transformers

    hf_config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=24,
    )
    torch.manual_seed(0)
    hf = transformers.CLIPModel(hf_config).eval()
    ref.randomize_(hf, seed=2)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert (tmp_path / "hf" / "model.safetensors").exists()
    bundle = clip_jax.load(tmp_path / "hf")
    assert bundle.source == "hf"
    assert (bundle.config.vision.heads, bundle.config.text.heads) == (2, 4)
    assert (bundle.config.vision.act, bundle.config.text.act) == ("gelu", "quick_gelu")
    images, texts = _inputs(bundle.config)
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(texts).long(), pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    got = bundle.logits(images, texts)[0]
    assert float(np.abs(np.asarray(got) - out.logits_per_image.numpy()).max()) <= TOL


def test_export_runs_in_pytorch(reference, tmp_path):
    cfg, model = reference
    torch.save(model.state_dict(), tmp_path / "in.pt")
    bundle = clip_jax.load(tmp_path / "in.pt")
    for name in ("out.pt", "out.safetensors"):
        bundle.save_openai(tmp_path / name)
        fresh = ref.build_openai_clip(cfg)
        if name.endswith(".pt"):
            sd = torch.load(tmp_path / name, weights_only=True)
        else:
            from safetensors.torch import load_file

            sd = load_file(str(tmp_path / name))
        fresh.load_state_dict(sd, strict=True)
        _check(bundle, fresh.eval(), cfg)
        # And the export reloads to the same architecture.
        _assert_same_architecture(clip_jax.load(tmp_path / name).config, cfg)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}, "payload": Evil()}, path)
    with pytest.raises(weights.CheckpointFormatError, match=r"pickles Python objects beyond tensors \(e\.g\. __builtin__\.print\)"):
        clip_jax.load(path)
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(weights.CheckpointFormatError):
        clip_jax.load(tmp_path / "plain.pkl")


def test_mismatched_checkpoint_lists_keys(tmp_path):
    model = ref.build_openai_clip(VIT)
    sd = dict(model.state_dict())
    del sd["ln_final.bias"]
    sd["visual.extra_head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"missing keys \['ln_final.bias'\].*unexpected keys \['visual.extra_head.weight'\]"):
        clip_jax.load(tmp_path / "broken.pt")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "notclip.pt")
    with pytest.raises(weights.CheckpointFormatError, match="not a CLIP checkpoint"):
        clip_jax.load(tmp_path / "notclip.pt")


def test_missing_path_and_unknown_name():
    with pytest.raises(FileNotFoundError, match="neither a known CLIP variant.*ViT-B/32"):
        clip_jax.load("ViT-Q/99")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        clip_jax.load("/nonexistent/ViT-B-32.pt")


def test_named_variant_random_init_and_bad_inputs():
    bundle = clip_jax.load("ViT-B/32")
    assert bundle.source == "random-init" and bundle.image_size == 224
    n = sum(x.size for x in jax.tree.leaves(bundle.params))
    assert n == 151_277_313
    with pytest.raises(ValueError, match=r"\(B, 224, 224, 3\)"):
        bundle.encode_image(np.zeros((2, 3, 224, 224), np.float32))
    with pytest.raises(ValueError, match=r"\(B, 77\)"):
        bundle.encode_text(np.zeros((2, 10), np.int32))
    with pytest.raises(ValueError, match="truncate=True"):
        bundle.tokenize(["word " * 100])
    assert bundle.tokenize(["word " * 100], truncate=True).shape == (1, 77)


def test_zeroshot_and_retrieval_cli_with_real_checkpoint(tmp_path):
    """The CLIs end to end with clip_jax.load on a real (random-init) OpenAI-format checkpoint."""
    from PIL import Image

    from clip_jax import retrieval, zeroshot
    from common.data import shapes, writers

    model = ref.build_openai_clip(VIT)
    ref.randomize_(model, seed=4)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    ds = shapes.ShapesDataset("validation", 24, shapes.ShapesConfig(image_size=40))
    writers.write_image_folder(ds, tmp_path / "folder", by="color")
    out = zeroshot.main(["--weights", str(tmp_path / "w.pt"), "--dataset", "folder", "--image-folder",
                         str(tmp_path / "folder"), "--batch-size", "8", "--templates", "single",
                         "--out", str(tmp_path / "zs.json")])
    assert out["n"] == 24 and json.loads((tmp_path / "zs.json").read_text())["top1"] == out["top1"]
    # Recompute the top-1 by hand with the same bundle, the same preprocessing and the prompt 'a photo of a {}.'.
    bundle = clip_jax.load(tmp_path / "w.pt")
    classes = sorted(p.name for p in (tmp_path / "folder").iterdir() if p.is_dir())
    text = np.asarray(bundle.encode_text(bundle.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in classes])))
    correct = 0
    for i, c in enumerate(classes):
        for f in sorted((tmp_path / "folder" / c).glob("*.png")):
            img = np.asarray(bundle.encode_image(bundle.preprocess(Image.open(f))[None]))[0]
            scores = text @ img / np.linalg.norm(text, axis=1)
            correct += int(np.argmax(scores) == i)
    assert out["correct"]["top1"] == correct
    res = retrieval.main(["--weights", str(tmp_path / "w.pt"), "--captions", str(tmp_path / "folder" / "captions.tsv"),
                          "--images-root", str(tmp_path / "folder"), "--batch-size", "8"])
    assert 0.0 <= res["image_to_text_R@1"] <= res["image_to_text_R@10"] <= 1.0
