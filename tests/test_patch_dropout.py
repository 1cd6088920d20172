"""Patch dropout (FLIP): training keeps a random subset of patches per example; evaluation sees them all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from clip_jax.model import CLIP, dummy_inputs
from clip_jax.train import CLIPTask
from clip_jax.variants import CLIPConfig, TextConfig, VisionConfig
from clip_jax.vit import keep_random_patches, patches_kept
from common.layers import Transformer

CFG = CLIPConfig(16, VisionConfig(32, 1, 16, 2, patch_size=8), TextConfig(16, 2, 1, context_length=8))  # 4x4 patches


def _batch(n=4):
    rng = np.random.default_rng(0)
    texts = rng.integers(1, 100, (n, 8)).astype(np.int32)
    texts[:, 5] = CFG.text.vocab_size - 1  # end-of-text
    return {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "text": texts}


@pytest.fixture(scope="module")
def params():
    return nn.meta.unbox(jax.jit(CLIP(CFG).init)(jax.random.key(0), *dummy_inputs(CFG)))["params"]


def test_patch_dropout_keeps_the_class_token_and_different_patches_per_example():
    x = jnp.broadcast_to(jnp.arange(17.0)[None, :, None], (64, 17, 3))  # (B, 1 + 16, D): row i holds i
    kept = keep_random_patches(x, 0.5, jax.random.key(1))
    assert kept.shape == (64, 1 + 8, 3) == (64, 1 + patches_kept(16, 0.5), 3)
    ids = np.asarray(kept[:, :, 0]).astype(int)
    assert (ids[:, 0] == 0).all()  # the class token, first
    assert all(len(set(row[1:])) == 8 and min(row[1:]) >= 1 for row in ids)  # distinct patches, never the class token
    assert len({tuple(row) for row in ids}) > 32  # examples draw their own subsets
    np.testing.assert_array_equal(kept, keep_random_patches(x, 0.5, jax.random.key(1)))  # the key decides
    assert not np.array_equal(kept, keep_random_patches(x, 0.5, jax.random.key(2)))
    assert patches_kept(16, 0.99) == 1


def _transformer_lengths(fn):
    """Sequence lengths the vision transformer sees while `fn` runs."""
    lengths = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Transformer) and context.module.name == "transformer" and \
                context.module.parent.name == "visual" and context.method_name == "__call__":
            lengths.append(args[0].shape[1])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        out = fn()
    return out, lengths


def test_patch_dropout_trains_on_fewer_tokens_and_leaves_evaluation_alone(params):
    batch, rng = _batch(), jax.random.key(3)
    plain, dropped = CLIPTask(CFG), CLIPTask(CFG, patch_dropout=0.5)
    (loss, _, _), lengths = _transformer_lengths(lambda: dropped.loss(params, {}, batch, rng, jnp.int32(0)))
    assert lengths == [1 + 8]
    (full_loss, _, _), lengths = _transformer_lengths(lambda: plain.loss(params, {}, batch, rng, jnp.int32(0)))
    assert lengths == [1 + 16] and float(loss) != float(full_loss)
    np.testing.assert_array_equal(dropped.loss(params, {}, batch, rng, jnp.int32(0))[0], loss)  # rng-deterministic
    # Evaluation (and the model every bundle and evaluator uses) keeps every patch.
    for key, value in plain.eval_metrics(params, {}, batch).items():
        np.testing.assert_array_equal(dropped.eval_metrics(params, {}, batch)[key], value, err_msg=key)
    assert dropped.model.patch_dropout == 0


def test_patch_dropout_until_step_then_trains_unmasked(params):
    batch, rng = _batch(), jax.random.key(3)
    task = CLIPTask(CFG, patch_dropout=0.5, patch_dropout_until_step=10)
    loss = jax.jit(lambda update: task.loss(params, {}, batch, rng, update)[0])
    np.testing.assert_allclose(loss(9), CLIPTask(CFG, patch_dropout=0.5).loss(params, {}, batch, rng, 9)[0], rtol=1e-6)
    np.testing.assert_allclose(loss(10), CLIPTask(CFG).loss(params, {}, batch, rng, 10)[0], rtol=1e-6)


def test_patch_dropout_needs_a_vit():
    rn = CLIPConfig(16, VisionConfig(32, (1, 1, 1, 1), 8, 2), TextConfig(16, 2, 1, context_length=8))
    with pytest.raises(ValueError, match="needs a ViT image tower"):
        CLIP(rn, patch_dropout=0.5).init(jax.random.key(0), *dummy_inputs(rn))
