"""DALL·E in JAX/Flax: the discrete VAE image tokenizer (and, as it lands, the transformer).

    from dalle_jax import load_dvae
    dvae = load_dvae("encoder.pkl", "decoder.pkl", trust_pickle=True)
    codes = dvae.encode(images)   # (B, 256, 256, 3) in [0, 1] -> (B, 32, 32) int32
    images = dvae.decode(codes)   # -> (B, 256, 256, 3) in [0, 1]
"""

from dalle_jax.api import PretrainedDVAE, load_dvae
from dalle_jax.dvae import DVAE, Decoder, DVAEConfig, Encoder

__all__ = ["DVAE", "DVAEConfig", "Decoder", "Encoder", "PretrainedDVAE", "load_dvae"]
