"""Image decoding, CLIP preprocessing and PNG grids (PIL + numpy only).

`clip_preprocess` reproduces, pixel for pixel, the transform OpenAI CLIP applies
to every image (`clip/clip.py`, `_transform(n_px)`):

    Compose([Resize(n_px, interpolation=BICUBIC), CenterCrop(n_px),
             _convert_image_to_rgb, ToTensor(),
             Normalize(CLIP_MEAN, CLIP_STD)])

on torchvision's PIL code path, returned channels-last (H, W, 3) for JAX.
Two details of that pipeline decide pixels and are kept on purpose:

* Conversion to RGB happens *after* resize and crop, so PIL resamples the
  image in its own mode: "P" and "1" images are resized with NEAREST (PIL
  forces it for those modes), "RGBA"/"LA" with premultiplied alpha, "CMYK"
  and 16-bit "I;16" in their own channels.
* The short side is scaled with torchvision's integer rule and the crop offset
  uses Python's round-half-to-even, so odd margins land where torchvision's do.

`decode_image` turns bytes or a file into a fully loaded PIL image, or raises
`ImageDecodeError`, whose `reason` data pipelines count when they skip the
record (DESIGN.md, principle 7). Work per image is bounded: files are read only
when they are regular files of at most `MAX_IMAGE_BYTES`, decoded only up to
`MAX_IMAGE_PIXELS`, and an absurd aspect ratio (a 1 x 100,000 strip) is never
resized whole (`clip_center_crop`).
"""

from __future__ import annotations

import io
import math
import os
import stat
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFile, ImageFont, ImageOps

# clip/clip.py, _transform: Normalize((0.48145466, ...), (0.26862954, ...)).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IMAGE_SIZE = 224
# Encoded images above this many bytes are refused unread: no real photograph needs more, and a
# runaway file (or a device such as /dev/zero named like an image) must not exhaust memory.
MAX_IMAGE_BYTES = 64 * 2**20
# PIL's own decompression-bomb limit (twice its default Image.MAX_IMAGE_PIXELS), enforced here too,
# since other libraries may lift PIL's process-wide setting.
MAX_IMAGE_PIXELS = 2 * 89_478_485
# Up to this long:short side ratio, `clip_center_crop` is torchvision's resize-then-crop, bit for bit;
# beyond it, that resize would grow with the ratio (a 1 x 100,000 strip: 224 x 22,400,000 pixels).
MAX_EXACT_ASPECT_RATIO = 64


class ImageDecodeError(ValueError):
    """Raised when bytes or a file cannot be decoded into a complete image.

    `reason` names the fault for skip counters: "corrupt_image" (not an image, truncated,
    damaged), "image_too_large" (more than the allowed bytes or pixels) or "special_file"
    (a path that is not a regular file: a FIFO, a device, a directory).
    """

    def __init__(self, message: str, reason: str = "corrupt_image"):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


class _StrictTruncation:
    """Forces `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = False` while decoding.

    PIL reads that module-level flag during `load()`; when it is True, a file cut
    short decodes "successfully" with grey or black rows. Other libraries set it
    process-wide (tensorflow_datasets does, in core/utils/image_utils.py), which
    would make truncated records pass silently. The flag is switched off while
    at least one `decode_image` call is running, and the previous value is put
    back when the last one finishes, so concurrent decodes on several threads
    never serialise on a lock held through the decode itself.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = False

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False
            self._depth += 1

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = self._saved


_STRICT_TRUNCATION = _StrictTruncation()


def _read_regular_file(path: str | os.PathLike, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of the regular file `path`, refusing special files and files over `max_bytes`.

    The file is opened non-blocking and checked with fstat before any read, so a FIFO
    (which would block until a writer comes) or a device such as /dev/zero (endless) named
    like an image is refused at once.

    Raises:
      ImageDecodeError: reason "special_file" or "image_too_large".
      OSError: the path does not exist (FileNotFoundError, also for a dangling symlink) or cannot be opened.
    """
    where = os.fspath(path)
    fd = os.open(where, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError(f"Cannot read an image from {where!r}: it is not a regular file (mode "
                                   f"{stat.filemode(info.st_mode)}; a FIFO, device or directory). Expected an "
                                   "image file: remove or replace it.", reason="special_file")
        data = f.read(max_bytes + 1)  # +1: a file that grew since fstat is still caught
    if max(info.st_size, len(data)) > max_bytes:
        raise ImageDecodeError(f"Cannot read an image from {where!r}: {max(info.st_size, len(data))} bytes, more "
                               f"than the {max_bytes} allowed per image. Re-encode it smaller, or raise max_bytes.",
                               reason="image_too_large")
    return data


def decode_image(data: bytes | bytearray | memoryview | str | os.PathLike, *, max_bytes: int = MAX_IMAGE_BYTES,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decodes an encoded image (bytes, or a path to a file) into a loaded PIL image.

    The pixels are decoded eagerly (`img.load()`), and the container is checked
    first with `Image.verify()`, which for PNG validates every chunk CRC, so
    corrupt, truncated and non-image inputs fail here rather than later inside
    a training step. The image keeps its own mode ("P", "RGBA", "I;16", ...);
    `clip_preprocess` handles the conversion to RGB the way CLIP does. A path
    is read by `_read_regular_file`; more than `max_bytes` encoded bytes or
    `max_pixels` pixels (checked from the header, before decoding) is refused.

    Raises:
      ImageDecodeError: the input is empty, not an image, truncated, corrupt, too large
        or a special file (see its `reason`).
      FileNotFoundError: `data` is a path that does not exist.
    """
    if isinstance(data, (str, os.PathLike)):
        source = f"file {os.fspath(data)!r}"
        data = _read_regular_file(data, max_bytes)
    else:
        data = bytes(data)
        source = f"{len(data)} bytes starting {data[:8]!r}"
        if len(data) > max_bytes:
            raise ImageDecodeError(f"Cannot decode an image from {source}: more than the {max_bytes} bytes allowed "
                                   "per image. Re-encode it smaller, or raise max_bytes.", reason="image_too_large")
    if not data:
        raise ImageDecodeError(f"Cannot decode an image from {source}: the input is empty.")
    try:
        with _STRICT_TRUNCATION:
            header = Image.open(io.BytesIO(data))  # reads the header only
            if header.width * header.height > max_pixels:
                raise Image.DecompressionBombError(f"{header.width} x {header.height} pixels, more than the "
                                                   f"{max_pixels} allowed")
            header.verify()
            # verify() leaves the image unusable; PIL requires a fresh open to decode.
            img = Image.open(io.BytesIO(data))
            img.load()
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"Cannot decode an image from {source}: {err}. Resize it, or raise max_pixels.",
                               reason="image_too_large") from err
    # Pillow's format plugins raise many exception types on malformed input
    # (OSError, SyntaxError, struct.error, zlib.error, EOFError, IndexError,
    # ...); all of them mean "this record is bad".
    except Exception as err:  # noqa: BLE001
        raise ImageDecodeError(
            f"Cannot decode an image from {source}: {type(err).__name__}: {err}. "
            "Expected a complete image file (PNG, JPEG, WebP, GIF, BMP, TIFF, ...); "
            "the record is corrupt, truncated or not an image: skip it or re-create it."
        ) from err
    return img


# --------------------------------------------------------------------------
# CLIP preprocessing: torchvision's PIL path, step by step
# --------------------------------------------------------------------------


def _shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side `size` and the longer `int(size * long / short)`, torchvision's rule."""
    if size < 1:
        raise ValueError(f"Expected a positive target size, found {size}.")
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Scales `img` so its shorter side is `size`, with PIL bicubic resampling.

    torchvision.transforms.functional.resize with an int size on a PIL image:
    `_compute_resized_output_size` keeps the short side at `size` and sets the
    long side to `int(size * long / short)` (truncation, not rounding); then
    `_functional_pil.resize` calls `img.resize((w, h), BICUBIC)` with no
    `reducing_gap` (antialias is always on for PIL). PIL itself switches "P"
    and "1" images to NEAREST and resamples "RGBA"/"LA" premultiplied.
    """
    new_size = _shorter_side_size(*img.size, size)
    if new_size == img.size:
        return img
    return img.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Crops the central (h, w) = `size` window, zero-padding first if `img` is smaller.

    torchvision.transforms.functional.center_crop on a PIL image: pad with
    `fill=0` in the image's own mode (palette index 0 for "P", all-zero inks
    for "CMYK") when the crop is larger than the image, then crop at
    `top = int(round((h - crop_h) / 2.0))`, with Python's round-half-to-even.
    """
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    w, h = img.size
    if crop_w > w or crop_h > h:
        left = (crop_w - w) // 2 if crop_w > w else 0
        top = (crop_h - h) // 2 if crop_h > h else 0
        right = (crop_w - w + 1) // 2 if crop_w > w else 0
        bottom = (crop_h - h + 1) // 2 if crop_h > h else 0
        img = _pad_with_zeros(img, (left, top, right, bottom))
        w, h = img.size
        if (crop_w, crop_h) == (w, h):
            return img
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def _pad_with_zeros(img: Image.Image, border: tuple[int, int, int, int]) -> Image.Image:
    """torchvision `_functional_pil.pad(img, border, fill=0, padding_mode="constant")`."""
    bands = len(img.getbands())
    fill = 0 if bands == 1 else (0,) * bands
    out = ImageOps.expand(img, border=border, fill=fill)
    if img.mode == "P":
        out.putpalette(img.getpalette())
    return out


def normalize_rgb(rgb: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
                  std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """uint8 (..., 3) -> float32 `(x / 255 - mean) / std`, as ToTensor + Normalize.

    Each step is one float32 operation in the same order as torchvision
    (`img.float().div(255)`, then `sub_(mean).div_(std)` with float32 mean/std),
    so results are bit-identical.
    """
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"Expected a uint8 array with 3 channels last, found {rgb.dtype} {rgb.shape}.")
    x = rgb.astype(np.float32) / np.float32(255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def clip_center_crop(img: Image.Image, size: int = CLIP_IMAGE_SIZE) -> Image.Image:
    """OpenAI CLIP's `Resize(size, BICUBIC)` + `CenterCrop(size)` on a PIL image, in the image's own mode.

    Bit for bit torchvision's up to `MAX_EXACT_ASPECT_RATIO`; a longer strip
    goes through `_resize_kept_region`, whose work is bounded by `size`.
    """
    width, height = img.size
    if max(width, height) <= MAX_EXACT_ASPECT_RATIO * min(width, height):
        return center_crop(resize_shorter_side(img, size), size)
    return _resize_kept_region(img, size)


def _resize_kept_region(img: Image.Image, size: int) -> Image.Image:
    """`center_crop(resize_shorter_side(img, size), size)` of a long strip, resampling only what the crop keeps.

    PIL resamples in two passes, horizontal then vertical, with 8-bit
    (premultiplied for "RGBA"/"LA") rows in between; so does this, each pass
    restricted to the kept region with PIL's `box` at torchvision's scale. The
    pass along the short side is exact; the one along the long side may differ
    from the whole resize by the floating-point rounding of the sample
    positions (a grey level, or a neighbouring source pixel under NEAREST).
    """
    width, height = img.size
    new_w, new_h = _shorter_side_size(width, height, size)  # the long side >= size: the crop needs no padding
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    mode = img.mode
    premultiplied = {"RGBA": "RGBa", "LA": "La"}.get(mode)  # as PIL's resize does, once around both passes
    if premultiplied:
        img = img.convert(premultiplied)
    bicubic = Image.Resampling.BICUBIC
    if width <= height:  # a tall strip: every column is kept, rows [top, top + size) of new_h
        scale = height / new_h
        y0, y1 = top * scale, (top + size) * scale
        reach = 2 * max(scale, 1.0) + 1  # bicubic's support in source rows, and rounding
        r0, r1 = max(int(y0 - reach), 0), min(math.ceil(y1 + reach), height)
        rows = img.crop((0, r0, width, r1)).resize((size, r1 - r0), bicubic)  # horizontal pass
        out = rows.resize((size, size), bicubic, box=(0, y0 - r0, size, y1 - r0))  # vertical pass
    else:  # a wide strip: every row is kept, columns [left, left + size) of new_w
        scale = width / new_w
        columns = img.resize((size, height), bicubic, box=(left * scale, 0, (left + size) * scale, height))
        out = columns.resize((size, size), bicubic)
    return out.convert(mode) if premultiplied else out


def clip_preprocess(img: Image.Image, size: int = CLIP_IMAGE_SIZE) -> np.ndarray:
    """OpenAI CLIP's image transform on a PIL image; returns float32 (size, size, 3).

    Equivalent to `clip.load(...)[1](img).permute(1, 2, 0).numpy()` (see module
    docstring): resize shorter side bicubic, center crop, convert("RGB"),
    ToTensor, Normalize with `CLIP_MEAN` / `CLIP_STD`.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"Expected a PIL.Image.Image, found {type(img).__name__}; "
                        "use PIL.Image.fromarray for a uint8 array.")
    rgb = np.asarray(clip_center_crop(img, size).convert("RGB"), dtype=np.uint8)  # (size, size, 3)
    return normalize_rgb(rgb)


# --------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------

_GRID_PAD = 2  # pixels of background between tiles and around the grid


def _to_uint8_nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or 0 in images.shape[:3]:
        raise ValueError("Expected a non-empty batch of images (N, H, W, C) with C in {1, 3}, "
                         f"found shape {images.shape}.")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"Expected uint8 or float images in [0, 1], found dtype {images.dtype}.")
    if not np.isfinite(images).all():
        raise ValueError("Found NaN or infinite pixel values; expected floats in [0, 1].")
    # Model samples overshoot [0, 1] slightly; clip rather than wrap around.
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Truncates `text` with an ellipsis so it is at most `width` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def save_image_grid(images: np.ndarray, path: str | os.PathLike,
                    labels: Sequence[str] | None = None, ncols: int | None = None, *,
                    scale: int = 1, row_labels: Sequence[str] | None = None) -> str:
    """Saves a batch of images as one PNG grid, optionally with a caption under each tile.

    Args:
      images: (N, H, W, C), C in {1, 3}; uint8, or floats in [0, 1] (clipped).
      path: output PNG path; parent directories are created.
      labels: N strings drawn under the tiles (PIL's default font), truncated
        to the tile width.
      ncols: tiles per row; default ceil(sqrt(N)).
      scale: each tile is shown `scale` times larger (nearest neighbour: the
        pixels stay as they are, only bigger), so small images can be seen.
      row_labels: one string per row, drawn above it across the grid's width
        (e.g. the caption a row of samples was generated from).
    Returns:
      The path written, as a string.
    """
    tiles = _to_uint8_nhwc(images)  # (N, H, W, C)
    if scale < 1:
        raise ValueError(f"Expected an integer scale >= 1, found {scale}.")
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, H * scale, W * scale, C)
    n, h, w, c = tiles.shape
    if c == 1:
        tiles = np.repeat(tiles, 3, axis=-1)
    if labels is not None and len(labels) != n:
        raise ValueError(f"Expected one label per image ({n}), found {len(labels)} labels.")
    ncols = ncols or math.ceil(math.sqrt(n))
    if ncols < 1:
        raise ValueError(f"Expected ncols >= 1, found {ncols}.")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"Expected one row label per row ({nrows}), found {len(row_labels)}.")

    font = ImageFont.load_default()
    top, bottom = font.getbbox("Ag")[1::2]
    line_h = int(bottom - top) + 2 * _GRID_PAD
    label_h = 0 if labels is None else line_h
    title_h = 0 if row_labels is None else line_h
    cell_h = title_h + h + label_h
    width = ncols * (w + _GRID_PAD) + _GRID_PAD
    grid = Image.new("RGB", (width, nrows * (cell_h + _GRID_PAD) + _GRID_PAD), "white")
    draw = ImageDraw.Draw(grid)
    if row_labels is not None:
        for row, text in enumerate(row_labels):
            y = _GRID_PAD + row * (cell_h + _GRID_PAD)
            draw.text((_GRID_PAD, y), _fit_text(draw, str(text), font, width - 2 * _GRID_PAD), fill="black", font=font)
    for i, tile in enumerate(tiles):
        x = _GRID_PAD + (i % ncols) * (w + _GRID_PAD)
        y = _GRID_PAD + (i // ncols) * (cell_h + _GRID_PAD) + title_h
        grid.paste(Image.fromarray(tile), (x, y))
        if labels is not None:
            text = _fit_text(draw, str(labels[i]), font, w)
            draw.text((x, y + h + _GRID_PAD), text, fill="black", font=font)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path, format="PNG")
    return path
