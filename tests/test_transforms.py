"""The grain pipeline's image and text transforms: CLIP's center crop, augmentation, DALL·E's crop, SentencePiece captions.

Fixtures (the shapes records) and the pipeline builder: tests/helpers/pipeline_cases.py.
"""

import numpy as np
from PIL import Image

from common.data import sources
from common.data.shapes import ShapesConfig, ShapesDataset
from common.data.transforms import DalleAugment, RandomResizedCrop, SentencePieceTextTokenizer
from common.data.writers import write_image_folder
from common.images import clip_center_crop, clip_preprocess, decode_image, normalize_rgb
from tests.helpers.pipeline_cases import N, SIZE, pipe, take


def test_center_crop_is_clip_preprocess_before_normalisation(tmp_path, shapes):
    rng = np.random.default_rng(0)
    images = {"wide.png": Image.fromarray(rng.integers(0, 256, (30, 47, 3), np.uint8)),
              "tall_rgba.png": Image.fromarray(rng.integers(0, 256, (51, 29, 4), np.uint8)),
              "gray.png": Image.fromarray(rng.integers(0, 256, (33, 33), np.uint8)),
              "palette.png": Image.fromarray(rng.integers(0, 256, (40, 35, 3), np.uint8)).quantize(16),
              "photo.jpg": Image.fromarray(rng.integers(0, 256, (36, 44, 3), np.uint8))}
    for name, img in images.items():
        img.save(tmp_path / name)
    (tmp_path / "captions.tsv").write_text("".join(f"{name}\tcaption {name}\n" for name in images))
    batch = next(pipe(sources.ImageFolderSource(tmp_path), global_batch_size=5, image_size=24, train=False))
    for row, name in enumerate(images):
        np.testing.assert_array_equal(normalize_rgb(batch["image"][row]),
                                      clip_preprocess(decode_image(tmp_path / name), 24))
    # Shapes images given as arrays: CLIP's pixels too.
    val = ShapesDataset("validation", 16, ShapesConfig(image_size=SIZE))
    batch = next(pipe(sources.ShapesSource(val), train=False))
    np.testing.assert_array_equal(normalize_rgb(batch["image"]),
                                  np.stack([clip_preprocess(Image.fromarray(val[i]["image"]), SIZE) for i in range(8)]))


def test_augmentation_varies_by_epoch_and_is_reproducible(shapes):
    source = sources.ShapesSource(shapes)

    def by_record(it, n_batches):
        seen = {}
        for b in take(it, n_batches):
            for i, image in zip(b["index"].tolist(), b["image"]):
                seen.setdefault(i, []).append(image)
        return seen

    # 15 batches of 8 per epoch: two epochs.
    first, again = by_record(pipe(source, seed=2), 30), by_record(pipe(source, seed=2), 30)
    assert sorted(first) == list(range(N)) and all(len(v) == 2 for v in first.values())
    for i in first:
        np.testing.assert_array_equal(first[i], again[i])
    changed = sum(not np.array_equal(a, b) for a, b in first.values())
    assert changed >= N * 0.9
    # Every augmented view differs from the centred evaluation view of the same record.
    evaluated = {i: np.asarray(clip_center_crop(Image.fromarray(shapes[i]["image"]), SIZE)) for i in first}
    assert sum(np.array_equal(first[i][0], evaluated[i]) for i in first) <= N * 0.1
    # A crop of the whole image (scale 1, ratio 1) is the evaluation transform of a square image.
    batch = next(pipe(source, image_size=24, crop=RandomResizedCrop(24, scale=(1.0, 1.0), ratio=(1.0, 1.0))))
    np.testing.assert_array_equal(batch["image"], np.stack([clip_center_crop(Image.fromarray(shapes[i]["image"]), 24)
                                                            for i in batch["index"].tolist()]))


def test_random_resized_crop_box_follows_scale_and_ratio():
    crop = RandomResizedCrop(16, scale=(0.3, 0.6), ratio=(0.5, 2.0))
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = crop.box(80, 60, rng)
        assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
        assert 0.3 * 4800 * 0.9 <= h * w <= 0.6 * 4800 * 1.1 and 0.45 <= w / h <= 2.2
    # No sample fits a 100 x 8 strip at scale >= 0.9: torchvision's fallback, the central crop at ratio 4/3.
    top, left, h, w = RandomResizedCrop(16).box(100, 8, rng)
    assert (top, h, w) == (0, 8, 11) and left == (100 - 11) // 2
    img = Image.fromarray(np.arange(80 * 60 * 3, dtype=np.uint8).reshape(60, 80, 3))
    out = crop({"image": img}, np.random.default_rng(7))["image"]
    top, left, h, w = crop.box(80, 60, np.random.default_rng(7))
    expected = img.crop((left, top, left + w, top + h)).resize((16, 16), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(out, np.asarray(expected))


def test_dalle_augmentation_crops_the_short_side_zooms_and_flips():
    # Listing 1 at R = 64 on a 300 x 200 ramp (value 0.8 x): a 200 px square, resized to t in [72, 96], a 64 crop.
    ramp = np.repeat(np.repeat((0.8 * np.arange(300)).astype(np.uint8)[None, :, None], 200, 0), 3, 2)
    augment = DalleAugment(64)
    slopes, flipped = [], 0
    for seed in range(60):
        out = augment({"image": Image.fromarray(ramp)}, np.random.default_rng(seed))["image"].astype(float)
        assert out.shape == (64, 64, 3)
        slope = (out[:, -8:].mean() - out[:, :8].mean()) / 56  # value change per output pixel
        flipped += slope < 0
        slopes.append(abs(slope))
    # 0.8 source-value steps per source pixel, 200 / t source pixels per output pixel.
    assert 0.8 * 200 / 96 - 0.05 <= min(slopes) and max(slopes) <= 0.8 * 200 / 72 + 0.05
    assert max(slopes) - min(slopes) > 0.2  # t varies
    assert 15 <= flipped <= 45
    # A short side below R is resized up rather than failing as the listing would.
    small = DalleAugment(32)({"image": Image.fromarray(ramp[:20, :30])}, np.random.default_rng(0))["image"]
    assert small.shape == (32, 32, 3) and small.dtype == np.uint8


def test_sentencepiece_captions_are_truncated_and_counted(shapes, tmp_path):
    from common.tokenizers.sentencepiece import EOS_ID, PAD_ID, train_bpe

    sp = train_bpe((shapes[i]["caption"] for i in range(N)), vocab_size=320, allow_smaller_vocab=True)
    examples = [dict(shapes[i], caption=shapes[i]["caption"] + " on a sunny day" * (6 if i % 2 else 0))
                for i in range(8)]
    write_image_folder(examples, tmp_path, by=None)
    source = sources.ImageFolderSource(tmp_path)
    it = pipe(source, train=False, tokenizer=SentencePieceTextTokenizer(sp, add_eos=True), context_length=16)
    batch = next(it)
    truncated = 0
    for row, i in zip(batch["text"], batch["index"]):
        ids = sp.encode(examples[i]["caption"])
        truncated += len(ids) > 15
        assert row.tolist() == (ids[:15] + [EOS_ID] + [PAD_ID] * (15 - len(ids)))[:16]
    assert truncated >= 4 and it.stats()["counts"]["truncated_captions"] == truncated
