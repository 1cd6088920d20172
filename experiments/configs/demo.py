"""`make demo` (experiments/demo.py): CLIP, a dVAE and DALL·E trained together on the built-in shapes data,
with an independent judge of what DALL·E draws. `get_config("")` is the demo, sized to finish in under
15 minutes on 2 CPU cores; `get_config("tiny")` is the same pipeline at test size (tests/test_demo.py).

    python -m experiments.demo --workdir runs/demo
    python -m experiments.demo --workdir runs/demo_tiny --config experiments/configs/demo.py:tiny
    python -m experiments.demo --workdir runs/demo --config.clip.trainer.total_steps=2000   # any field

Each stage is one of the project's own recipes at a small size (clip_vit_b32.py:smoke, dvae.py:smoke,
dalle.py:smoke), trained by its own driver through the shared trainer. Every model sees 32 x 32 images:
the dVAE turns them into 8 x 8 codes, which keeps DALL·E's image stream at 64 tokens.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import clip_vit_b32, dalle, dvae

IMAGE_SIZE = 32  # every model's image side: CLIP's input, the dVAE's (hence DALL·E's) output, the judge's input


def clip_config(arg: str) -> ml_collections.ConfigDict:
    c = clip_vit_b32.get_config("smoke")
    c.model.vision.update(image_size=IMAGE_SIZE, patch_size=8, width=128, layers=4, heads=4)
    c.model.text.update(width=64, layers=2, heads=4)
    c.model.embed_dim = 128
    c.trainer.update(global_batch_size=128, total_steps=300, log_every=25, checkpoint_every=150)
    c.optim.learning_rate = 2e-3
    c.fewshot_shapes = None  # the demo reports zero-shot and retrieval; probes are the recipes' extra
    c.export_openai = False  # the demo restores CLIP from its checkpoints
    c.data.update(num_examples=200_000, render_size=IMAGE_SIZE)
    # Zero-shot and retrieval at the end, on images no model trained on: "validation" (colour-shape pairs
    # seen in training) and "heldout" (pairs never seen).
    c.zeroshot_shapes.update(splits=("validation", "heldout"), num_examples=1000, batch_size=250)
    if arg == "tiny":
        c.model.vision.update(width=32, layers=1)
        c.model.text.update(width=32, layers=1)
        c.model.embed_dim = 32
        c.trainer.update(global_batch_size=64, total_steps=120, log_every=20, checkpoint_every=120)
        c.optim.learning_rate = 5e-3
        c.zeroshot_shapes.update(num_examples=128, batch_size=64)
    return c


def dvae_config(arg: str) -> ml_collections.ConfigDict:
    c = dvae.get_config("smoke")
    c.model.update(n_hid=64, vocab_size=512)
    # usage_weight: the codebook's use, not in the paper. Measured at these 800 steps (1,000 validation images):
    # 0 -> PSNR 22.3 dB, perplexity 16, 480 of 512 codes dead; 0.1 -> 23.5 dB, 48, 383 dead; 0.3 -> 23.4 dB,
    # 84, 236 dead; 1.0 -> 17.1 dB (reconstruction gives way).
    c.loss.update(temperature_steps=640, temperature_end=1 / 16, usage_weight=0.1)
    c.trainer.update(total_steps=800, checkpoint_every=200, eval_every=0, log_every=50)
    c.optim.total_steps = c.trainer.get_ref("total_steps")
    c.data.num_examples = 20_000
    c.eval_data.num_examples = 512  # PSNR and codebook perplexity over these "validation" images
    if arg == "tiny":
        c.trainer.update(total_steps=30, checkpoint_every=30, log_every=10)
        c.data.num_examples = 512
        c.eval_data.num_examples = 32
    return c


def dalle_config(arg: str, dvae_run: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = dalle.get_config("smoke")
    c.model.overrides.update(width=128, layers=4, heads=4, image_vocab=dvae_run.model.get_ref("vocab_size"))
    c.trainer.update(global_batch_size=48, total_steps=500, log_every=25, checkpoint_every=250)
    c.optim.update(learning_rate=2e-3, warmup_steps=30)
    c.data.num_examples = 20_000  # (caption, codes) pairs encoded once by the dVAE
    c.eval_data.num_examples = 256
    # The dVAE stage's run (its config; experiments/demo.py sets its workdir) makes and decodes the codes.
    c.dvae = ml_collections.ConfigDict(dict(workdir=None, config=dvae_run, total_steps=None))
    c.samples.captions = ()  # the demo draws its own samples (generation below)
    if arg == "tiny":
        c.model.overrides.update(width=32, layers=2, heads=2)
        c.trainer.update(global_batch_size=32, total_steps=30, log_every=10, checkpoint_every=30)
        c.optim.warmup_steps = 3
        c.data.num_examples = 256
        c.eval_data.num_examples = 32
    return c


def judge_config(arg: str) -> ml_collections.ConfigDict:
    """experiments/demo_judge.py: a supervised CNN, trained on shapes of another seed, every colour-shape pair."""
    c = ml_collections.ConfigDict()
    c.image_size = IMAGE_SIZE
    c.widths = (32, 64, 128)  # channels of the three conv stages (two 3x3 convs each)
    c.seed = 1  # rendering seed of its training images; the demo's models and all evaluations use seed 0
    c.num_train = 48_000  # images of the colour-shape pairs of the "train" split
    c.num_heldout = 12_000  # and of the pairs held out of CLIP's and DALL·E's training (about a fifth of all)
    c.eval_examples = 1000  # real images of each evaluation split ("validation", "heldout") it is scored on
    c.trainer = ml_collections.ConfigDict(dict(global_batch_size=128, total_steps=450, mesh="data_parallel", seed=0,
                                               log_every=25, eval_every=0, checkpoint_every=150, keep_checkpoints=2,
                                               async_checkpoints=True, progress=True))
    c.optim = ml_collections.ConfigDict(dict(learning_rate=3e-3, warmup_steps=30, total_steps=450, end_lr_ratio=0.0,
                                             b2=0.999, weight_decay=1e-4, grad_clip_norm=None))
    c.optim.total_steps = c.trainer.get_ref("total_steps")
    if arg == "tiny":
        c.widths = (8, 16)
        c.num_train, c.num_heldout, c.eval_examples = 512, 128, 64
        c.trainer.update(global_batch_size=32, total_steps=20, log_every=10, checkpoint_every=20)
        c.optim.warmup_steps = 2
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "tiny"):
        raise ValueError(f"demo config: expected '' (make demo) or 'tiny' (tests), found {arg!r}")
    c = ml_collections.ConfigDict()
    c.clip = clip_config(arg)  # experiments/train_clip.py
    c.dvae = dvae_config(arg)  # experiments/train_dvae.py
    c.dalle = dalle_config(arg, c.dvae)  # experiments/train_dalle.py
    c.judge = judge_config(arg)  # experiments/demo_judge.py

    c.generation = ml_collections.ConfigDict()  # dalle_jax.generate on held-out captions, judged
    c.generation.captions = 16  # captions per group, one per colour-shape pair: seen pairs, then never-seen pairs
    c.generation.candidates = 32  # N samples per caption
    c.generation.keep = 4  # k kept after CLIP reranking (the paper: 512 -> 32)
    c.generation.temperature = 1.0
    c.generation.top_k = 0  # 0: the whole codebook
    c.generation.top_p = 1.0
    c.generation.guidance_scale = 1.0  # classifier-free guidance (caption dropout trains the unconditional model)
    c.generation.seed = 0
    c.generation.grid_captions = 6  # captions per group shown in generations.png
    if arg == "tiny":
        c.generation.update(captions=2, candidates=4, keep=2, grid_captions=2)
    return c
