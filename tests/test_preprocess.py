"""The HD transform against the spec's numbers, torch's bicubic, and a literal reimplementation of HF's processor."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from phi_onnx.errors import ImageError, OptionsError
from phi_onnx.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    Preprocessed,
    _bicubic_resize,
    hd_grid,
    image_token_count,
    preprocess_images,
)

# Padding is white; the spec's probe measured these normalized values (rounded to 4 decimals, hence atol 1e-4).
WHITE = np.array([1.9303, 2.0749, 2.1459])
RED = np.array([1.9303, -1.7521, -1.4802])


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def formula(h_crop: int, w_crop: int) -> int:
    return (h_crop * w_crop + 1) * 144 + 1 + (h_crop + 1) * 12


def hf_reference(image: Image.Image, num_crops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Phi3VImageProcessor written out literally: PIL resize and pad, torch normalize, torch bicubic."""
    width, height = image.size
    transposed = width < height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = int(np.ceil(new_h / 336) * 336)
    padded = Image.new("RGB", (new_w, target), (255, 255, 255))
    padded.paste(image, (0, int((target - new_h) / 2)))
    if transposed:
        padded = padded.transpose(Image.Transpose.TRANSPOSE)
    tensor = torch.from_numpy(np.array(padded)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.as_tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    tensor = tensor.sub(mean).div(std)
    big_h, big_w = tensor.shape[1:]
    crops = tensor.reshape(3, big_h // 336, 336, big_w // 336, 336).permute(1, 3, 0, 2, 4).reshape(-1, 3, 336, 336)
    return tensor, crops


# --- token counts and grids -----------------------------------------------------------------------------------------

SPEC_16 = [
    ((600, 400), [1008, 1344], 1921),
    ((336, 336), [1344, 1344], 2509),
    ((1000, 200), [672, 2688], 2485),
    ((200, 1000), [2688, 672], 2557),
    ((100, 50), [1008, 1680], 2353),
    ((4000, 300), [336, 4368], 2041),
    ((2000, 1500), [1008, 1344], 1921),
    ((1344, 1344), [1344, 1344], 2509),
]
SPEC_4 = [((600, 400), [672, 672], 757), ((1000, 200), [336, 1344], 745), ((200, 1000), [1344, 336], 781)]


@pytest.mark.parametrize(("num_crops", "size", "hd_size", "tokens"), [(16, *row) for row in SPEC_16])
def test_spec_table_at_16_crops(num_crops, size, hd_size, tokens):
    h_crop, w_crop = hd_grid(*size, num_crops)
    assert [h_crop * 336, w_crop * 336] == hd_size
    assert image_token_count(*size, num_crops) == tokens


@pytest.mark.parametrize(("size", "hd_size", "tokens"), SPEC_4)
def test_spec_table_at_4_crops_through_the_pixels(size, hd_size, tokens):
    out = preprocess_images([noise(*size)], 4)
    assert out.image_sizes.tolist() == [hd_size]
    assert out.num_image_tokens.tolist() == [[tokens]]
    assert out.pixel_values.shape == (1, 5, 3, 336, 336)


SHAPES = [(600, 400), (400, 600), (336, 336), (1000, 100), (100, 1000), (1280, 720), (50, 51), (7, 3000), (2, 2)]


@pytest.mark.parametrize("num_crops", [4, 16])
@pytest.mark.parametrize("size", SHAPES)
def test_token_counts_follow_the_formula_and_the_pixels(size, num_crops):
    h_crop, w_crop = hd_grid(*size, num_crops)
    assert 1 <= h_crop * w_crop <= num_crops
    assert image_token_count(*size, num_crops) == formula(h_crop, w_crop)
    hd, _ = hf_reference(noise(*size), num_crops)
    assert list(hd.shape[1:]) == [h_crop * 336, w_crop * 336]


def test_grid_predicts_the_preprocessed_output():
    images = [noise(1000, 100), noise(100, 1000, seed=1), noise(333, 250, seed=2)]
    out = preprocess_images(images, 16)
    for image, size, tokens in zip(images, out.image_sizes, out.num_image_tokens, strict=True):
        h_crop, w_crop = hd_grid(image.width, image.height, 16)
        assert size.tolist() == [h_crop * 336, w_crop * 336]
        assert tokens.tolist() == [image_token_count(image.width, image.height, 16)]


def test_extreme_strip_keeps_one_row_instead_of_failing():
    # 6000:1 resizes to 5376 x int(0.896) = 0 rows in HF; we keep one row, padded to one tile row.
    assert hd_grid(6000, 1, 16) == (1, 16)
    assert hd_grid(1, 6000, 16) == (16, 1)
    out = preprocess_images([noise(6000, 1)], 16)
    assert out.image_sizes.tolist() == [[336, 5376]]


# --- pixel values ---------------------------------------------------------------------------------------------------


def test_padding_is_normalized_white_and_red_keeps_rgb_order():
    red = Image.new("RGB", (600, 400), (255, 0, 0))  # HD 1344x1008: 896 rows of image, 56 white rows above and below
    pixels = preprocess_images([red], 16).pixel_values[0]
    assert np.allclose(pixels[1, :, 0, 0], WHITE, atol=1e-4)  # tile (0, 0) starts in the top padding
    assert np.allclose(pixels[12, :, -1, -1], WHITE, atol=1e-4)  # tile (2, 3) ends in the bottom padding
    assert np.allclose(pixels[5, :, 100, 100], RED, atol=1e-4)  # tile (1, 0) is all image


def test_portrait_is_padded_left_and_right():
    pixels = preprocess_images([Image.new("RGB", (400, 600), (255, 0, 0))], 16).pixel_values[0]
    assert np.allclose(pixels[1, :, 0, 0], WHITE, atol=1e-4)
    assert np.allclose(pixels[1, :, 0, -1], RED, atol=1e-4)
    assert np.allclose(pixels[2, :, 0, 0], RED, atol=1e-4)


@pytest.mark.parametrize(("size", "grid"), [((1344, 1008), (3, 4)), ((1008, 1344), (4, 3))])
def test_crops_are_row_major(size, grid):
    # Sizes that need neither resizing nor padding, one flat colour per tile.
    rows, cols = grid
    colours = np.arange(rows * cols * 3, dtype=np.uint8).reshape(rows, cols, 3) * 5
    pixels = np.kron(colours, np.ones((336, 336, 1), dtype=np.uint8))
    out = preprocess_images([Image.fromarray(pixels)], 16)
    assert out.image_sizes.tolist() == [[rows * 336, cols * 336]]
    mean, std = np.array(CLIP_MEAN)[:, None, None], np.array(CLIP_STD)[:, None, None]
    for i in range(rows):
        for j in range(cols):
            crop = out.pixel_values[0, 1 + i * cols + j]
            expected = (colours[i, j].astype(np.float64)[:, None, None] / 255 - mean) / std
            assert np.allclose(crop, np.broadcast_to(expected, crop.shape), atol=1e-6), (i, j)


def test_unused_crop_slots_are_exactly_zero():
    out = preprocess_images([noise(600, 400)], 16)  # 12 tiles + global = 13 of 17 slots
    assert out.pixel_values.shape == (1, 17, 3, 336, 336)
    assert np.all(out.pixel_values[0, 13:] == 0)
    assert np.all(np.abs(out.pixel_values[0, :13]).reshape(13, -1).max(axis=1) > 0)


@pytest.mark.parametrize(
    ("size", "num_crops"),
    [((600, 400), 16), ((400, 600), 16), ((200, 1000), 16), ((1000, 200), 4), ((517, 389), 4), ((97, 1301), 9)],
)
def test_matches_a_literal_hf_reimplementation(size, num_crops):
    image = noise(*size, seed=size[0])
    hd, crops = hf_reference(image, num_crops)
    out = preprocess_images([image], num_crops)
    n = crops.shape[0]
    assert out.image_sizes.tolist() == [list(hd.shape[1:])]
    # Local crops: same uint8 resize, same float32 operations, so bit-identical.
    assert np.array_equal(out.pixel_values[0, 1 : 1 + n], crops.numpy())
    # Global crop: torch sums 16 taps in float32, we sum separably; values are O(1), so 1e-5 is float32 noise.
    reference = torch.nn.functional.interpolate(hd[None], size=(336, 336), mode="bicubic", align_corners=False)[0]
    assert np.allclose(out.pixel_values[0, 0], reference.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("height", "width"), [(1008, 1344), (336, 4368), (2688, 672), (672, 672)])
def test_bicubic_matches_torch_at_the_hd_scales(height, width):
    planes = np.random.default_rng(height).standard_normal((3, height, width)).astype(np.float32)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(planes)[None], size=(336, 336), mode="bicubic", align_corners=False, antialias=False
    )[0].numpy()
    ours = _bicubic_resize(planes, 336)
    assert ours.shape == (3, 336, 336)
    # Whole-number scales: coordinates and weights are exact, only float32 summation order differs (~1e-6).
    assert np.allclose(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("height", "width"), [(700, 500), (300, 200), (5000, 37)])
def test_bicubic_matches_torch_at_other_scales(height, width):
    planes = np.random.default_rng(height).standard_normal((3, height, width)).astype(np.float32)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(planes)[None], size=(336, 336), mode="bicubic", align_corners=False, antialias=False
    )[0].numpy()
    # torch rounds coordinates to float32 (fused or not, depending on its build): ~2e-6 here, up to ~4e-5 unfused.
    assert np.allclose(_bicubic_resize(planes, 336), reference, atol=1e-4, rtol=0)


def test_portrait_image_sizes():
    assert preprocess_images([noise(200, 1000)], 16).image_sizes.tolist() == [[2688, 672]]


def test_several_images_stack_in_order():
    out = preprocess_images([noise(600, 400), noise(4000, 300, seed=1)], 16)
    assert isinstance(out, Preprocessed)
    assert out.pixel_values.shape == (2, 17, 3, 336, 336)
    assert out.pixel_values.dtype == np.float32
    assert out.image_sizes.dtype == np.int64 and out.num_image_tokens.dtype == np.int64
    assert out.image_sizes.tolist() == [[1008, 1344], [336, 4368]]
    assert out.num_image_tokens.tolist() == [[1921], [2041]]
    assert out.total_image_tokens == 1921 + 2041


def test_non_rgb_images_are_converted_with_transparency_over_white():
    rgba = Image.new("RGBA", (600, 400), (255, 0, 0, 0))  # fully transparent red
    pixels = preprocess_images([rgba], 4).pixel_values[0]
    assert np.allclose(pixels[1:5].reshape(4, 3, -1).mean(axis=2), WHITE, atol=1e-4)
    gray = preprocess_images([Image.new("L", (50, 50), 255)], 4).pixel_values[0]
    assert np.allclose(gray[1, :, 10, 10], WHITE, atol=1e-4)


def test_no_images_give_empty_tensors():
    out = preprocess_images([], 4)
    assert out.pixel_values.shape == (0, 5, 3, 336, 336)
    assert out.image_sizes.shape == (0, 2) and out.num_image_tokens.shape == (0, 1)
    assert out.total_image_tokens == 0


# --- crop slots and validation --------------------------------------------------------------------------------------


def test_crop_slots_pad_to_a_fixed_count():
    out = preprocess_images([noise(600, 400)], 4, crop_slots=17)
    assert out.pixel_values.shape == (1, 17, 3, 336, 336)
    assert out.num_image_tokens.tolist() == [[757]]
    assert np.all(out.pixel_values[0, 5:] == 0)
    assert np.array_equal(out.pixel_values[0, :5], preprocess_images([noise(600, 400)], 4).pixel_values[0])


def test_crop_slots_too_few_for_the_image():
    with pytest.raises(OptionsError, match=r"image 1 \(600x400\) needs 13 crops .* crop_slots is 5: use num_crops 4"):
        preprocess_images([noise(600, 400)], 16, crop_slots=5)
    # The check is per image: a 12:1 strip uses 12 of its 16 tiles, so 13 slots are enough.
    out = preprocess_images([noise(1200, 100)], 16, crop_slots=13)
    assert out.pixel_values.shape[1] == 13
    assert out.num_image_tokens.tolist() == [[formula(1, 12)]]


@pytest.mark.parametrize("bad", [0, 65, -1, 4.0, True, "4", None])
def test_num_crops_must_be_an_integer_in_range(bad):
    with pytest.raises(OptionsError, match="num_crops must be an integer from 1 to 64"):
        preprocess_images([noise(10, 10)], bad)
    with pytest.raises(OptionsError):
        hd_grid(10, 10, bad)


def test_numpy_integers_are_accepted():
    assert preprocess_images([noise(10, 10)], np.int64(4)).pixel_values.shape[1] == 5
    assert hd_grid(np.int64(600), np.int32(400), 16) == (3, 4)


@pytest.mark.parametrize("bad", [1, 1.5, "17"])
def test_crop_slots_must_be_an_integer_of_at_least_two(bad):
    with pytest.raises(OptionsError, match="crop_slots"):
        preprocess_images([noise(10, 10)], 4, crop_slots=bad)


def test_inputs_must_be_pil_images():
    with pytest.raises(ImageError, match="image 2 is a ndarray, not a PIL image"):
        preprocess_images([noise(10, 10), np.zeros((10, 10, 3), np.uint8)], 4)
    with pytest.raises(ImageError, match="image 1 is 0x5 pixels"):
        preprocess_images([Image.new("RGB", (0, 5))], 4)
    with pytest.raises(ImageError, match="positive integers"):
        hd_grid(0, 10, 4)


def test_scale_rule_never_exceeds_num_crops():
    for num_crops in range(1, 65):
        for width, height in [(1, 1), (3, 2), (16, 9), (1, 64), (100, 1)]:
            h_crop, w_crop = hd_grid(width, height, num_crops)
            ratio = max(width, height) / min(width, height)
            assert h_crop * w_crop <= num_crops
            # The long side gets the largest scale whose grid still fits.
            fitting = [s for s in range(1, num_crops + 1) if s * math.ceil(s / ratio) <= num_crops]
            assert max(h_crop, w_crop) == max(fitting)


def test_runtime_modules_do_not_import_torch():
    code = "import sys, phi_onnx.images, phi_onnx.preprocess, phi_onnx.prompt; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
