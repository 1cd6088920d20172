"""Fine-tuning CLIP: init_from imported weights (whole, one tower, resized), LiT locks, context length,
`clip_jax.load` at another image size and context length.

Every init_from test starts from one smoke run's export (`smoke_export`), and the module's runs share
a compilation cache: a trainer built twice for the same model compiles its programs once."""

import dataclasses
import math

import jax
import ml_collections
import numpy as np
import optax
import pytest
import torch

import clip_jax
from clip_jax import convert, finetune, resize
from common import sharding
from common.optim import frozen_mask, make_optimizer
from experiments.configs import clip_lit_smoke, clip_rn50, clip_vit_b32
from experiments.train_clip import (
    EXPORT_FILE,
    make_pipeline,
    make_task,
    make_trainer,
    model_config,
    run,
)

HEADS = {"vision_heads": 2, "text_heads": 2}  # the tiny model's heads, which OpenAI-format weights do not record


def _config(make=clip_vit_b32.get_config, *, scan_layers=None, **fields):
    c = make("smoke")
    if scan_layers is not None:
        c.model.scan_layers = scan_layers
    if not c.model.variant.startswith("RN"):
        c.model.vision.update(image_size=16, width=32, layers=2, heads=2)
    c.model.text.update(width=32, layers=2, heads=2, context_length=16)
    c.model.embed_dim = 32
    # FSDP: init_from places sharded leaves, and checkpoints need no per-replica copies (cheaper to save).
    c.trainer.update(total_steps=2, global_batch_size=8, log_every=1, checkpoint_every=2, progress=False,
                     async_checkpoints=False, mesh="fsdp")
    c.optim.warmup_steps = 1
    c.data = ml_collections.ConfigDict({"source": "shapes", "split": "train", "num_examples": 64,
                                        "render_size": c.model.vision.image_size})
    c.zeroshot_shapes, c.fewshot_shapes, c.export_openai = None, None, False
    c.update(fields)
    return c


def _trainer(config, workdir):
    mesh = sharding.make_mesh(config.trainer.mesh)
    task = make_task(config, mesh)
    return task, make_trainer(config, task, workdir, mesh)


def _leaves(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(jax.device_get(v))
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _size(tree):
    """Elements in a tree of arrays or shapes (`jax.eval_shape`)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def smoke_export(tmp_path_factory):
    """The first documented command's export (`clip_lit_smoke.py`): a smoke run that writes OpenAI-format
    weights. Every init_from test starts from this file."""
    workdir = tmp_path_factory.mktemp("clip_smoke")
    run(_config(export_openai=True), workdir)
    return workdir / EXPORT_FILE


def test_init_from_at_another_size_starts_at_its_logits_sharded_and_resume_wins(tmp_path, smoke_export):
    config = _config(init_from=str(smoke_export))  # scan_layers=True: the stack is built from per-layer weights
    config.model.vision.image_size, config.model.text.context_length = 24, 8  # 16px (2x2 patches) -> 3x3; 16 -> 8
    task, trainer = _trainer(config, tmp_path / "run")
    source = clip_jax.load(smoke_export, **HEADS).params
    bundle = clip_jax.load(smoke_export, image_size=24, context_length=8, **HEADS)
    want = _leaves(convert.to_scanned(bundle.variables)["params"])
    got = _leaves(trainer.state.params)
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    np.testing.assert_array_equal(got["visual/positional_embedding"],
                                  resize.resize_position_grid(source["visual"]["positional_embedding"], 3))
    np.testing.assert_array_equal(got["text/positional_embedding"], source["text"]["positional_embedding"][:8])
    kernel = trainer.state.params["text"]["token_embedding"]["embedding"]  # (vocab, embed): split, not copied
    assert kernel.sharding == trainer.state_shardings.params["text"]["token_embedding"]["embedding"]
    assert kernel.addressable_shards[0].data.size < kernel.size, kernel.sharding

    batch = next(make_pipeline(config.data, global_batch_size=8, image_size=24, context_length=8, seed=0))
    assert batch["image"].shape == (8, 24, 24, 3) and batch["text"].shape == (8, 8)  # the tokenizer follows
    logits_per_image, logits_per_text = bundle.logits(batch["image"], batch["text"])
    logits = jax.jit(task.model.apply)({"params": trainer.state.params}, batch["image"], batch["text"])[0]
    np.testing.assert_allclose(logits, logits_per_image, rtol=1e-5, atol=1e-5)
    # The first train step's loss (the trainer's pipeline gives it this batch): CLIP's symmetric cross-entropy
    # (Radford et al. 2021, figure 3) of the loaded model's logits.
    labels = np.arange(8)
    want_loss = (optax.softmax_cross_entropy_with_integer_labels(logits_per_image, labels).mean()
                 + optax.softmax_cross_entropy_with_integer_labels(logits_per_text, labels).mean()) / 2
    loss = jax.jit(task.loss)(trainer.state.params, {}, batch, jax.random.key(0), 0)[0]
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)

    # A run with a checkpoint resumes it; init_from is for fresh runs only (a missing file here is never read).
    trainer.save(None, force=True)
    trainer.close()
    config.init_from = str(tmp_path / "missing.safetensors")
    _, again = _trainer(config, tmp_path / "run")
    assert again.restore_if_any(None) == 0
    for name, value in _leaves(again.state.params).items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)
    again.close()


def test_init_from_a_training_workdir_starts_from_its_latest_checkpoint(tmp_path, smoke_export):
    """init_from=<a run's workdir>: that run's latest parameters, whatever its optimizer was (read from the
    checkpoint), placed on this run's mesh; a workdir of another model is refused with a clear error."""
    config = _config(init_from=str(smoke_export.parent))  # the smoke run that wrote the export
    config.optim.update(learning_rate=1e-4, accum_steps=2)  # another optimizer state (MultiSteps)
    config.trainer.update(total_steps=4, mesh="data_parallel")
    _, trainer = _trainer(config, tmp_path / "run")
    want = _leaves(convert.to_scanned(clip_jax.load(smoke_export, **HEADS).variables)["params"])
    got = _leaves(trainer.state.params)
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    kernel = trainer.state.params["text"]["token_embedding"]["embedding"]  # placed with the run's shardings
    assert kernel.sharding == trainer.state_shardings.params["text"]["token_embedding"]["embedding"]
    trainer.close()
    config.model.text.layers = 3
    with pytest.raises(ValueError, match="is a training run of another model"):
        _trainer(config, tmp_path / "other")


def test_init_from_a_checkpoint_of_another_architecture_is_refused(smoke_export):
    config = _config()
    config.model.text.layers = 3
    with pytest.raises(ValueError, match="does not fit the configured model"):
        finetune.load_pretrained(str(smoke_export), model_config(config.model))


def test_load_at_another_image_size_and_context_length(smoke_export):
    plain = clip_jax.load(smoke_export, **HEADS)  # 16px, 16 tokens
    same = clip_jax.load(smoke_export, image_size=16, context_length=16, **HEADS)
    assert same.config == plain.config
    for name, value in _leaves(plain.variables).items():
        np.testing.assert_array_equal(_leaves(same.variables)[name], value, err_msg=name)
    bundle = clip_jax.load(smoke_export, image_size=32, context_length=24, **HEADS)  # 4x4 patches; longer text
    assert (bundle.image_size, bundle.context_length) == (32, 24)
    assert bundle.config.vision == dataclasses.replace(plain.config.vision, image_size=32)
    np.testing.assert_array_equal(bundle.params["visual"]["positional_embedding"],
                                  resize.resize_position_grid(plain.params["visual"]["positional_embedding"], 4))
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    features = [bundle.encode_image(images), bundle.encode_text(bundle.tokenize(["a red circle", "a blue square"]))]
    assert [f.shape for f in features] == [(2, 32), (2, 32)] and all(np.isfinite(f).all() for f in features)
    with pytest.raises(ValueError, match="divisible by patch_size"):  # a variant is built at the size asked for
        clip_jax.load("ViT-B/32", image_size=100)


# -- resizing -------------------------------------------------------------------------------------


def test_resize_to_the_same_size_is_identity():
    rng = np.random.default_rng(0)
    grid, text = rng.standard_normal((1 + 49, 8)).astype(np.float32), rng.standard_normal((77, 8)).astype(np.float32)
    np.testing.assert_array_equal(resize.resize_position_grid(grid, 7), grid)
    np.testing.assert_array_equal(resize.resize_text_positions(text, 77), text)


@pytest.mark.parametrize("old, new", [(7, 14), (7, 5)])
def test_resize_position_grid_matches_torch_bicubic(old, new):
    posemb = np.random.default_rng(1).standard_normal((1 + old * old, 8)).astype(np.float32)
    got = resize.resize_position_grid(posemb, new)
    raster = torch.from_numpy(posemb[1:].reshape(old, old, 8)).permute(2, 0, 1)[None]  # (1, D, old, old)
    want = torch.nn.functional.interpolate(raster, size=(new, new), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(got[1:], want[0].permute(1, 2, 0).reshape(new * new, 8).numpy(), atol=1e-5)
    np.testing.assert_array_equal(got[0], posemb[0])  # the class token's position is kept


@pytest.mark.parametrize("stem_stride, grids", [(4, (2, 3)), (1, (8, 12))])
def test_resize_a_resnet_follows_its_stem_stride(stem_stride, grids):
    """The attention pool's grid is image_size / (8 * stem_stride): resizing 64 -> 96 px resamples it."""
    from flax.linen import meta

    from clip_jax.model import CLIP
    from clip_jax.variants import CLIPConfig, TextConfig, VisionConfig

    cfg = CLIPConfig(16, VisionConfig(64, (1, 1, 1, 1), 8, 2, stem_stride=stem_stride), TextConfig(16, 2, 1, 8))
    variables = jax.jit(CLIP(cfg).init)(jax.random.key(0, impl="rbg"), np.zeros((1, 64, 64, 3), np.float32),
                                        np.zeros((1, 8), np.int32))
    variables = jax.device_get(meta.unbox(variables))
    new_cfg, resized = resize.resize_variables(variables, cfg, image_size=96)
    old_grid = variables["params"]["visual"]["attnpool"]["positional_embedding"]
    assert old_grid.shape[0] == 1 + grids[0] ** 2 and new_cfg.vision.stem_stride == stem_stride
    np.testing.assert_array_equal(resized["params"]["visual"]["attnpool"]["positional_embedding"],
                                  resize.resize_position_grid(old_grid, grids[1]))
    features = CLIP(new_cfg).apply(resized, np.zeros((1, 96, 96, 3), np.float32), method=CLIP.encode_image)
    assert features.shape == (1, 16)
    with pytest.raises(ValueError, match=f"multiple of {8 * stem_stride}"):
        resize.resize_variables(variables, cfg, image_size=8 * stem_stride * 3 + 4)


def test_resize_text_positions_truncates_or_matches_torch_linear():
    posemb = np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32)
    np.testing.assert_array_equal(resize.resize_text_positions(posemb, 5), posemb[:5])
    want = torch.nn.functional.interpolate(torch.from_numpy(posemb.T)[None], size=40, mode="linear", align_corners=False)
    np.testing.assert_allclose(resize.resize_text_positions(posemb, 40), want[0].T.numpy(), atol=1e-5)


# -- locks (LiT) ----------------------------------------------------------------------------------


def test_lit_lock_groups_follow_open_clip():
    cfg = model_config(_config().model)  # 2 blocks per tower
    assert finetune.lock_prefixes(cfg, "image", 1) == (
        "visual/conv1", "visual/class_embedding", "visual/positional_embedding", "visual/ln_pre",
        "visual/transformer/resblocks_0", "visual/transformer/resblocks_1", "visual/ln_post")
    assert finetune.lock_prefixes(cfg, "text", 2) == ("text/token_embedding", "text/positional_embedding",
                                                      "text/transformer/resblocks_0")
    assert finetune.lock_prefixes(cfg, "text", 9) == ()
    assert finetune.lock_prefixes(cfg, "image", 0, scan_layers=True)[-1] == "visual/transformer/resblocks"
    with pytest.raises(ValueError, match="scan_layers=False for partial locks"):
        finetune.lock_prefixes(cfg, "image", 2, scan_layers=True)
    with pytest.raises(ValueError, match="set lock_text=True"):
        finetune.frozen_prefixes(cfg, lock_text_unlocked_layers=1)
    rn = model_config(_config(clip_rn50.get_config).model)
    assert finetune.lock_prefixes(rn, "image", 1) == ("visual/conv1", "visual/conv2", "visual/conv3", "visual/layer1_0",
                                                      "visual/layer2_0", "visual/layer3_0", "visual/layer4_0")


def _assert_frozen_get_no_optimizer_state(config, task, trainer):
    """{parameter: frozen?}, after checking that AdamW keeps two moments per trained parameter and none
    for frozen ones (the state of an optimizer with nothing frozen, as shapes, is the reference)."""
    frozen = _leaves(frozen_mask(trainer.state.params, task.frozen))
    frozen_count = sum(_size(v) for name, v in _leaves(trainer.state.params).items() if frozen[name])
    free = jax.eval_shape(make_optimizer(config.optim.to_dict()).init, trainer.state.params)
    assert _size(free) - _size(trainer.state.opt_state) == 2 * frozen_count > 0
    return frozen


def test_lit_from_one_tower_with_partial_locks(tmp_path, smoke_export):
    """The image tower from a checkpoint, the text tower at its fresh init; the last 2 groups of the image
    tower and all but the text stem train (partial locks: scan_layers=False)."""
    locks = {"scan_layers": False, "lock_image": True, "lock_image_unlocked_groups": 2, "lock_text": True,
             "lock_text_unlocked_layers": 3}
    config = _config(init_from=str(smoke_export), init_from_tower="image", **locks)
    task, trainer = _trainer(config, tmp_path / "locked")
    _, fresh = _trainer(_config(**locks), tmp_path / "fresh")  # no checkpoint: the same programs, cached
    loaded = _leaves(clip_jax.load(smoke_export, **HEADS).params)
    fresh_leaves = _leaves(fresh.state.params)
    before = _leaves(trainer.state.params)
    for name, value in before.items():
        np.testing.assert_array_equal(value, loaded[name] if name.startswith("visual/") else fresh_leaves[name],
                                      err_msg=name)
    fresh.close()
    frozen = _assert_frozen_get_no_optimizer_state(config, task, trainer)

    data = make_pipeline(config.data, global_batch_size=8, image_size=16, context_length=16, seed=0)
    after = _leaves(trainer.fit(data).state.params)
    trainer.close()
    for name, value in before.items():
        if frozen[name]:
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    for name in ("logit_scale", "text/ln_final/scale", "visual/proj", "visual/ln_post/scale",
                 "text/transformer/resblocks_0/mlp/c_fc/kernel", "visual/transformer/resblocks_1/mlp/c_fc/kernel"):
        assert not np.array_equal(after[name], before[name]), name
    assert frozen["visual/conv1/kernel"] and frozen["text/token_embedding/embedding"]


def test_lit_smoke_recipe_starts_from_the_smoke_export_and_never_changes_its_image_tower(tmp_path, smoke_export):
    """The second documented command: LiT from the smoke export's image tower, locked whole (a scanned stack)."""
    source = _config()
    lit = clip_lit_smoke.get_config(str(smoke_export))
    assert lit.lock_image and lit.init_from_tower == "image"
    lit.model, lit.data, lit.zeroshot_shapes, lit.fewshot_shapes = source.model, source.data, None, None
    lit.trainer.update(total_steps=2, global_batch_size=8, log_every=1, checkpoint_every=2, progress=False)
    lit.export_openai = True  # the trained weights, to compare with the start
    task, trainer = _trainer(lit, tmp_path / "lit")  # the run's own start: the same seed and checkpoint
    before = _leaves(trainer.state.params)
    frozen = _assert_frozen_get_no_optimizer_state(lit, task, trainer)
    assert frozen["visual/conv1/kernel"] and not frozen["text/token_embedding/embedding"]
    trainer.close()

    summary = run(lit, tmp_path / "lit")
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    after = _leaves(clip_jax.load(tmp_path / "lit" / EXPORT_FILE, **HEADS).params)
    for name, value in _leaves(clip_jax.load(smoke_export, **HEADS).params).items():
        if name.startswith("visual/"):  # frozen: still the export's, every block of the stack
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    for name in ("logit_scale", "text/ln_final/scale"):
        assert not np.array_equal(after[name], before[name]), name


def test_lit_locked_resnet_keeps_its_batchnorm_statistics(tmp_path):
    config = _config(clip_rn50.get_config, lock_image=True)
    config.model.text.layers = 1
    task, trainer = _trainer(config, tmp_path / "run")
    assert not task.train_batchnorm
    before = _leaves({"params": trainer.state.params["visual"], **trainer.state.model_state})
    data = make_pipeline(config.data, global_batch_size=8, image_size=32, context_length=16, seed=0)
    state = trainer.fit(data).state
    trainer.close()
    after = _leaves({"params": state.params["visual"], **state.model_state})
    assert any(name.startswith("batch_stats/") for name in before)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    # Resuming: the frozen tower's empty optimizer-state nodes restore too.
    config.trainer.total_steps = 3
    _, trainer = _trainer(config, tmp_path / "run")
    resumed = trainer.fit(make_pipeline(config.data, global_batch_size=8, image_size=32, context_length=16, seed=0))
    trainer.close()
    assert resumed.step == 3 and len(resumed.history) == 1
    after = _leaves({"params": resumed.state.params["visual"], **resumed.state.model_state})
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_context_length_is_configurable_at_full_scale():
    config = clip_vit_b32.get_config()
    assert model_config(config.model).text.context_length == 77  # None: the variant's
    config.model.text.context_length = 32
    assert model_config(config.model).text.context_length == 32
