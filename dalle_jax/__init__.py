"""DALL·E in JAX/Flax: the discrete VAE image tokenizer and the text-to-image transformer.

    from dalle_jax import load_dvae, load_run, generate
    dvae = load_dvae("encoder.pkl", "decoder.pkl", trust_pickle=True)
    codes = dvae.encode(images)   # (B, 256, 256, 3) in [0, 1] -> (B, 32, 32) int32
    images = dvae.decode(codes)   # -> (B, 256, 256, 3) in [0, 1]

    trained = load_run("runs/dalle")                       # a DALL·E training workdir
    out = generate(trained, ["a red circle."], n=64, keep=8, clip=clip_jax.load("ViT-B-32.pt"))
"""

from dalle_jax.api import PretrainedDVAE, load_dvae
from dalle_jax.dvae import DVAE, Decoder, DVAEConfig, Encoder
from dalle_jax.generate import TrainedDALLE, generate, load_run
from dalle_jax.transformer import DALLE
from dalle_jax.variants import DALLEConfig, decode_variant

__all__ = ["DALLE", "DALLEConfig", "DVAE", "DVAEConfig", "Decoder", "Encoder", "PretrainedDVAE", "TrainedDALLE",
           "decode_variant", "generate", "load_dvae", "load_run"]
