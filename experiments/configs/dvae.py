"""Discrete VAE training (DALL·E stage 1): `get_config("openai")` or `get_config("smoke")`.

"openai" is the paper's recipe (Ramesh et al. 2021, appendix A.2) at the released model's size
(dall_e Encoder/Decoder defaults): 256x256 images -> 32x32 codes of 8192, batch 512, 3M updates.
The paper trained on its 250M text-image pairs; here the data is the built-in shapes set until a
web-scale pipeline is configured. "smoke" shrinks everything to a minute on a laptop CPU.

    python -m experiments.run --config experiments/configs/dvae.py:smoke --workdir runs/dvae
"""

import ml_collections


def get_config(arg: str = "openai") -> ml_collections.ConfigDict:
    if arg not in ("openai", "smoke"):
        raise ValueError(f"dvae config: expected 'openai' or 'smoke', found {arg!r}")
    c = ml_collections.ConfigDict()
    c.task = "dvae"  # experiments/run.py dispatches on this
    c.seed = 0  # parameters, Gumbel noise and data order
    c.mesh = "data_parallel"  # common/sharding.py preset or {"data": ..., "fsdp": ..., "tensor": ...}
    c.dtype = "float32"  # compute dtype; "bfloat16" on accelerators (parameters stay float32)

    c.model = ml_collections.ConfigDict()  # dalle_jax.dvae.DVAEConfig
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

    c.optim = ml_collections.ConfigDict()  # common.optim.OptimConfig
    c.optim.learning_rate = 1e-4  # peak step size
    c.optim.warmup_steps = 0  # the paper anneals from the peak with no warmup
    c.optim.total_steps = 1_200_000  # cosine decay length
    c.optim.end_lr_ratio = 1.25e-6 / 1e-4  # final step size 1.25e-6
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-4  # AdamW decoupled decay on conv kernels
    c.optim.grad_clip_norm = None  # the paper mentions no clipping for the dVAE
    c.ema_decay = 0.999  # parameter averaging; evaluation uses the average (0 disables)

    c.data = ml_collections.ConfigDict()
    c.data.image_size = 256  # square images; a multiple of 2 ** (group_count - 1)
    c.data.train_examples = 1_000_000  # shapes examples per epoch
    c.data.eval_examples = 2048  # validation images per evaluation
    c.data.seed = 0  # which shapes images are drawn and their order
    c.batch_size = 512  # global batch (64 GPUs x 8 in the paper)
    c.num_steps = 3_000_000  # optimizer updates
    c.log_every = 100  # average training metrics over this many steps
    c.eval_every = 10_000  # reconstruction metrics and image grids
    c.num_grid_images = 8  # originals and reconstructions per grid

    if arg == "smoke":
        # 32x32 images -> 8x8 codes. A lighter KL than the paper's 6.6: over a few hundred steps the
        # full weight holds reconstructions back (about +3 dB instead of +8 dB PSNR in 200 steps).
        c.model.update(group_count=3, n_hid=32, n_blk_per_group=1, vocab_size=128, n_init=16)
        c.loss.update(kl_weight=1.0, kl_warmup_steps=50, temperature_steps=200, temperature_end=0.25)
        c.optim.update(learning_rate=3e-3, warmup_steps=10, total_steps=300, end_lr_ratio=0.1)
        c.ema_decay = 0.0
        c.data.update(image_size=32, train_examples=2048, eval_examples=64)
        c.batch_size = 16
        c.num_steps = 300
        c.log_every = 25
        c.eval_every = 100
    return c
