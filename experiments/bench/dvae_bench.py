"""The full-size dVAE (OpenAI's released sizes) against the `dall-e` PyTorch reference.

Both run the reference's random-init weights (converted with `dalle_jax.dvae_weights`) on the same
batch of 256 x 256 images. Encode = images -> argmax codes (with `map_pixels`); decode = codes ->
images (one-hot, decoder, sigmoid, `unmap_pixels`). Codes are checked identical, reconstructions
allclose.
"""

from __future__ import annotations

import jax
import numpy as np
import torch
from dall_e import utils as ref_utils
from dall_e.decoder import Decoder as RefDecoder
from dall_e.encoder import Encoder as RefEncoder

from dalle_jax.api import decode_to_images, encode_to_codes
from dalle_jax.dvae import DVAEConfig
from dalle_jax.dvae_weights import infer_config, params_from_state_dict
from experiments.bench.harness import Section, Settings, add_roofline, compare, max_abs_diff, xla_flops

TARGET = 1.3  # issue 12: the dVAE at >= 1.3x its reference on CPU


def run(settings: Settings) -> Section:
    batch = 1 if settings.toy else 16 if settings.accelerator else 2
    size = 64 if settings.toy else 256
    torch.manual_seed(0)
    enc, dec = RefEncoder(), RefDecoder()  # the released sizes: n_hid 256, vocab 8192
    enc_sd = {k: v.numpy() for k, v in enc.state_dict().items()}
    dec_sd = {k: v.numpy() for k, v in dec.state_dict().items()}
    config = infer_config(enc_sd, dec_sd)
    assert config == DVAEConfig(), config
    enc_params = jax.device_put(params_from_state_dict(enc_sd, config, "encoder"))
    dec_params = jax.device_put(params_from_state_dict(dec_sd, config, "decoder"))

    images = np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32)
    images_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    images_j = jax.device_put(images)

    @torch.inference_mode()
    def ref_encode():
        return torch.argmax(enc(ref_utils.map_pixels(images_t)), dim=1).numpy()

    codes = ref_encode()
    codes_t, codes_j = torch.from_numpy(codes), jax.device_put(codes.astype(np.int32))

    @torch.inference_mode()
    def ref_decode():
        one_hot = torch.nn.functional.one_hot(codes_t, config.vocab_size).permute(0, 3, 1, 2).float()
        return ref_utils.unmap_pixels(torch.sigmoid(dec(one_hot)[:, :3])).permute(0, 2, 3, 1).numpy()

    def identical_codes(ours, reference) -> float:
        agree = float((np.asarray(ours) == reference).mean())
        if agree < 1.0:
            raise AssertionError(f"dVAE codes agree with the reference on {100 * agree:.3f}% of positions, not all")
        return 0.0

    encode = compare("dVAE encode", "images/s", batch, lambda: encode_to_codes(enc_params, images_j, config=config),
                     ref_encode, check=identical_codes, target=settings.cpu_target(TARGET), repeats=settings.repeats,
                     batch=batch)
    decode = compare("dVAE decode", "images/s", batch, lambda: decode_to_images(dec_params, codes_j, config=config),
                     ref_decode, check=lambda o, r: max_abs_diff(o, r, atol=1e-5), target=settings.cpu_target(TARGET),
                     repeats=settings.repeats, batch=batch)
    if settings.peak_flops_per_s:  # ours decodes with fewer FLOPs than the reference: the ceiling counts ours
        add_roofline(encode, xla_flops(encode_to_codes, enc_params, images_j, config=config), batch, settings)
        add_roofline(decode, xla_flops(decode_to_images, dec_params, codes_j, config=config), batch, settings)
    results = [encode, decode]
    return Section("dVAE", f"Released sizes (n_hid 256, vocab 8192), fp32, batch {batch} of {size} x {size} images; "
                   "codes checked identical, reconstructions within 1e-5.", results)
