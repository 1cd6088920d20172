"""Tests for common/images.py: CLIP preprocessing parity, decoding, grids."""

import io
import numbers

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from common import images
from common.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDecodeError,
    center_crop,
    clip_preprocess,
    decode_image,
    normalize_rgb,
    save_image_grid,
)
from common.data.transforms import CenterCrop, DecodeImage, SkipRecord

# --------------------------------------------------------------------------
# Reference: torchvision's PIL code path, transcribed.
# --------------------------------------------------------------------------


def _tv_compute_resized_output_size(image_size, size):
    """torchvision/transforms/functional.py, `_compute_resized_output_size` (max_size=None)."""
    h, w = image_size
    short, long = (w, h) if w <= h else (h, w)
    if len(size) == 1:  # specified size only for the smallest edge
        requested_new_short = size if isinstance(size, int) else size[0]
        new_short, new_long = requested_new_short, int(requested_new_short * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_w, new_h = size[1], size[0]
    return [new_h, new_w]


def _tv_resize(img, size, interpolation=Image.BICUBIC):
    """torchvision/transforms/functional.py `resize` (PIL branch) + _functional_pil.py `resize`."""
    if isinstance(size, int):
        size = [size]
    image_width, image_height = img.size
    output_size = _tv_compute_resized_output_size((image_height, image_width), size)
    if [image_height, image_width] == output_size:
        return img
    # _functional_pil.resize: `img.resize(tuple(size[::-1]), interpolation)`.
    return img.resize(tuple(output_size[::-1]), interpolation)


def _tv_parse_fill(fill, img, name="fillcolor"):
    """torchvision/transforms/_functional_pil.py, `_parse_fill`."""
    num_channels = len(img.getbands())
    if fill is None:
        fill = 0
    if isinstance(fill, (int, float)) and num_channels > 1:
        fill = tuple([fill] * num_channels)
    if isinstance(fill, (list, tuple)):
        assert len(fill) == num_channels
        fill = tuple(fill)
    if img.mode != "F":
        if isinstance(fill, (list, tuple)):
            fill = tuple(int(x) for x in fill)
        else:
            fill = int(fill)
    return {name: fill}


def _tv_pad(img, padding, fill=0):
    """torchvision/transforms/_functional_pil.py, `pad` with padding_mode="constant"."""
    opts = _tv_parse_fill(fill, img, name="fill")
    if img.mode == "P":
        palette = img.getpalette()
        image = ImageOps.expand(img, border=tuple(padding), **opts)
        image.putpalette(palette)
        return image
    return ImageOps.expand(img, border=tuple(padding), **opts)


def _tv_crop(img, top, left, height, width):
    """torchvision/transforms/_functional_pil.py, `crop`."""
    return img.crop((left, top, left + width, top + height))


def _tv_center_crop(img, output_size):
    """torchvision/transforms/functional.py, `center_crop` (PIL branch)."""
    if isinstance(output_size, numbers.Number):
        output_size = (int(output_size), int(output_size))
    image_width, image_height = img.size
    crop_height, crop_width = output_size
    if crop_width > image_width or crop_height > image_height:
        padding_ltrb = [
            (crop_width - image_width) // 2 if crop_width > image_width else 0,
            (crop_height - image_height) // 2 if crop_height > image_height else 0,
            (crop_width - image_width + 1) // 2 if crop_width > image_width else 0,
            (crop_height - image_height + 1) // 2 if crop_height > image_height else 0,
        ]
        img = _tv_pad(img, padding_ltrb, fill=0)
        image_width, image_height = img.size
        if crop_width == image_width and crop_height == image_height:
            return img
    crop_top = int(round((image_height - crop_height) / 2.0))
    crop_left = int(round((image_width - crop_width) / 2.0))
    return _tv_crop(img, crop_top, crop_left, crop_height, crop_width)


def _tv_to_tensor(pic):
    """torchvision/transforms/functional.py, `to_tensor` (PIL branch)."""
    mode_to_nptype = {"I": np.int32, "I;16": np.int16, "F": np.float32}
    img = torch.from_numpy(np.array(pic, mode_to_nptype.get(pic.mode, np.uint8), copy=True))
    if pic.mode == "1":
        img = 255 * img
    img = img.view(pic.size[1], pic.size[0], len(pic.getbands()))
    img = img.permute((2, 0, 1)).contiguous()  # HWC -> CHW
    if isinstance(img, torch.ByteTensor):
        return img.to(dtype=torch.get_default_dtype()).div(255)
    return img


def _tv_normalize(tensor, mean, std):
    """torchvision/transforms/_functional_tensor.py, `normalize`."""
    tensor = tensor.clone()
    mean = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


def reference_clip_transform(img, n_px=224):
    """clip/clip.py `_transform(n_px)`: Resize(BICUBIC), CenterCrop, convert("RGB"), ToTensor,
    Normalize; returned HWC like `clip_preprocess`."""
    img = _tv_center_crop(_tv_resize(img, n_px, Image.BICUBIC), n_px)
    img = img.convert("RGB")
    out = _tv_normalize(_tv_to_tensor(img), CLIP_MEAN, CLIP_STD)
    return out.permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------
# Test images in every mode.
# --------------------------------------------------------------------------

MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "I;16", "I", "F", "1")
SIZES_WH = ((1, 1), (2, 3), (7, 300), (300, 7), (224, 224), (225, 224), (224, 225),
            (227, 231), (223, 223), (1000, 37), (37, 1000), (640, 480), (333, 500), (50, 100))


def make_image(mode, w, h, seed=0):
    rng = np.random.default_rng(seed)
    if mode == "1":
        return Image.fromarray(rng.random((h, w)) > 0.5)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 2**16, (h, w), dtype=np.uint16))
        assert img.mode == "I;16"
        return img
    if mode == "I":
        return Image.fromarray(rng.integers(-1000, 70000, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.uniform(-20, 300, (h, w)).astype(np.float32))
    bands = len(Image.getmodebands(mode) * "x")
    img = Image.frombytes(mode, (w, h), rng.integers(0, 256, w * h * bands, dtype=np.uint8).tobytes())
    if mode in ("P", "PA"):
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
    return img


@pytest.mark.parametrize("mode", MODES)
def test_clip_preprocess_matches_torchvision_reference(mode):
    for w, h in SIZES_WH:
        img = make_image(mode, w, h, seed=w * 1000 + h)
        got = clip_preprocess(img)
        want = reference_clip_transform(img)
        assert got.shape == (224, 224, 3) and got.dtype == np.float32
        diff = np.abs(got - want).max()
        assert diff < 1e-6, f"mode {mode} size {w}x{h}: max abs diff {diff}"


@pytest.mark.parametrize("n_px", [1, 97, 336])
def test_clip_preprocess_other_resolutions(n_px):
    for w, h in ((5, 9), (400, 333), (n_px, n_px + 1), (n_px + 3, n_px)):
        img = make_image("RGBA", w, h, seed=n_px + w)
        got = clip_preprocess(img, size=n_px)
        assert got.shape == (n_px, n_px, 3)
        assert np.abs(got - reference_clip_transform(img, n_px)).max() < 1e-6


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "I;16"])
def test_strips_beyond_the_exact_aspect_ratio_stay_within_a_grey_level_of_torchvision(mode):
    """Past MAX_EXACT_ASPECT_RATIO only the kept region is resampled (bounded work); strips small
    enough to resize whole here show it lands within a level of torchvision per resampled channel
    (two after CMYK's conversion to RGB, which sums two of them)."""
    for w, h in ((3, 1000), (1000, 3), (1, 500), (7, 2000)):
        assert max(w, h) > images.MAX_EXACT_ASPECT_RATIO * min(w, h)
        img = make_image(mode, w, h, seed=w)
        diff = np.abs(clip_preprocess(img, 31) - reference_clip_transform(img, 31)).max()
        assert diff <= 2.01 / 255 / min(CLIP_STD), f"{mode} {w}x{h}: max abs diff {diff}"


def test_conversion_order_matters():
    """Converting to RGB before resizing (the "obvious" order) gives other pixels for palette
    and alpha images, so the parity test above would catch a reordering."""
    for mode in ("P", "RGBA", "CMYK"):
        img = make_image(mode, 300, 250)
        rgb_first = reference_clip_transform(img.convert("RGB"))
        assert np.abs(clip_preprocess(img) - rgb_first).max() > 0.1, mode


def test_center_crop_pads_like_torchvision():
    """Crops larger than the image pad with zeros in the image's own mode: palette index 0
    for "P" (not black), zero ink (white) for "CMYK"."""
    for mode in MODES:
        for (w, h), crop in (((5, 8), 11), ((20, 3), (7, 12)), ((4, 4), (4, 9)), ((9, 2), 3)):
            img = make_image(mode, w, h, seed=w + h)
            got, want = center_crop(img, crop), _tv_center_crop(img, crop)
            assert got.mode == want.mode and got.size == want.size, (mode, w, h, crop)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            np.testing.assert_array_equal(np.asarray(got.convert("RGB")),
                                          np.asarray(want.convert("RGB")))
    cmyk = center_crop(make_image("CMYK", 2, 2), 6).convert("RGB")
    assert np.asarray(cmyk)[0, 0].tolist() == [255, 255, 255]


def test_decoded_arrays_take_clips_path():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (30, 20, 1), dtype=np.uint8)
    to_pixels = lambda array: CenterCrop(32)(DecodeImage()({"image": array}, None), None)["image"]  # noqa: E731
    np.testing.assert_array_equal(normalize_rgb(to_pixels(rgb)), reference_clip_transform(Image.fromarray(rgb), 32))
    np.testing.assert_array_equal(normalize_rgb(to_pixels(gray)),
                                  reference_clip_transform(Image.fromarray(gray[..., 0]), 32))
    with pytest.raises(SkipRecord, match="corrupt_image"):
        to_pixels(rgb.astype(np.float32))
    with pytest.raises(TypeError, match="PIL"):
        clip_preprocess(rgb)


# --------------------------------------------------------------------------
# decode_image
# --------------------------------------------------------------------------


def _encode(arr, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def picture():
    yy, xx = np.mgrid[0:48, 0:64]
    rng = np.random.default_rng(0)
    smooth = np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1)
    return np.clip(smooth + rng.integers(0, 30, smooth.shape), 0, 255).astype(np.uint8)


def test_decode_valid_bytes_and_path(picture, tmp_path):
    png = _encode(picture, "PNG")
    img = decode_image(png)
    np.testing.assert_array_equal(np.asarray(img), picture)
    path = tmp_path / "x.jpg"
    path.write_bytes(_encode(picture, "JPEG", quality=90))
    img = decode_image(path)
    assert img.size == (64, 48) and img.mode == "RGB"
    assert np.abs(np.asarray(img).astype(int) - picture).mean() < 10
    assert decode_image(str(path)).size == (64, 48)
    assert decode_image(memoryview(png)).size == (64, 48)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_decode_rejects_truncated(picture, fmt, keep):
    data = _encode(picture, fmt)
    with pytest.raises(ImageDecodeError, match="Cannot decode"):
        decode_image(data[: int(len(data) * keep)])


def test_decode_rejects_png_without_iend_and_bit_flips(picture):
    png = _encode(picture, "PNG")
    with pytest.raises(ImageDecodeError):
        decode_image(png[:-12])  # IEND chunk cut off
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0x01  # inside IDAT; caught by the chunk CRC
    with pytest.raises(ImageDecodeError):
        decode_image(bytes(flipped))


def test_decode_rejects_truncation_even_if_pil_flag_is_set(picture, monkeypatch):
    data = _encode(picture, "JPEG")
    data = data[: len(data) * 3 // 4]  # cut inside the entropy-coded scan
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    lenient = Image.open(io.BytesIO(data))
    lenient.load()  # plain PIL now accepts the truncated file...
    with pytest.raises(ImageDecodeError):
        decode_image(data)  # ...decode_image does not
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # and the caller's setting is restored


def test_decode_rejects_non_images(tmp_path):
    rng = np.random.default_rng(0)
    for data in (b"", rng.bytes(1000), b"\x89PNG\r\n\x1a\n" + rng.bytes(100), b"\xff\xd8\xff"):
        with pytest.raises(ImageDecodeError):
            decode_image(data)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")
    text = tmp_path / "notes.txt"
    text.write_text("a small red triangle in the top left corner\n" * 20)
    with pytest.raises(ImageDecodeError, match="notes.txt"):
        decode_image(text)
    with pytest.raises(FileNotFoundError):
        decode_image(tmp_path / "missing.png")
    assert issubclass(ImageDecodeError, ValueError)


# --------------------------------------------------------------------------
# save_image_grid
# --------------------------------------------------------------------------


def _open(path):
    with Image.open(path) as img:
        img.load()
    return img


def test_save_image_grid_layout(tmp_path):
    pad = images._GRID_PAD
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (5, 16, 20, 3), dtype=np.uint8)
    path = save_image_grid(tiles, tmp_path / "sub" / "grid.png", ncols=3)
    grid = _open(path)
    assert grid.format == "PNG"
    assert grid.size == (3 * 20 + 4 * pad, 2 * 16 + 3 * pad)
    arr = np.asarray(grid)
    for i, tile in enumerate(tiles):
        y, x = pad + (i // 3) * (16 + pad), pad + (i % 3) * (20 + pad)
        np.testing.assert_array_equal(arr[y:y + 16, x:x + 20], tile)

    floats = np.full((4, 8, 8, 1), 0.5, np.float32)
    floats[0] = 1.7  # out of range: clipped
    arr = np.asarray(_open(save_image_grid(floats, tmp_path / "f.png")))
    assert arr.shape == (2 * 8 + 3 * pad, 2 * 8 + 3 * pad, 3)  # default ncols = ceil(sqrt(4))
    assert arr[pad, pad].tolist() == [255, 255, 255]
    assert arr[pad + 8 + pad, pad].tolist() == [128, 128, 128]


def test_save_image_grid_labels(tmp_path):
    tiles = np.zeros((3, 24, 40, 3), np.uint8) + 255
    plain = _open(save_image_grid(tiles, tmp_path / "a.png", ncols=3))
    labelled = _open(save_image_grid(tiles, tmp_path / "b.png", ncols=3,
                                          labels=["red", "a very long caption " * 5, "x"]))
    assert labelled.size[0] == plain.size[0] and labelled.size[1] > plain.size[1]
    text_band = np.asarray(labelled.convert("L"))[24 + images._GRID_PAD:]
    assert (text_band < 128).any(), "no text drawn under the tiles"


def test_save_image_grid_scale_and_row_labels(tmp_path):
    pad = images._GRID_PAD
    tiles = np.random.default_rng(0).integers(0, 256, (4, 4, 5, 3), dtype=np.uint8)
    arr = np.asarray(_open(save_image_grid(tiles, tmp_path / "s.png", ncols=2, scale=3)))
    assert arr.shape == (2 * 12 + 3 * pad, 2 * 15 + 3 * pad, 3)
    np.testing.assert_array_equal(arr[pad:pad + 12, pad:pad + 15], tiles[0].repeat(3, 0).repeat(3, 1))

    titled = np.asarray(_open(save_image_grid(tiles, tmp_path / "t.png", ncols=2, scale=3,
                                              row_labels=["a red circle", "a blue square"])).convert("L"))
    title_h = (titled.shape[0] - arr.shape[0]) // 2
    assert title_h > 0 and (titled[pad:pad + title_h] < 128).any(), "no row label drawn above the first row"
    with pytest.raises(ValueError, match="one row label per row"):
        save_image_grid(tiles, tmp_path / "r.png", ncols=2, row_labels=["only one"])
    with pytest.raises(ValueError, match="scale"):
        save_image_grid(tiles, tmp_path / "r.png", scale=0)


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 3)), np.zeros((2, 8, 8, 2)),
                                 np.zeros((0, 8, 8, 3)), np.zeros((2, 8, 8, 3), np.int32),
                                 np.full((1, 4, 4, 3), np.nan)])
def test_save_image_grid_rejects_bad_input(tmp_path, bad):
    with pytest.raises(ValueError, match="Expected|NaN"):
        save_image_grid(bad, tmp_path / "g.png")


def test_save_image_grid_rejects_label_count(tmp_path):
    with pytest.raises(ValueError, match="one label per image"):
        save_image_grid(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "g.png", labels=["a"])
