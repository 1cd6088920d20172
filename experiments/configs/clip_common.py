"""The shared CLIP recipe; clip_<variant>.py files pick the variant.

Full scale follows open_clip's LAION-400M runs (open_clip README, "Training"
and the LAION-400M notes): global batch 32,768 (128 A100s x 256), 32 epochs
of ~400M pairs (~390k steps), AdamW with b2=0.98, eps=1e-6, weight decay 0.2,
2,000 warmup steps then cosine decay, bf16 compute, 224px images. The ViT-B/32
run reached 62.96% zero-shot ImageNet top-1 there (OpenAI: 63.2%).

`smoke` shrinks any variant to a ~2 minute CPU run on the built-in shapes
data: a 2-layer tower of the same family, 32px images, 16-token captions.

Fine-tuning (clip_jax/finetune.py): `init_from` starts from any checkpoint
clip_jax.load reads, resized to this run's image size and context length, or
from the latest checkpoint of a training workdir of the same model;
`lock_image` / `lock_text` freeze towers (LiT), optionally but their last
groups. `model.patch_dropout` trains on a random subset of patches (FLIP).
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

LAION400M_PAIRS = 400_000_000
EPOCHS = 32


def get_clip_config(variant: str, arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke"):
        raise ValueError(f"config arg must be '' (full scale) or 'smoke', found {arg!r}")
    is_resnet = variant.startswith("RN")
    c = ml_collections.ConfigDict()
    c.task = "clip"  # experiments/run.py dispatches on this
    c.loss = "softmax"  # "softmax" (CLIP) or "sigmoid" (SigLIP)

    c.model = ml_collections.ConfigDict()
    c.model.variant = variant  # a name from clip_jax.variants
    c.model.dtype = "bfloat16"  # compute dtype; parameters and optimizer state stay float32
    c.model.remat = variant.startswith("ViT-L")  # recompute activations in the backward pass
    c.model.scan_layers = not is_resnet  # one compiled block for the whole stack: faster compiles
    c.model.freeze_batchnorm = False  # ResNets: keep stored BatchNorm statistics (fine-tuning) instead of training them
    c.model.patch_dropout = 0.0  # ViTs: fraction of patch tokens dropped per training example (FLIP uses 0.5)
    c.model.patch_dropout_until_step = placeholder(int)  # after this many optimizer steps train on all patches (None: never)
    # Overrides of VisionConfig / TextConfig fields (smoke runs); None (placeholders) keeps the variant's value.
    c.model.vision = ml_collections.ConfigDict(dict(image_size=placeholder(int)))  # e.g. 336 to fine-tune at a higher resolution
    if is_resnet:
        c.model.vision.stem_stride = placeholder(int)  # 4: OpenAI's stem; 2 or 1 keep small images' resolution
    c.model.text = ml_collections.ConfigDict(dict(context_length=placeholder(int)))  # tokens per caption (tokenizer follows)

    c.init_from = placeholder(str)  # a checkpoint clip_jax.load reads (OpenAI .pt, open_clip, HF dir, our exports) or a run's workdir; resume wins
    c.init_from_tower = "both"  # "both", "image" or "text": the other tower keeps its fresh initialisation
    c.lock_image = False  # freeze the image tower (LiT); ResNets also keep their BatchNorm statistics
    c.lock_image_unlocked_groups = 0  # ... but its last N groups (open_clip's --lock-image-unlocked-groups)
    c.lock_text = False  # freeze the text tower
    c.lock_text_unlocked_layers = 0  # ... but its last N groups (blocks; the last with ln_final; the projection)

    c.trainer = ml_collections.ConfigDict()  # common.trainer.TrainerConfig
    c.trainer.global_batch_size = 32_768
    c.trainer.total_steps = LAION400M_PAIRS * EPOCHS // 32_768
    c.trainer.mesh = "fsdp"  # common/sharding.py preset, or {"data": ..., "fsdp": ..., "tensor": ...}
    c.trainer.seed = 0
    c.trainer.log_every = 100
    c.trainer.eval_every = 5_000
    c.trainer.checkpoint_every = 2_000
    c.trainer.keep_checkpoints = 3
    c.trainer.async_checkpoints = True
    c.trainer.max_nonfinite_streak = 20
    c.trainer.progress = True

    c.optim = ml_collections.ConfigDict()  # common.optim.OptimConfig
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 2_000
    c.optim.end_lr_ratio = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.2
    c.optim.grad_clip_norm = 1.0
    c.optim.accum_steps = 1  # micro-batches per update (each trainer step is one micro-batch)
    # Updates in the schedule: follows --config.trainer.total_steps and accum_steps.
    c.optim.total_steps = c.trainer.get_ref("total_steps") // c.optim.get_ref("accum_steps")

    c.data = ml_collections.ConfigDict()  # common.data.sources.source_from_config / experiments.train_clip.make_pipeline
    c.data.source = "tar"  # "tar" (img2dataset shards), "folder", "tfds" or "shapes"
    c.data.shards = "/data/laion400m"  # a directory of .tar files, a glob, or a list of shards
    c.data.index_dir = None  # cache of per-shard member indices (None: index at start-up)
    c.data.crop_scale = (0.9, 1.0)  # RandomResizedCrop area range (open_clip default)
    c.data.workers = 8  # grain decoding processes per host
    c.eval_data = None  # a second data block evaluated every trainer.eval_every steps
    c.zeroshot_shapes = None  # zero-shot eval on the shapes data at the end (smoke runs)
    c.fewshot_shapes = None  # few-shot ridge-regression probes on the shapes data (clip_jax.linear_probe; smoke runs)
    c.export_openai = False  # at the end, write workdir/clip_openai.safetensors (OpenAI format; init_from reads it)

    if arg == "smoke":
        c.model.dtype = "float32"
        c.model.remat = False
        if is_resnet:
            c.model.vision.update(dict(image_size=32, layers=(1, 1, 1, 1), width=16, heads=4))
        else:
            c.model.vision.update(dict(image_size=32, patch_size=8, width=64, layers=2, heads=4))
        c.model.text.update(dict(width=64, layers=2, heads=4, context_length=16))
        c.model.embed_dim = 64
        c.trainer.update(global_batch_size=64, total_steps=400, mesh="data_parallel", log_every=20,
                         eval_every=0, checkpoint_every=100, async_checkpoints=True)
        c.optim.update(learning_rate=2e-3, weight_decay=0.05)
        c.optim.warmup_steps = c.trainer.get_ref("total_steps") // 10  # 40; follows --config.trainer.total_steps
        c.data = ml_collections.ConfigDict(dict(source="shapes", split="train", num_examples=20_000, render_size=32,
                                                crop_scale=(0.9, 1.0), workers=0))
        c.zeroshot_shapes = ml_collections.ConfigDict(dict(splits=("validation", "heldout"), num_examples=512,
                                                           batch_size=64))
        # k-shot sets (big_vision's shots) drawn per seed from train_examples, scored on test_examples.
        c.fewshot_shapes = ml_collections.ConfigDict(dict(label="shape", shots=(1, 5, 10, 25), train_examples=256,
                                                          test_examples=256, num_seeds=3, batch_size=64))
        c.export_openai = True  # a starting point for clip_lit_smoke.py
    return c
