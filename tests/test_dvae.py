"""dVAE: parity with OpenAI's `dall-e` package, parameter counts, sharding, likelihood, loading."""

import math

import attr
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from dall_e import utils as ref_utils
from dall_e.decoder import Decoder as RefDecoder
from dall_e.encoder import Encoder as RefEncoder
from flax import linen as nn

from common import sharding as sh
from dalle_jax import load_dvae
from dalle_jax.dvae import (
    DVAE,
    Decoder,
    DVAEConfig,
    Encoder,
    gumbel_softmax,
    logit_laplace_nll,
    map_pixels,
    unmap_pixels,
)
from dalle_jax.dvae_weights import (
    UnsafeCheckpointError,
    WeightsMismatchError,
    expected_shapes,
    infer_config,
    params_from_state_dict,
    state_dict_from_params,
)

# Below the reference's validators (n_hid >= 64, vocab >= 512), which only guard its released sizes.
SMALL = dict(n_hid=16, n_blk_per_group=2, vocab_size=64)
N_INIT = 12
N_LAYERS = 4 * SMALL["n_blk_per_group"]


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Random biases (the reference initializes them to zero) and residual branches scaled up by
    n_layers, so that they visibly change the output despite the 1 / n_layers**2 post-gain."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".b"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "res_path.conv_4" in name:
                p.mul_(N_LAYERS)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    with attr.validators.disabled():
        enc = RefEncoder(**SMALL)
        dec = RefDecoder(n_init=N_INIT, **SMALL)
    _perturb(enc, 1)
    _perturb(dec, 2)
    return enc, dec


def _numpy_sd(module):
    return {k: v.numpy() for k, v in module.state_dict().items()}


def _ref_encode(enc, images):  # NHWC [0, 1] -> logits NHWC
    x = ref_utils.map_pixels(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    with torch.no_grad():
        return enc(x).permute(0, 2, 3, 1).numpy()


def _ref_decode(dec, codes):  # int codes -> (stats NHWC, reconstruction NHWC)
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(codes), SMALL["vocab_size"]).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        stats = dec(one_hot)
    rec = ref_utils.unmap_pixels(torch.sigmoid(stats[:, :3]))
    return stats.permute(0, 2, 3, 1).numpy(), rec.permute(0, 2, 3, 1).numpy()


def _images(seed=0, shape=(2, 32, 48, 3)):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _codes(seed=1, shape=(2, 4, 6)):
    return np.random.default_rng(seed).integers(0, SMALL["vocab_size"], shape).astype(np.int64)


def test_parity_with_reference(reference):
    enc, dec = reference
    enc_sd, dec_sd = _numpy_sd(enc), _numpy_sd(dec)
    config = infer_config(enc_sd, dec_sd)
    assert config == DVAEConfig(group_count=4, n_init=N_INIT, **SMALL)
    images = _images()  # non-square, so a height/width mix-up cannot pass
    ref_logits = _ref_encode(enc, images)
    enc_params = {"params": params_from_state_dict(enc_sd, config, "encoder")}
    logits = np.asarray(Encoder(config).apply(enc_params, map_pixels(images)))
    assert logits.shape == (2, 4, 6, SMALL["vocab_size"])
    assert np.abs(logits - ref_logits).max() <= 1e-4
    np.testing.assert_array_equal(logits.argmax(-1), ref_logits.argmax(-1))

    codes = _codes()
    ref_stats, _ = _ref_decode(dec, codes)
    dec_params = {"params": params_from_state_dict(dec_sd, config, "decoder")}
    from_codes = np.asarray(Decoder(config).apply(dec_params, codes.astype(np.int32)))
    from_one_hot = np.asarray(Decoder(config).apply(dec_params, jax.nn.one_hot(codes, SMALL["vocab_size"])))
    assert from_codes.shape == (2, 32, 48, 6)
    assert np.abs(from_codes - ref_stats).max() <= 1e-4
    assert np.abs(from_one_hot - ref_stats).max() <= 1e-4


def test_full_size_parameter_counts():
    meta = torch.device("meta")  # shapes only: nothing allocated
    ref = {"encoder": RefEncoder(device=meta), "decoder": RefDecoder(device=meta)}
    for part, module in ref.items():
        ours = sum(math.prod(s) for s in expected_shapes(DVAEConfig(), part).values())
        assert ours == sum(p.numel() for p in module.parameters()), part
    # The released sizes, for the record: 53.8M + 43.8M.
    assert sum(p.numel() for p in ref["encoder"].parameters()) == 53_786_240


def _sharded_init(preset):
    config = DVAEConfig(group_count=2, n_hid=32, n_blk_per_group=1, vocab_size=64, n_init=16)
    model = DVAE(config)
    x = jnp.zeros((8, 4, 4, 3))
    init = lambda rng: model.init({"params": rng, "gumbel": rng}, x, 1.0)  # noqa: E731
    rng = jax.random.key(0, impl="rbg")  # compiles much faster than threefry on CPU
    abstract = jax.eval_shape(init, rng)
    boxed = jax.tree.leaves(abstract, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in boxed), "every parameter needs logical axis names"
    return sh.init_sharded(init, rng, mesh=sh.make_mesh(preset))[0]["params"]


def test_fsdp_shards_big_kernels(n_devices):
    params = _sharded_init("fsdp")
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    big = {k: v for k, v in flat.items() if v.ndim == 4 and v.shape[2] % n_devices == 0}
    assert len(big) > 10
    for name, value in big.items():
        assert value.sharding.spec[2] == "fsdp", name
        assert value.addressable_shards[0].data.shape[2] == value.shape[2] // n_devices, name
    # The 3-channel stem can't be split 8 ways and stays whole.
    assert flat["['encoder']['input']['kernel']"].sharding.spec == jax.sharding.PartitionSpec(None, None, None, None)


def test_fsdp_tp_never_reuses_a_mesh_axis():
    params = _sharded_init("fsdp_tp")
    specs = {jax.tree_util.keystr(p): v.sharding.spec for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name, spec in specs.items():
        axes = [a for dim in spec if dim is not None for a in ((dim,) if isinstance(dim, str) else dim)]
        assert len(axes) == len(set(axes)), (name, spec)
    assert tuple(specs["['encoder']['output']['kernel']"]) == (None, None, "fsdp", "tensor")
    assert tuple(specs["['decoder']['input']['kernel']"]) == (None, None, "fsdp", "tensor")


def test_map_and_unmap_pixels_match_reference():
    x = _images(shape=(2, 8, 8, 3))
    x_t = torch.from_numpy(x).permute(0, 3, 1, 2)
    np.testing.assert_allclose(map_pixels(x), ref_utils.map_pixels(x_t).permute(0, 2, 3, 1).numpy(), atol=1e-7)
    y = x * 1.4 - 0.2  # reaches outside [eps, 1 - eps]: unmap clips
    y_t = torch.from_numpy(y).permute(0, 3, 1, 2)
    np.testing.assert_allclose(unmap_pixels(y), ref_utils.unmap_pixels(y_t).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(unmap_pixels(map_pixels(x)), x, atol=1e-6)


def test_logit_laplace_nll_matches_laplace_density_of_logit():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 0.9, (4, 5, 5, 3))
    mu, log_b = rng.normal(0, 2, x.shape), rng.normal(-1, 1, x.shape)
    stats = np.concatenate([mu, log_b], -1).astype(np.float32)
    # Change of variables: the density of x is Laplace(logit x; mu, b) * d logit(x) / dx.
    expected = -(scipy.stats.laplace.logpdf(np.log(x / (1 - x)), loc=mu, scale=np.exp(log_b)) - np.log(x * (1 - x)))
    np.testing.assert_allclose(logit_laplace_nll(x.astype(np.float32), stats), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mu, log_b", [(0.0, 0.0), (1.5, -1.0), (-2.0, -2.5), (0.3, 0.7)])
def test_logit_laplace_density_integrates_to_one(mu, log_b):
    x = np.linspace(1e-7, 1 - 1e-7, 2_000_001, dtype=np.float64)
    stats = np.broadcast_to(np.asarray([mu, log_b], np.float32), (1, 1, x.size, 2))
    density = np.exp(-np.asarray(logit_laplace_nll(x.astype(np.float32).reshape(1, 1, -1, 1), stats), np.float64))
    assert abs(np.trapezoid(density.ravel(), x) - 1.0) < 2e-3


def test_gumbel_softmax_hard_is_one_hot_with_soft_gradient():
    logits = jax.random.normal(jax.random.key(0), (3, 4, 10))
    rng = jax.random.key(1)
    soft = gumbel_softmax(rng, logits, 0.5)
    hard = gumbel_softmax(rng, logits, 0.5, hard=True)
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(hard, jax.nn.one_hot(soft.argmax(-1), 10), atol=1e-6)
    w = jnp.arange(10.0)
    grad_soft = jax.grad(lambda l: (gumbel_softmax(rng, l, 0.5) * w).sum())(logits)
    grad_hard = jax.grad(lambda l: (gumbel_softmax(rng, l, 0.5, hard=True) * w).sum())(logits)
    np.testing.assert_allclose(grad_hard, grad_soft, atol=1e-6)
    assert np.abs(grad_soft).max() > 1e-3


# ---------------------------------------------------------------- load_dvae


@pytest.fixture(scope="module")
def checkpoints(reference, tmp_path_factory):
    """The reference models saved the three ways: whole pickled modules (OpenAI's .pkl format),
    torch state dicts and safetensors."""
    from safetensors.torch import save_file

    enc, dec = reference
    d = tmp_path_factory.mktemp("dvae")
    out = {}
    for part, module in (("encoder", enc), ("decoder", dec)):
        torch.save(module, d / f"{part}.pkl")
        torch.save(module.state_dict(), d / f"{part}.pt")
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, d / f"{part}.safetensors")
    for suffix in ("pkl", "pt", "safetensors"):
        out[suffix] = (d / f"encoder.{suffix}", d / f"decoder.{suffix}")
    return out


def test_pickled_modules_refused_without_trust_pickle(checkpoints):
    with pytest.raises(UnsafeCheckpointError, match="trust_pickle=True"):
        load_dvae(*checkpoints["pkl"])


@pytest.mark.parametrize("fmt", ["pkl", "pt", "safetensors"])
def test_load_dvae_matches_reference(fmt, checkpoints, reference):
    enc, dec = reference
    dvae = load_dvae(*checkpoints[fmt], trust_pickle=fmt == "pkl")
    assert dvae.config == DVAEConfig(group_count=4, n_init=N_INIT, **SMALL)
    images = _images(seed=3)
    codes = dvae.encode(images)
    assert codes.dtype == jnp.int32 and codes.shape == (2, 4, 6)
    np.testing.assert_array_equal(codes, _ref_encode(enc, images).argmax(-1))
    rec = dvae.decode(codes)
    _, ref_rec = _ref_decode(dec, np.asarray(codes, np.int64))
    assert rec.shape == images.shape
    assert np.abs(np.asarray(rec) - ref_rec).max() <= 1e-4


def test_load_dvae_encoder_only_and_bfloat16(checkpoints, reference):
    dvae = load_dvae(checkpoints["pt"][0], None, dtype=jnp.bfloat16)
    images = _images(seed=4)
    agree = (np.asarray(dvae.encode(images)) == _ref_encode(reference[0], images).argmax(-1)).mean()
    assert agree > 0.8  # bf16 compute flips only near-ties
    with pytest.raises(ValueError, match="without a decoder"):
        dvae.decode(np.zeros((1, 2, 2), np.int32))


def test_mismatched_checkpoint_lists_every_problem(reference, tmp_path):
    sd = dict(reference[0].state_dict())
    del sd["blocks.group_2.block_1.res_path.conv_3.w"]
    sd["blocks.group_2.block_1.extra.w"] = torch.zeros(3)
    sd["blocks.group_1.block_2.res_path.conv_1.w"] = torch.zeros(4, 16, 5, 5)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(WeightsMismatchError) as err:
        load_dvae(tmp_path / "bad.pt", None)
    message = str(err.value)
    assert "missing: ['blocks.group_2.block_1.res_path.conv_3.w']" in message
    assert "unexpected: ['blocks.group_2.block_1.extra.w']" in message
    assert "'blocks.group_1.block_2.res_path.conv_1.w': ((4, 16, 3, 3), (4, 16, 5, 5))" in message


def test_encode_decode_reject_bad_inputs(checkpoints):
    dvae = load_dvae(*checkpoints["pt"])
    good = _images(shape=(1, 16, 16, 3))
    cases = [
        (dvae.encode, good[0], "expected images"),
        (dvae.encode, good[:, :12], "multiples of 8"),
        (dvae.encode, good[..., :1], "expected images"),
        (dvae.encode, (good * 255).astype(np.uint8), "divide uint8 images by 255"),
        (dvae.encode, good * 2, r"values in \[0, 1\]"),
        (dvae.decode, np.zeros((1, 2), np.int32), "integer codes"),
        (dvae.decode, np.zeros((1, 2, 2), np.float32), "integer codes"),
        (dvae.decode, np.full((1, 2, 2), 64), r"codes in \[0, 64\)"),
    ]
    for fn, arg, match in cases:
        with pytest.raises(ValueError, match=match):
            fn(arg)
    with pytest.raises(FileNotFoundError, match="cdn.openai.com"):
        load_dvae("/nonexistent/encoder.pkl", None)


def test_state_dict_roundtrip_loads_into_reference(reference):
    enc, _ = reference
    sd = _numpy_sd(enc)
    params = params_from_state_dict(sd, infer_config(sd), "encoder")
    back = state_dict_from_params(params)
    with attr.validators.disabled():
        fresh = RefEncoder(**SMALL)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    images = _images(seed=5)
    np.testing.assert_array_equal(_ref_encode(fresh, images), _ref_encode(enc, images))
