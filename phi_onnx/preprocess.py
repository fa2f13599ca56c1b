"""The Hugging Face Phi-3-V HD transform (``Phi3VImageProcessor``) in numpy, honouring num_crops.

onnxruntime-genai's own processor always cuts 16 crops, whatever the model's processor_config says; this module
reproduces the Hugging Face processor instead, so num_crops 4 (Phi-3.5-vision's default, and the advice for several
frames) costs 757 image tokens rather than 1921. See reference/phi3v-spec.md §1.3 and §3.3.

Per image: transpose portrait images, resize so the long side is ``scale*336`` with ``h_crop*w_crop <= num_crops``
(Pillow bilinear, antialiased), pad the short side with white to a multiple of 336, normalize with the CLIP mean and
std, then output ``[global 336x336 bicubic, tiles row-major..., zero crops]``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from phi_onnx.errors import ImageError, OptionsError
from phi_onnx.images import to_rgb

CROP_SIZE = 336
"""Side of one crop, in pixels."""

TOKENS_PER_CROP = 144
"""Image tokens per crop after the 2x2 merge of CLIP's 24x24 patches."""

MAX_NUM_CROPS = 64
"""The largest num_crops accepted."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_CUBIC_A = -0.75  # torch's bicubic kernel constant


@dataclass(frozen=True)
class Preprocessed:
    """The image tensors one prompt needs, shaped as onnxruntime-genai's phi3v processor returns them.

    Attributes:
        pixel_values: float32 [images, crop_slots, 3, 336, 336]: per image the global view, the tiles row-major, then
            all-zero crops.
        image_sizes: int64 [images, 2]: the padded HD size [H, W] of each image (multiples of 336).
        num_image_tokens: int64 [images, 1]: the image tokens each image takes in the prompt.
    """

    pixel_values: np.ndarray
    image_sizes: np.ndarray
    num_image_tokens: np.ndarray

    @property
    def total_image_tokens(self) -> int:
        """The image tokens of all images together."""
        return int(self.num_image_tokens.sum())


def hd_grid(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """The tile grid the HD transform gives an image of this size; no pixels needed.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        num_crops: The most tiles allowed (``h_crop * w_crop <= num_crops``), 1 to 64.

    Returns:
        (h_crop, w_crop): tiles down and across; the padded HD image is ``h_crop*336`` x ``w_crop*336``.

    Raises:
        ImageError: A side is not a positive integer.
        OptionsError: num_crops is not an integer in 1..64.
    """
    long_tiles, short_tiles = _hd_tiles(width, height, _check_num_crops(num_crops))
    return (long_tiles, short_tiles) if width < height else (short_tiles, long_tiles)


def image_token_count(width: int, height: int, num_crops: int) -> int:
    """Image tokens an image of this size takes in the prompt: ``(h*w + 1)*144 + 1 + (h + 1)*12``.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        num_crops: The most tiles allowed, 1 to 64.

    Returns:
        The number of image tokens.
    """
    h_crop, w_crop = hd_grid(width, height, num_crops)
    return _token_count(h_crop, w_crop)


def preprocess_images(images: Sequence[Image.Image], num_crops: int, *, crop_slots: int | None = None) -> Preprocessed:
    """Run the Hugging Face Phi-3-V HD transform on decoded images.

    Args:
        images: PIL images, in prompt order (decode files with :func:`phi_onnx.images.load_image`). Images that are
            not RGB are converted as load_image does (transparency over white).
        num_crops: The most tiles per image, 1 to 64 (Phi-3.5-vision's processor uses 4; 16 suits single images).
        crop_slots: Crops per image in ``pixel_values`` (global + tiles + zero padding); defaults to num_crops + 1.
            Pass 17 for graphs whose crop dimension is fixed at 17.

    Returns:
        The tensors for onnxruntime-genai: pixel_values, image_sizes and num_image_tokens.

    Raises:
        OptionsError: num_crops or crop_slots is out of range, or an image needs more crops than crop_slots.
        ImageError: An entry is not a PIL image, or has no pixels.
    """
    num_crops = _check_num_crops(num_crops)
    slots = num_crops + 1 if crop_slots is None else _check_crop_slots(crop_slots)
    grids = []
    for index, image in enumerate(images, start=1):
        if not isinstance(image, Image.Image):
            raise ImageError(
                f"image {index} is a {type(image).__name__}, not a PIL image: decode it with "
                "phi_onnx.images.load_image first"
            )
        grid = _grid_or_error(image, index, num_crops)
        if grid[0] * grid[1] + 1 > slots:
            raise OptionsError(
                f"image {index} ({image.width}x{image.height}) needs {grid[0] * grid[1] + 1} crops (global + "
                f"{grid[0]}x{grid[1]} tiles) at num_crops={num_crops}, but crop_slots is {slots}: use num_crops "
                f"{slots - 1} or less"
            )
        grids.append(grid)

    pixel_values = np.zeros((len(grids), slots, 3, CROP_SIZE, CROP_SIZE), dtype=np.float32)
    image_sizes = np.zeros((len(grids), 2), dtype=np.int64)
    num_image_tokens = np.zeros((len(grids), 1), dtype=np.int64)
    for i, (image, (h_crop, w_crop)) in enumerate(zip(images, grids, strict=True)):
        hd = _hd_image(to_rgb(image, name=f"image {i + 1}"), num_crops)
        pixel_values[i, 0] = _bicubic_resize(hd, CROP_SIZE)
        tiles = pixel_values[i, 1 : 1 + h_crop * w_crop].reshape(h_crop, w_crop, 3, CROP_SIZE, CROP_SIZE)
        tiles[...] = hd.reshape(3, h_crop, CROP_SIZE, w_crop, CROP_SIZE).transpose(1, 3, 0, 2, 4)
        image_sizes[i] = hd.shape[1:]
        num_image_tokens[i, 0] = _token_count(h_crop, w_crop)
    return Preprocessed(pixel_values, image_sizes, num_image_tokens)


def _hd_tiles(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(tiles along the long side, tiles along the short side), exactly as HF's HD_transform sizes them."""
    long_side, _, padded_short = _hd_dims(width, height, num_crops)
    return long_side // CROP_SIZE, padded_short // CROP_SIZE


def _hd_dims(width: int, height: int, num_crops: int) -> tuple[int, int, int]:
    """(resized long side, resized short side, padded short side) of HF's HD_transform."""
    for side in (width, height):
        if isinstance(side, bool) or not isinstance(side, int | np.integer) or side < 1:
            raise ImageError(f"image sides must be positive integers, got {width!r}x{height!r}")
    long_side, short_side = (height, width) if width < height else (width, height)
    ratio = long_side / short_side
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_long = int(scale * CROP_SIZE)
    # HF gives 0 here for sides longer than 5376:1 (and then fails); keep one row so such strips still work.
    new_short = max(1, int(new_long / ratio))
    padded_short = math.ceil(new_short / CROP_SIZE) * CROP_SIZE
    return new_long, new_short, padded_short


def _hd_image(image: Image.Image, num_crops: int) -> np.ndarray:
    """The resized, white-padded, normalized HD image as float32 [3, H, W]."""
    width, height = image.size
    new_long, new_short, padded_short = _hd_dims(width, height, num_crops)
    pad_before = (padded_short - new_short) // 2
    if width < height:
        # As HF: resize the transposed image, then transpose back (a view). Resizing the original height-first is
        # not bit-identical: Pillow's horizontal and vertical passes round differently.
        transposed = image.transpose(Image.Transpose.TRANSPOSE)
        pixels = np.asarray(transposed.resize((new_long, new_short), Image.Resampling.BILINEAR)).transpose(1, 0, 2)
        hd = np.empty((3, new_long, padded_short), dtype=np.float32)
        hd[:, :, :pad_before] = _WHITE[:, :, None]
        hd[:, :, pad_before + new_short :] = _WHITE[:, :, None]
        target = hd[:, :, pad_before : pad_before + new_short]
    else:
        pixels = np.asarray(image.resize((new_long, new_short), Image.Resampling.BILINEAR))
        hd = np.empty((3, padded_short, new_long), dtype=np.float32)
        hd[:, :pad_before, :] = _WHITE[:, :, None]
        hd[:, pad_before + new_short :, :] = _WHITE[:, :, None]
        target = hd[:, pad_before : pad_before + new_short, :]
    for channel in range(3):
        np.take(_LUT[channel], pixels[:, :, channel], out=target[channel], mode="clip")
    return hd


def _normalize_table() -> np.ndarray:
    """float32 [3, 256]: ``(v/255 - mean)/std`` with torchvision's float32 operations, for every uint8 value."""
    values = np.arange(256, dtype=np.float32) / np.float32(255)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None]
    return (values[None, :] - mean) / std


_LUT = _normalize_table()
_WHITE = _LUT[:, 255:256]


def _cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, both [out_size, 4], of torch's bicubic (align_corners=False, no antialias)."""
    # torch rounds the scale and the source coordinate to float32 (with a fused multiply-add); doing the same keeps
    # non-integer scales within ~2e-6 of it. The HD transform's scales are whole numbers, where all of this is exact.
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    source = (scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    first = np.floor(source)
    t = (source - first).astype(np.float64)
    a = _CUBIC_A

    def inner(d: np.ndarray) -> np.ndarray:  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def outer(d: np.ndarray) -> np.ndarray:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = np.stack([outer(t + 1), inner(t), inner(1 - t), outer(2 - t)], axis=1)
    indices = np.clip(first.astype(np.int64)[:, None] + np.arange(-1, 3), 0, in_size - 1)
    return indices, weights


def _bicubic_resize(planes: np.ndarray, size: int) -> np.ndarray:
    """Resize float32 [C, H, W] to [C, size, size] like torch interpolate(mode="bicubic", align_corners=False)."""
    rows = _cubic_pass(planes, size)  # [C, size, W]
    return _cubic_pass(np.ascontiguousarray(rows.transpose(0, 2, 1)), size).transpose(0, 2, 1)


def _cubic_pass(planes: np.ndarray, size: int) -> np.ndarray:
    """Resample axis 1 of [C, N, M] to ``size``; gathering whole rows keeps memory access contiguous."""
    indices, weights = _cubic_taps(planes.shape[1], size)
    weights = weights.astype(np.float32)
    out = np.zeros((planes.shape[0], size, planes.shape[2]), dtype=np.float32)
    for k in range(4):
        if weights[:, k].any():  # with integer scales (always, here) whole taps are zero: skip them
            out += weights[None, :, k, None] * planes[:, indices[:, k], :]
    return out


def _token_count(h_crop: int, w_crop: int) -> int:
    return (h_crop * w_crop + 1) * TOKENS_PER_CROP + 1 + (h_crop + 1) * 12


def _grid_or_error(image: Image.Image, index: int, num_crops: int) -> tuple[int, int]:
    if image.width < 1 or image.height < 1:
        raise ImageError(f"image {index} is {image.width}x{image.height} pixels, which holds no pixels")
    return hd_grid(image.width, image.height, num_crops)


def _check_num_crops(num_crops: int) -> int:
    value = _as_int(num_crops)
    if value is None or not 1 <= value <= MAX_NUM_CROPS:
        raise OptionsError(
            f"num_crops must be an integer from 1 to {MAX_NUM_CROPS}, got {num_crops!r}: use 4 for several images "
            "or frames, 16 for one detailed image"
        )
    return value


def _check_crop_slots(crop_slots: int) -> int:
    value = _as_int(crop_slots)
    if value is None or value < 2:
        raise OptionsError(f"crop_slots must be an integer of at least 2 (global + one tile), got {crop_slots!r}")
    return value


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
