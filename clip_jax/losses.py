"""CLIP's contrastive losses, for a batch sharded over data-parallel devices.

Two losses, each with a plain global form and a memory-efficient sharded form:

* `softmax_contrastive_loss`: the symmetric InfoNCE loss of CLIP (Radford et al.
  2021, figure 3). Sharded, it is open_clip's `ClipLoss(local_loss=True,
  gather_with_grad=True)`: every device scores its own rows against the
  all-gathered features of the other modality, so it holds (B_local, B)
  logits instead of (B, B).
* `sigmoid_loss`: SigLIP's pairwise sigmoid loss (Zhai et al. 2023, algorithm 1).
  Sharded, it is the chunked form of section 3.3: text chunks travel around a
  ring of devices with `ppermute`, so a device only ever holds (B_local,
  B_local) logits.

Callers pass *unnormalised* features of any float dtype: both losses
L2-normalise them here, in fp32 (normalising twice changes nothing), and
compute logits, temperature and loss in fp32.

`mesh=None` computes on global arrays and lets jit's partitioner place the
(B, B) logits. With a mesh, the batch dimension is split over the mesh's batch
axes ("data", "fsdp") inside `jax.shard_map`; any other mesh axis ("tensor")
holds replicas of the same rows, which the shard_map's specs declare as such,
so they are counted once in values and gradients. Both forms give the same
loss, gradients and metrics (tests/test_losses.py, under every mesh preset).

Metrics (fractions of the global batch): `i2t_accuracy`, the images whose own
caption scores strictly higher than every other caption in the batch, and
`t2i_accuracy`, the same for captions; plus the temperature `logit_scale`
(and `logit_bias`) actually used.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from clip_jax.model import MAX_LOGIT_SCALE, normalize
from common.sharding import BATCH_AXES, check_batch_divisible

Metrics = dict[str, jax.Array]


# --------------------------------------------------------------------------- softmax


def softmax_contrastive_loss(
    image_features: jax.Array,
    text_features: jax.Array,
    logit_scale: jax.Array,
    *,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, Metrics]:
    """CLIP's symmetric cross entropy over the global batch (Radford et al. 2021, figure 3).

    image_features, text_features: (B, D), row i of each a matching pair.
    logit_scale: scalar log-temperature; the logits are
    min(exp(logit_scale), 100) * cos(image_i, text_j) (section 2.5's clipping).
    Returns (loss, metrics); loss = (CE(image->text) + CE(text->image)) / 2, each
    a mean over the B rows.
    """
    images, texts, b = _prepare(image_features, text_features, logit_scale)
    scale = jnp.minimum(jnp.exp(jnp.asarray(logit_scale, jnp.float32)), MAX_LOGIT_SCALE)
    if mesh is None:
        logits = scale * images @ texts.T  # (B, B)
        labels = jnp.arange(b)
        sums = _softmax_rows(logits, labels), _softmax_rows(logits.T, labels)
    else:
        sums = _sharded(_softmax_local, mesh, b, images, texts, scale)
    (loss_i, correct_i), (loss_t, correct_t) = sums
    metrics = {"i2t_accuracy": correct_i / b, "t2i_accuracy": correct_t / b, "logit_scale": scale}
    return (loss_i + loss_t) / (2 * b), metrics


def _softmax_rows(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits (n, B), labels (n,) -> (sum of the n cross entropies, rows whose label scores highest)."""
    positive = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]  # (n,)
    others = jnp.where(jnp.arange(logits.shape[1]) == labels[:, None], -jnp.inf, logits)
    correct = jnp.sum(positive > jnp.max(others, axis=1))
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - positive), correct


def _softmax_local(images: jax.Array, texts: jax.Array, scale: jax.Array, axes: tuple[str, ...]):
    """One device's share: its rows (b, D) of each modality against all B of the other.

    all_gather's transpose is a reduce-scatter, so each device's features also
    receive the gradient of the other devices' logits that use them.
    """
    all_images = jax.lax.all_gather(images, axes, tiled=True)  # (B, D)
    all_texts = jax.lax.all_gather(texts, axes, tiled=True)  # (B, D)
    local = images.shape[0]
    labels = jax.lax.axis_index(axes) * local + jnp.arange(local)  # this device's rows in the global batch
    per_image = _softmax_rows(scale * images @ all_texts.T, labels)  # logits (b, B)
    per_text = _softmax_rows(scale * texts @ all_images.T, labels)  # logits (b, B)
    return jax.lax.psum((per_image, per_text), axes)


# --------------------------------------------------------------------------- sigmoid


def sigmoid_loss(
    image_features: jax.Array,
    text_features: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    *,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, Metrics]:
    """SigLIP's loss (Zhai et al. 2023, algorithm 1): -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)).

    image_features, text_features: (B, D), row i of each a matching pair;
    z_ij = 1 for i == j and -1 otherwise; t = exp(logit_scale), unclipped as in
    the paper (log_sigmoid is finite for any logit); b = logit_bias. The paper
    initialises logit_scale = log 10 and logit_bias = -10.
    Returns (loss, metrics).
    """
    images, texts, b = _prepare(image_features, text_features, logit_scale)
    if jnp.shape(logit_bias) != ():
        raise ValueError(f"logit_bias must be a scalar, got shape {jnp.shape(logit_bias)}.")
    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    bias = jnp.asarray(logit_bias, jnp.float32)
    if mesh is None:
        loss, (diagonal, image_best, text_best) = _sigmoid_block(images, texts, scale, bias, True)
        correct_i, correct_t = jnp.sum(diagonal > image_best), jnp.sum(diagonal > text_best)
    else:
        loss, correct_i, correct_t = _sharded(_sigmoid_ring, mesh, b, images, texts, scale, bias)
    metrics = {"i2t_accuracy": correct_i / b, "t2i_accuracy": correct_t / b, "logit_scale": scale, "logit_bias": bias}
    return loss / b, metrics


def _sigmoid_block(images: jax.Array, texts: jax.Array, scale: jax.Array, bias: jax.Array, holds_positives: bool):
    """One block of pairs: images (n, D) x texts (n, D).

    Returns (summed loss, (positive logits (n,) or None, best negative logit
    per image row (n,), per text column (n,))). Positives lie on the diagonal
    of the block where images and texts come from the same rows.
    """
    logits = scale * images @ texts.T + bias  # (n, n)
    if holds_positives:
        eye = jnp.eye(logits.shape[0], dtype=bool)
        loss = -jnp.sum(jax.nn.log_sigmoid(jnp.where(eye, logits, -logits)))
        positives, negatives = jnp.diagonal(logits), jnp.where(eye, -jnp.inf, logits)
    else:
        loss, positives, negatives = -jnp.sum(jax.nn.log_sigmoid(-logits)), None, logits
    return loss, (positives, jnp.max(negatives, axis=1), jnp.max(negatives, axis=0))


# Only this block's inputs are kept for the backward pass, not its (b, b) logits.
_negative_block = jax.checkpoint(
    lambda images, texts, scale, bias: _sigmoid_block(images, texts, scale, bias, False), prevent_cse=False
)


def _sigmoid_ring(images: jax.Array, texts: jax.Array, scale: jax.Array, bias: jax.Array, axes: tuple[str, ...]):
    """One device's share (Zhai et al. 2023, section 3.3): its images against every text chunk.

    Step 0 pairs the device's own rows (the only positives). Then, N-1 times,
    each device passes its current text chunk to the next device of the ring
    and scores its images against the chunk it receives. A chunk carries its
    positive logits and the best negative seen so far for each of its texts,
    which gives text->image accuracy without gathering anything.
    """
    n = jax.lax.axis_size(axes)
    ring = [(i, (i + 1) % n) for i in range(n)]
    loss, (positives, image_best, text_best) = _sigmoid_block(images, texts, scale, bias, True)

    def step(carry, _):
        chunk, loss, image_best = carry
        chunk = jax.lax.ppermute(chunk, axes, ring)
        texts, chunk_positives, chunk_best = chunk
        block_loss, (_, row_best, column_best) = _negative_block(images, texts, scale, bias)
        chunk = texts, chunk_positives, jnp.maximum(chunk_best, column_best)
        return (chunk, loss + block_loss, jnp.maximum(image_best, row_best)), None

    carry = ((texts, positives, text_best), loss, image_best)
    ((_, chunk_positives, text_best), loss, image_best), _ = jax.lax.scan(step, carry, length=n - 1)
    correct_i = jnp.sum(positives > image_best)
    correct_t = jnp.sum(chunk_positives > text_best)  # wherever each chunk ended up
    return jax.lax.psum((loss, correct_i, correct_t), axes)


# --------------------------------------------------------------------------- shared


def contrastive_loss(
    kind: Literal["softmax", "sigmoid"],
    image_features: jax.Array,
    text_features: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array | None = None,
    *,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, Metrics]:
    """`softmax_contrastive_loss` (CLIP) or `sigmoid_loss` (SigLIP) by name; only sigmoid takes a bias."""
    if kind == "softmax":
        if logit_bias is not None:
            raise ValueError("The softmax contrastive loss has no logit_bias; pass None, or use kind='sigmoid'.")
        return softmax_contrastive_loss(image_features, text_features, logit_scale, mesh=mesh)
    if kind == "sigmoid":
        if logit_bias is None:
            raise ValueError("The sigmoid loss needs a logit_bias (SigLIP initialises it to -10).")
        return sigmoid_loss(image_features, text_features, logit_scale, logit_bias, mesh=mesh)
    raise ValueError(f"Unknown contrastive loss kind {kind!r}; expected 'softmax' or 'sigmoid'.")


def _prepare(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array) -> tuple[jax.Array, jax.Array, int]:
    """Checks the shapes and L2-normalises both modalities in fp32; returns (images, texts, B)."""
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"Expected image and text features of the same shape (B, D), got {image_features.shape} and "
            f"{text_features.shape}. Pool or project both towers to the shared embedding first."
        )
    if jnp.shape(logit_scale) != ():
        raise ValueError(f"logit_scale must be a scalar, got shape {jnp.shape(logit_scale)}.")
    return normalize(image_features), normalize(text_features), image_features.shape[0]


def _sharded(local_fn: Callable, mesh: Mesh, global_batch: int, images, texts, *scalars):
    """Runs `local_fn(images, texts, *scalars, axes)` per device, the batch split over the batch axes.

    Axes outside BATCH_AXES (tensor) see the same rows; in_specs that do not
    name them declare the inputs replicated there, so the transpose of the
    shard_map does not sum the replicas' gradients.
    """
    axes = tuple(name for name in BATCH_AXES if name in mesh.shape)
    check_batch_divisible(global_batch, mesh)
    rows = P(axes, None)
    fn = jax.shard_map(
        lambda i, t, *s: local_fn(i, t, *s, axes),
        mesh=mesh,
        in_specs=(rows, rows) + (P(),) * len(scalars),
        out_specs=P(),
    )
    return fn(images, texts, *scalars)
