"""Image decoding: every input kind, every Pillow mode, EXIF, animations, folders, and the refusals."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from phi_onnx import images
from phi_onnx.errors import ImageError, OptionsError
from phi_onnx.images import load_frames, load_image, to_rgb

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def gradient(width: int = 48, height: int = 32) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=2))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no data: a decompression-bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * min((3 * width + 1) * height, 1 << 16))  # complete only for small sizes
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(image.getpixel(xy))


def frames_of(colours: list[tuple[int, int, int]], size: tuple[int, int] = (20, 10)) -> list[Image.Image]:
    return [Image.new("RGB", size, colour) for colour in colours]


# --- input kinds ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF", "JPEG", "WEBP"])
def test_files_of_each_format_load_as_rgb(tmp_path, fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = tmp_path / f"picture.{fmt.lower()}"
    path.write_bytes(encode(gradient(), fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    image = load_image(path)
    path.unlink()  # the result must not depend on the file any more
    assert image.mode == "RGB" and image.size == (48, 32)
    assert np.asarray(image).shape == (32, 48, 3)
    if fmt in ("PNG", "BMP", "TIFF", "WEBP"):
        assert np.array_equal(np.asarray(image), np.asarray(gradient()))


def test_str_path_bytes_bytearray_memoryview_and_data_url_agree(tmp_path):
    data = encode(gradient(), "PNG")
    path = tmp_path / "g.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    expected = np.asarray(gradient())
    for src in (str(path), path, data, bytearray(data), memoryview(data), url):
        assert np.array_equal(np.asarray(load_image(src)), expected), type(src)


def test_pil_input_is_copied_not_aliased():
    original = gradient()
    loaded = load_image(original)
    assert loaded is not original
    loaded.putpixel((0, 0), (1, 2, 3))
    assert pixel(original) != (1, 2, 3)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((4, 5), 7, np.uint8), (7, 7, 7)),
        (np.full((4, 5, 1), 9, np.uint8), (9, 9, 9)),
        (np.full((4, 5, 3), [1, 2, 3], np.uint8), (1, 2, 3)),
        (np.full((4, 5, 4), [255, 0, 0, 0], np.uint8), (255, 255, 255)),  # transparent: white
        (np.full((4, 5, 4), [0, 0, 0, 255], np.uint8), (0, 0, 0)),
        (np.full((4, 5, 3), [1.0, 0.5, 0.0], np.float32), (255, 128, 0)),
    ],
)
def test_numpy_arrays(array, expected):
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (5, 4)
    assert pixel(image) == expected


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((3, 8, 8), np.uint8), r"shape \(3, 8, 8\).*channels first"),
        (np.zeros((8, 8, 2), np.uint8), "expected HxW, HxWx3 or HxWx4"),
        (np.zeros((0, 8, 3), np.uint8), "holds no pixels"),
        (np.full((4, 4), 1.5, np.float32), r"outside \[0, 1\]"),
        (np.full((4, 4), np.nan, np.float64), r"outside \[0, 1\]"),
        (np.zeros((4, 4), np.int32), "dtype int32"),
    ],
)
def test_bad_arrays_are_refused(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)


# --- modes ----------------------------------------------------------------------------------------------------------


def test_palette_without_and_with_transparency(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert pixel(load_image(encode(palette, "PNG"))) == (10, 20, 30)
    see_through = tmp_path / "t.gif"
    palette.save(see_through, transparency=1)
    assert pixel(load_image(see_through)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "La", "RGBa"])
def test_alpha_is_composited_over_white(mode):
    if mode == "PA":
        image = Image.new("PA", (2, 2))
        image.putpalette([200, 0, 0] * 256)
        image.putpixel((0, 0), (0, 0))  # palette index 0, alpha 0
    else:
        image = Image.new(mode, (2, 2), 0)  # black, alpha 0
    assert pixel(load_image(image)) == (255, 255, 255)


def test_half_transparent_red_over_white():
    image = load_image(encode(Image.new("RGBA", (2, 2), (255, 0, 0, 128)), "PNG"))
    assert pixel(image) == (255, 127, 127)


@pytest.mark.parametrize(("mode", "value", "expected"), [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255))])
def test_gray_and_bilevel(mode, value, expected):
    assert pixel(load_image(encode(Image.new(mode, (3, 3), value), "PNG"))) == expected


def test_16_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    image = load_image(encode(Image.fromarray(values), "PNG"))
    assert np.asarray(image)[0, :, 0].tolist() == [0, 4, 128, 255]  # round(v / 257)


def test_32_bit_integer_and_float_images():
    as_int = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert as_int.mode == "I"
    assert np.asarray(load_image(as_int))[0, :, 0].tolist() == [0, 255]
    signed = Image.fromarray(np.array([[-100, 100]], dtype=np.int32))  # out of 16-bit range: stretched
    assert np.asarray(load_image(signed))[0, :, 0].tolist() == [0, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert np.asarray(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]
    byte_range = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32))
    assert np.asarray(load_image(byte_range))[0, :, 0].tolist() == [0, 100, 255]


def test_cmyk_jpeg_and_ycbcr():
    cmyk = load_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    r, g, b = pixel(cmyk, (4, 4))
    assert r > 240 and g < 15 and b < 15
    assert pixel(load_image(Image.new("YCbCr", (2, 2), (255, 128, 128)))) == (255, 255, 255)


def test_to_rgb_leaves_rgb_alone():
    image = gradient()
    assert to_rgb(image) is image


# --- EXIF -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "size", "corner"), [(1, (40, 20), RED), (3, (40, 20), BLUE), (6, (20, 40), RED)]
)
def test_exif_orientation_is_applied(orientation, size, corner):
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    loaded = load_image(encode(image, "PNG", exif=exif.tobytes()))
    assert loaded.size == size
    # 3 turns the picture by 180 degrees; 6 means "rotate 90 clockwise to view", taking top-left to top-right.
    probe = {1: (2, 2), 3: (2, 2), 6: (size[0] - 3, 2)}[orientation]
    assert pixel(loaded, probe) == corner
    if orientation == 3:
        assert pixel(loaded, (37, 17)) == RED


# --- refusals -------------------------------------------------------------------------------------------------------


def test_missing_file_directory_and_empty_file(tmp_path):
    with pytest.raises(ImageError, match=r"'.*nope\.png' does not exist: check the path"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder: pass an image file, or use load_frames"):
        load_image(tmp_path)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg' is empty \(0 bytes\)"):
        load_image(empty)
    with pytest.raises(ImageError, match=r"<bytes> is empty \(0 bytes\)"):
        load_image(b"")


def test_not_an_image(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not a PNG")
    with pytest.raises(ImageError, match=r"notes\.png' is not an image Pillow can read"):
        load_image(fake)
    with pytest.raises(ImageError, match=r"^image 2 is not an image"):
        load_image(b"\x00\x01garbage", name="image 2")
    with pytest.raises(ImageError, match=r"^image 3 \('.*notes\.png'\) is not an image"):
        load_image(fake, name="image 3")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_truncated_files_error_instead_of_hanging(tmp_path, fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    data = encode(Image.effect_noise((256, 256), 64).convert("RGB"), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match=r"cut\..*' (is truncated or corrupt|is not an image|could not be opened)"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.com/cat.jpg", "remote URLs are not fetched; download the image first"),
        ("http://example.com/cat.jpg", "remote URLs are not fetched"),
        ("ftp://example.com/cat.jpg", "ftp:// URLs are not supported"),
        ("data:image/png;base64,!!!", "invalid base64"),
        ("data:image/png,rawbytes", "without ;base64"),
        ("data:text/plain;base64,aGVsbG8=", "of type 'text/plain', not an image"),
        ("data:image/png;base64,", "empty data URL"),
        ("data:nonsense", "not a valid data URL"),
    ],
)
def test_urls(url, message):
    with pytest.raises(ImageError, match=message):
        load_image(url)


def test_unsupported_input_type():
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        load_image(42)  # type: ignore[arg-type]


def test_zero_size_pil_image():
    with pytest.raises(ImageError, match="0x3 pixels, which holds no pixels"):
        load_image(Image.new("RGB", (0, 3)))


def test_decompression_bomb_headers_are_refused_before_decoding(tmp_path):
    just_over = tmp_path / "big.png"
    just_over.write_bytes(png_header(8001, 8000))  # 64,008,000 pixels: our limit, below Pillow's
    with pytest.raises(ImageError, match=r"big\.png' is 8001x8000 = 64,008,000 pixels, over the limit of 64,000,000"):
        load_image(just_over)
    with pytest.raises(
        ImageError, match=r"100,000,000 pixels, over the limit of 64,000,000.*downscale it first"
    ):  # Pillow's warning, as an error
        load_image(png_header(10_000, 10_000))
    with pytest.raises(
        ImageError, match=r"3,600,000,000 pixels, over the limit of 64,000,000.*downscale it first"
    ):  # Pillow's own error
        load_image(png_header(60_000, 60_000))
    assert load_image(png_header(4, 4)).size == (4, 4)


def test_pixel_limit_is_a_module_constant(monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="11x10 = 110 pixels, over the limit of 100"):
        load_image(np.zeros((10, 11), np.uint8))
    assert load_image(np.zeros((10, 10), np.uint8)).size == (10, 10)


# --- animations and frames ------------------------------------------------------------------------------------------


def animated(fmt: str, colours: list[tuple[int, int, int]]) -> bytes:
    first, *rest = frames_of(colours)
    args = {"lossless": True} if fmt == "WEBP" else {}
    return encode(first, fmt, save_all=True, append_images=rest, duration=40, loop=0, **args)


FORMATS = ["GIF", "PNG", pytest.param("WEBP", marks=pytest.mark.skipif(not features.check("webp"), reason="no WebP"))]


@pytest.mark.parametrize("fmt", FORMATS)
def test_animation_frames(fmt):
    data = animated(fmt, [RED, GREEN, BLUE, RED, GREEN])
    assert pixel(load_image(data)) == RED  # load_image: first frame
    frames = load_frames(data)
    assert [pixel(f, (5, 5)) for f in frames] == [RED, GREEN, BLUE, RED, GREEN]
    assert all(f.mode == "RGB" and f.size == (20, 10) for f in frames)
    sampled = load_frames(data, max_frames=3)
    assert [pixel(f, (5, 5)) for f in sampled] == [RED, BLUE, GREEN]  # frames 0, 2, 4


def test_gif_partial_frames_are_composited():
    base = Image.new("RGB", (20, 10), RED)
    patch = base.copy()
    patch.paste(BLUE, (0, 0, 5, 5))  # only the top-left corner changes: GIF stores a small delta frame
    frames = load_frames(encode(base, "GIF", save_all=True, append_images=[patch], duration=40))
    assert pixel(frames[1], (2, 2)) == BLUE
    assert pixel(frames[1], (15, 8)) == RED


def test_max_frames_samples_evenly_keeping_first_and_last():
    stack = np.arange(10, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3) * 20
    assert [pixel(f)[0] // 20 for f in load_frames(stack, max_frames=4)] == [0, 3, 6, 9]
    assert [pixel(f)[0] // 20 for f in load_frames(stack, max_frames=1)] == [0]
    assert len(load_frames(stack, max_frames=50)) == 10


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_max_frames_must_be_positive(bad):
    with pytest.raises(OptionsError, match="max_frames"):
        load_frames(gradient(), max_frames=bad)


def test_still_image_is_one_frame(tmp_path):
    path = tmp_path / "still.png"
    gradient().save(path)
    frames = load_frames(path, max_frames=5)
    assert len(frames) == 1 and np.array_equal(np.asarray(frames[0]), np.asarray(gradient()))


def test_pil_animation_left_on_a_later_frame(tmp_path):
    path = tmp_path / "anim.gif"
    path.write_bytes(animated("GIF", [RED, GREEN, BLUE]))
    with Image.open(path) as opened:
        opened.seek(2)
        assert pixel(load_image(opened)) == RED
        assert opened.tell() == 2
        assert len(load_frames(opened)) == 3
        assert opened.tell() == 2


def test_folder_of_frames_in_natural_order(tmp_path):
    for number, colour in [(10, BLUE), (2, GREEN), (1, RED)]:
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"frame{number}.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "sub").mkdir()
    assert [pixel(f) for f in load_frames(tmp_path)] == [RED, GREEN, BLUE]
    assert [pixel(f) for f in load_frames(str(tmp_path), max_frames=2)] == [RED, BLUE]


def test_folder_errors(tmp_path):
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(ImageError, match="has no image files"):
        load_frames(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not really a png")
    with pytest.raises(ImageError, match=r"broken\.png' is not an image"):
        load_frames(tmp_path)


def test_frame_pixel_budget(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "MAX_FRAMES_PIXELS", 500)
    data = animated("GIF", [RED, GREEN, BLUE])  # 3 frames of 20x10
    with pytest.raises(ImageError, match="3 frames hold 600 pixels, over the limit of 500: pass max_frames"):
        load_frames(data)
    assert len(load_frames(data, max_frames=2)) == 2
    for i in range(3):
        Image.new("RGB", (20, 10), RED).save(tmp_path / f"{i}.png")
    with pytest.raises(ImageError, match="over the limit of 500: pass max_frames"):
        load_frames(Path(tmp_path))
