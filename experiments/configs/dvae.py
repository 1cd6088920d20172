"""Discrete VAE training (DALL·E stage 1): `get_config("openai")` or `get_config("smoke")`.

"openai" is the paper's recipe (Ramesh et al. 2021, appendix A.2) at the released model's size
(dall_e Encoder/Decoder defaults): 256x256 images -> 32x32 codes of 8192, batch 512, 3M updates.
The paper trained on its 250M text-image pairs; here the default data are img2dataset tar shards
(LAION-400M, as the CLIP recipes). "smoke" shrinks everything to a minute on a laptop CPU, on the
built-in shapes data.

    python -m experiments.run --config experiments/configs/dvae.py:smoke --workdir runs/dvae
    python -m experiments.run --config experiments/configs/dvae.py --workdir /ckpt/dvae \\
        --config.data.shards='/data/laion400m/*.tar' --config.trainer.global_batch_size=256

Re-running a command resumes from the last checkpoint in --workdir.
"""

import ml_collections


def get_config(arg: str = "openai") -> ml_collections.ConfigDict:
    if arg not in ("openai", "smoke"):
        raise ValueError(f"dvae config: expected 'openai' or 'smoke', found {arg!r}")
    c = ml_collections.ConfigDict()
    c.task = "dvae"  # experiments/run.py dispatches on this
    c.image_size = 256  # square training and eval images; a multiple of 2 ** (group_count - 1)
    c.num_grid_images = 8  # originals and reconstructions in reconstructions.png

    c.model = ml_collections.ConfigDict()  # dalle_jax.dvae.DVAEConfig, plus the compute dtype
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators (parameters stay float32)
    c.model.group_count = 4  # resolution groups: codes are 2 ** (group_count - 1) times smaller
    c.model.n_hid = 256  # width of the first encoder group; groups double it
    c.model.n_blk_per_group = 2  # residual blocks per group
    c.model.vocab_size = 8192  # discrete codes
    c.model.n_init = 128  # decoder width after the code embedding
    c.model.channels = 3  # RGB

    c.loss = ml_collections.ConfigDict()  # dalle_jax.dvae_train.LossConfig (appendix A.2)
    c.loss.kl_weight = 6.6  # beta: KL weight after warmup
    c.loss.kl_warmup_steps = 5000  # beta rises 0 -> kl_weight over these updates
    c.loss.kl_schedule = "cosine"  # "cosine" or "linear"
    c.loss.temperature_start = 1.0  # Gumbel-softmax temperature at step 0
    c.loss.temperature_end = 1.0 / 16  # and after temperature_steps
    c.loss.temperature_steps = 150_000  # annealing length
    c.loss.temperature_schedule = "cosine"  # "cosine", "exponential" or "linear" (linear diverged in the paper)
    c.loss.straight_through = False  # hard codes forward, relaxed gradients back; the paper is fully relaxed
    c.loss.usage_weight = 0.0  # not in the paper: KL(batch-mean code distribution || uniform), keeps codes alive

    c.trainer = ml_collections.ConfigDict()  # common.trainer.TrainerConfig
    c.trainer.global_batch_size = 512  # 64 GPUs x 8 in the paper
    c.trainer.total_steps = 3_000_000  # optimizer updates
    c.trainer.mesh = "data_parallel"  # common/sharding.py preset, or {"data": ..., "fsdp": ..., "tensor": ...}
    c.trainer.seed = 0  # parameters, Gumbel noise and the data order
    c.trainer.log_every = 100  # training metrics to metrics.jsonl / TensorBoard every this many steps
    c.trainer.eval_every = 10_000  # eval MSE / PSNR every this many steps (0: only at the end)
    c.trainer.checkpoint_every = 5_000  # train state + data position
    c.trainer.keep_checkpoints = 3  # newest checkpoints kept
    c.trainer.async_checkpoints = True  # write checkpoints while training goes on
    c.trainer.ema_decay = 0.999  # parameter average per update (appendix A.2); evaluation uses it (0: none)
    c.trainer.max_nonfinite_streak = 20  # consecutive skipped non-finite steps before the run stops
    c.trainer.progress = True  # progress bar on process 0

    c.optim = ml_collections.ConfigDict()  # common.optim.OptimConfig
    c.optim.learning_rate = 1e-4  # peak step size
    c.optim.warmup_steps = 0  # the paper anneals from the peak with no warmup
    c.optim.total_steps = 1_200_000  # decay length, not tied to trainer.total_steps: the paper decays over 1.2M of 3M
    c.optim.end_lr_ratio = 1.25e-6 / 1e-4  # final step size 1.25e-6
    c.optim.b1 = 0.9  # Adam first-moment decay
    c.optim.b2 = 0.999  # second-moment decay (appendix A.2)
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.weight_decay = 1e-4  # AdamW decoupled decay on conv kernels
    c.optim.grad_clip_norm = None  # the paper mentions no clipping for the dVAE
    c.optim.accum_steps = 1  # micro-batches per update (optax.MultiSteps)

    c.data = ml_collections.ConfigDict()  # common.data.sources.source_from_config fields, plus workers
    c.data.source = "tar"  # "tar" (img2dataset shards), "folder", "tfds" or "shapes"
    c.data.shards = "/data/laion400m"  # a directory of .tar files, a glob, or a list of shards
    c.data.index_dir = None  # cache of per-shard member indices (None: index at start-up)
    c.data.workers = 8  # grain decoding processes per host
    c.eval_data = None  # held-out images (same fields as data) for MSE, PSNR and codebook usage

    if arg == "smoke":
        # 32x32 images -> 8x8 codes. A lighter KL than the paper's 6.6: over a few hundred steps the
        # full weight holds reconstructions back (about +3 dB instead of +8 dB PSNR in 200 steps).
        c.image_size = 32
        c.model.update(group_count=3, n_hid=32, n_blk_per_group=1, vocab_size=128, n_init=16)
        c.loss.update(kl_weight=1.0, kl_warmup_steps=50, temperature_steps=200, temperature_end=0.25)
        c.trainer.update(global_batch_size=16, total_steps=300, log_every=25, eval_every=100, checkpoint_every=100,
                         ema_decay=0.0)
        c.optim.update(learning_rate=3e-3, warmup_steps=10, total_steps=300, end_lr_ratio=0.1)
        # Shapes rendered at the training size: the paper's augmentation then only flips them.
        c.data = ml_collections.ConfigDict(dict(source="shapes", split="train", num_examples=2048, render_size=32,
                                                workers=0))
        c.eval_data = ml_collections.ConfigDict(dict(source="shapes", split="validation", num_examples=64,
                                                     render_size=32, workers=0))
    return c
