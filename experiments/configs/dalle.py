"""DALL·E transformer training (stage 2): `get_config("12B")`, `get_config("smoke")`.

"12B" is the paper's model and recipe (Ramesh et al. 2021, section 2.2 and appendix B.2):
256 caption BPE tokens (vocabulary 16,384) and 32x32 codes of a frozen 8,192-code dVAE, 64
layers of width 3,968 with the row/column/conv sparse-attention schedule, AdamW with b2=0.96,
eps=1e-8, weight decay 4.5e-2, peak step size 4.5e-4 after 5,000 warmup updates, batch 1,024,
gradient clipping at 4, 430,000 updates. The paper halved the step size five times, whenever the
loss plateaued, ending 32 times lower; a cosine to 1/32 of the peak stands in for that manual
rule. Data are array_record shards of (caption, codes) written by `python -m dalle_jax.encode`
and a SentencePiece model (common/tokenizers).

"smoke" is self-contained: on the built-in shapes data it trains the dVAE of
`experiments/configs/dvae.py:smoke` in `workdir/dvae` (or reuses it), the caption tokenizer, then
the tiny transformer:

    python -m experiments.run --config experiments/configs/dalle.py:smoke --workdir runs/dalle
    python -m dalle_jax.generate --checkpoint runs/dalle --prompt "a red circle." --n 16 --keep 4

Re-running a command resumes from the last checkpoint in --workdir.
"""

import ml_collections


def get_config(arg: str = "12B") -> ml_collections.ConfigDict:
    if arg not in ("12B", "smoke"):
        raise ValueError(f"dalle config: expected '12B' or 'smoke', found {arg!r}")
    c = ml_collections.ConfigDict()
    c.task = "dalle"  # experiments/run.py dispatches on this

    c.model = ml_collections.ConfigDict()
    c.model.variant = "12B"  # a name from dalle_jax.variants
    c.model.overrides = ml_collections.ConfigDict()  # DALLEConfig fields replaced (smoke sizes, attention="dense")
    c.model.dtype = "bfloat16"  # compute dtype; parameters and optimizer state stay float32
    c.model.remat = True  # recompute each block in the backward pass (the paper checkpoints every resblock)
    c.model.scan_layers = True  # one compiled block for the whole stack
    c.caption_dropout = 0.1  # captions replaced by the empty one, for classifier-free guidance

    c.trainer = ml_collections.ConfigDict()  # common.trainer.TrainerConfig
    c.trainer.global_batch_size = 1024
    c.trainer.total_steps = 430_000  # optimizer updates (appendix B.2)
    c.trainer.mesh = "fsdp_tp"  # common/sharding.py preset, or explicit sizes
    c.trainer.seed = 0
    c.trainer.log_every = 100
    c.trainer.eval_every = 10_000  # eval loss and sample grids every this many steps (0: only at the end)
    c.trainer.checkpoint_every = 2_000
    c.trainer.keep_checkpoints = 3
    c.trainer.async_checkpoints = True
    c.trainer.ema_decay = 0.0  # parameter averaging for evaluation (0: none)
    c.trainer.max_nonfinite_streak = 20
    c.trainer.progress = True

    c.optim = ml_collections.ConfigDict()  # common.optim.OptimConfig (appendix B.2)
    c.optim.learning_rate = 4.5e-4
    c.optim.warmup_steps = 5_000
    c.optim.total_steps = c.trainer.get_ref("total_steps")
    c.optim.end_lr_ratio = 1 / 32
    c.optim.b1 = 0.9
    c.optim.b2 = 0.96
    c.optim.eps = 1e-8
    c.optim.weight_decay = 4.5e-2
    c.optim.grad_clip_norm = 4.0
    c.optim.accum_steps = 1

    c.data = ml_collections.ConfigDict()
    # "codes": array_record shards of dalle_jax.encode (default); "images": encode augmented images with the frozen
    # dVAE at every step; "shapes": render + encode the built-in data once (smoke).
    c.data.source = "codes"
    c.data.codes = "/data/dalle_codes"  # directory, glob or list of .array_record files
    c.data.images = ml_collections.ConfigDict(dict(source="tar", shards="/data/laion400m"))  # source_from_config
    c.data.tokenizer = "/data/dalle_bpe.model"  # SentencePiece model (common.tokenizers.sentencepiece.train_bpe)
    c.data.workers = 8  # grain processes per host
    c.eval_data = None  # held-out codes (same fields as data): eval loss

    c.dvae = ml_collections.ConfigDict()  # the frozen dVAE that made the codes; decodes samples
    c.dvae.workdir = None  # a finished run of experiments/configs/dvae.py; None: train one in workdir/dvae
    c.dvae.config = "openai"  # that run's config argument
    c.dvae.total_steps = None  # override of that recipe's trainer.total_steps (None: the recipe's own)

    c.samples = ml_collections.ConfigDict()  # an evaluator: image grids of sampled captions
    c.samples.captions = ("a small red circle in the top left corner.",)
    c.samples.per_caption = 4
    c.samples.guidance_scale = 1.0
    c.samples.top_k = 0
    c.samples.temperature = 1.0

    if arg == "smoke":
        c.model.variant = "tiny"
        c.model.overrides = ml_collections.ConfigDict(dict(text_len=24, image_h=8, image_w=8, image_vocab=128,
                                                           conv_kernel=5))
        c.model.update(dtype="float32", remat=False, scan_layers=False)
        c.trainer.update(global_batch_size=32, total_steps=200, mesh="data_parallel", log_every=20, eval_every=0,
                         checkpoint_every=100)
        c.optim.update(learning_rate=2e-3, warmup_steps=20, grad_clip_norm=1.0, weight_decay=0.0)
        c.data = ml_collections.ConfigDict(dict(source="shapes", split="train", num_examples=2048, workers=0,
                                                text_vocab=512))
        c.eval_data = ml_collections.ConfigDict(dict(source="shapes", split="validation", num_examples=64,
                                                     workers=0))
        c.dvae.update(config="smoke")
        c.samples.update(captions=("a red circle.", "a blue square."), per_caption=4)
    return c
