"""Fine-tuning CLIP: init_from imported weights (whole, one tower, resized), LiT locks, context length."""

import math

import jax
import ml_collections
import numpy as np
import pytest
import torch
from flax import linen as nn

import clip_jax
from clip_jax import convert, finetune, losses, resize, weights
from clip_jax.model import CLIP, dummy_inputs
from common import sharding
from common.optim import frozen_mask
from experiments.configs import clip_lit_smoke, clip_rn50, clip_vit_b32
from experiments.train_clip import make_pipeline, make_task, make_trainer, model_config, run

HEADS = dict(vision_heads=2, text_heads=2)  # the tiny model's heads, which OpenAI-format weights do not record


def _config(make=clip_vit_b32.get_config, *, scan_layers=None, **fields):
    c = make("smoke")
    if scan_layers is not None:
        c.model.scan_layers = scan_layers
    if not c.model.variant.startswith("RN"):
        c.model.vision.update(image_size=16, width=32, layers=2, heads=2)
    c.model.text.update(width=32, layers=2, heads=2, context_length=16)
    c.model.embed_dim = 32
    c.trainer.update(total_steps=2, global_batch_size=8, log_every=1, checkpoint_every=2, progress=False,
                     async_checkpoints=False)
    c.optim.warmup_steps = 1
    c.data = ml_collections.ConfigDict(dict(source="shapes", split="train", num_examples=64,
                                            render_size=c.model.vision.image_size))
    c.zeroshot_shapes, c.fewshot_shapes, c.export_openai = None, None, False
    c.update(fields)
    return c


def _export(config, path, seed):
    """A random CLIP of `config.model`'s shapes, written in OpenAI format."""
    cfg = model_config(config.model)
    variables = nn.meta.unbox(CLIP(cfg).init(jax.random.key(seed), *dummy_inputs(cfg)))
    return weights.save_openai_state_dict(jax.device_get(variables), cfg, path)


def _trainer(config, workdir):
    mesh = sharding.make_mesh(config.trainer.mesh)
    task = make_task(config, mesh)
    return task, make_trainer(config, task, workdir, mesh)


def _leaves(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(jax.device_get(v))
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _size(tree):
    return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree))


def test_init_from_openai_export_starts_at_its_logits_sharded_and_resume_wins(tmp_path):
    config = _config(init_from=str(_export(_config(), tmp_path / "start.pt", seed=1)))
    config.trainer.mesh = "fsdp"  # scan_layers=True (the smoke default): the stack is built from per-layer weights
    task, trainer = _trainer(config, tmp_path / "run")
    bundle = clip_jax.load(config.init_from, **HEADS)
    want = _leaves(convert.to_scanned(bundle.variables)["params"])
    got = _leaves(trainer.state.params)
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    kernel = trainer.state.params["text"]["token_embedding"]["embedding"]  # (vocab, embed): split, not copied
    assert kernel.sharding == trainer.state_shardings.params["text"]["token_embedding"]["embedding"]
    assert kernel.addressable_shards[0].data.size < kernel.size, kernel.sharding

    batch = next(make_pipeline(config.data, global_batch_size=8, image_size=16, context_length=16, seed=0))
    images, texts = bundle.encode_image(batch["image"]), bundle.encode_text(batch["text"])
    want_loss, _ = losses.contrastive_loss("softmax", images, texts, bundle.params["logit_scale"])
    logits = jax.jit(task.model.apply)({"params": trainer.state.params}, batch["image"], batch["text"])[0]
    np.testing.assert_allclose(logits, bundle.logits(batch["image"], batch["text"])[0], rtol=1e-5, atol=1e-5)
    # The first train step's loss (the trainer's pipeline gives it this batch).
    loss = jax.jit(task.loss)(trainer.state.params, {}, batch, jax.random.key(0), 0)[0]
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)

    # A run with a checkpoint resumes it; init_from (another file here) is for fresh runs only.
    trainer.save(None, force=True)
    trainer.close()
    config.init_from = str(_export(_config(), tmp_path / "other.pt", seed=2))
    _, again = _trainer(config, tmp_path / "run")
    assert again.restore_if_any(None) == 0
    for name, value in _leaves(again.state.params).items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)
    again.close()


def test_init_from_one_tower_leaves_the_other_at_its_fresh_init(tmp_path, tower="image"):
    config = _config(init_from=str(_export(_config(), tmp_path / "start.pt", seed=1)), init_from_tower=tower,
                     scan_layers=False)
    _, trainer = _trainer(config, tmp_path / "run")
    _, fresh = _trainer(_config(scan_layers=False), tmp_path / "fresh")
    loaded = _leaves(clip_jax.load(config.init_from, **HEADS).params)
    root = {"image": "visual/", "text": "text/"}[tower]
    fresh_leaves = _leaves(fresh.state.params)
    for name, value in _leaves(trainer.state.params).items():
        np.testing.assert_array_equal(value, loaded[name] if name.startswith(root) else fresh_leaves[name], err_msg=name)
    trainer.close()
    fresh.close()


def test_init_from_at_another_image_size_and_context_length(tmp_path):
    path = _export(_config(), tmp_path / "start.pt", seed=1)  # 16px (2x2 patches), 16 tokens
    config = _config(init_from=str(path))
    config.model.vision.image_size, config.model.text.context_length = 24, 8  # 3x3 patches, 8 tokens
    task, trainer = _trainer(config, tmp_path / "run")
    source = clip_jax.load(path, **HEADS).params
    params = jax.device_get(trainer.state.params)
    np.testing.assert_array_equal(params["visual"]["positional_embedding"],
                                  resize.resize_position_grid(source["visual"]["positional_embedding"], 3))
    np.testing.assert_array_equal(params["text"]["positional_embedding"], source["text"]["positional_embedding"][:8])
    data = make_pipeline(config.data, global_batch_size=8, image_size=24, context_length=8, seed=0)
    batch = next(data)
    assert batch["image"].shape == (8, 24, 24, 3) and batch["text"].shape == (8, 8)  # the tokenizer follows
    logits = task.model.apply({"params": params}, batch["image"], batch["text"])[0]
    assert logits.shape == (8, 8) and np.isfinite(logits).all()
    trainer.close()


def test_init_from_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = _export(_config(), tmp_path / "start.pt", seed=1)
    config = _config(init_from=str(path))
    config.model.text.layers = 3
    with pytest.raises(ValueError, match="does not fit the configured model"):
        _trainer(config, tmp_path / "run")


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


def test_resize_text_positions_truncates_or_matches_torch_linear():
    posemb = np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32)
    np.testing.assert_array_equal(resize.resize_text_positions(posemb, 5), posemb[:5])
    want = torch.nn.functional.interpolate(torch.from_numpy(posemb.T)[None], size=40, mode="linear", align_corners=False)
    np.testing.assert_allclose(resize.resize_text_positions(posemb, 40), want[0].T.numpy(), atol=1e-5)


def test_load_variables_at_a_new_resolution_runs(tmp_path):
    path = _export(_config(), tmp_path / "start.safetensors", seed=1)
    cfg, variables, _ = weights.load_variables(path, image_size=32, context_length=24, **HEADS)
    assert (cfg.vision.image_size, cfg.text.context_length) == (32, 24)
    images, texts = dummy_inputs(cfg, batch=2)
    logits = CLIP(cfg).apply(variables, images, texts.at[:, 3].set(49407))[0]
    assert logits.shape == (2, 2) and np.isfinite(logits).all()


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


@pytest.mark.parametrize("scan_layers, unlocked", [(True, 0), (False, 2)])
def test_lit_frozen_parameters_get_no_state_and_never_change(tmp_path, scan_layers, unlocked):
    config = _config(lock_image=True, lock_image_unlocked_groups=unlocked, lock_text=not scan_layers,
                     lock_text_unlocked_layers=3 if not scan_layers else 0,  # text: all but its stem trains
                     scan_layers=scan_layers)
    task, trainer = _trainer(config, tmp_path / "locked")
    _, unlocked_trainer = _trainer(_config(scan_layers=scan_layers), tmp_path / "free")
    frozen = _leaves(frozen_mask(trainer.state.params, task.frozen))
    frozen_count = sum(_size(v) for name, v in _leaves(trainer.state.params).items() if frozen[name])
    # AdamW keeps two moments per trained parameter; frozen ones have none.
    assert _size(unlocked_trainer.state.opt_state) - _size(trainer.state.opt_state) == 2 * frozen_count
    unlocked_trainer.close()

    before = _leaves(trainer.state.params)
    data = make_pipeline(config.data, global_batch_size=8, image_size=16, context_length=16, seed=0)
    after = _leaves(trainer.fit(data).state.params)
    trainer.close()
    for name, value in before.items():
        if frozen[name]:
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    trained = ["logit_scale", "text/ln_final/scale"] + (["visual/proj", "visual/ln_post/scale", "text/transformer/resblocks_0/mlp/c_fc/kernel",
                                                         "visual/transformer/resblocks_1/mlp/c_fc/kernel"] if unlocked else [])
    for name in trained:
        assert not np.array_equal(after[name], before[name]), name
    assert frozen["visual/conv1/kernel"] and frozen["text/token_embedding/embedding"] == (not scan_layers)


def test_lit_locked_resnet_keeps_its_batchnorm_statistics(tmp_path):
    config = _config(clip_rn50.get_config, lock_image=True)
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


def test_lit_smoke_recipe_starts_from_the_smoke_export(tmp_path):
    """The two documented commands: a smoke run that exports, then LiT from its image tower."""
    source = _config(export_openai=True)
    run(source, tmp_path / "clip_smoke")
    lit = clip_lit_smoke.get_config(str(tmp_path / "clip_smoke" / "clip_openai.safetensors"))
    lit.model, lit.data, lit.zeroshot_shapes, lit.fewshot_shapes = source.model, source.data, None, None
    lit.trainer.update(total_steps=2, global_batch_size=8, log_every=1, checkpoint_every=2, progress=False)
    summary = run(lit, tmp_path / "lit")
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert lit.lock_image and lit.init_from_tower == "image"


def test_context_length_is_configurable_at_full_scale():
    config = clip_vit_b32.get_config()
    assert model_config(config.model).text.context_length == 77  # None: the variant's
    config.model.text.context_length = 32
    assert model_config(config.model).text.context_length == 32
