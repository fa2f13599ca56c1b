"""Decode user images safely with Pillow.

Every image phi-onnx sees goes through :func:`load_image` or :func:`load_frames`: onnxruntime-genai's own decoder
kills the process on GIF/BMP/TIFF/WebP and hangs on truncated JPEGs, so user bytes never reach ``og.Images``.
Images come back fully loaded, in RGB, with the EXIF orientation applied and transparency composited over white.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import re
import stat
import struct
import warnings
from collections.abc import Iterator
from typing import TypeAlias

import numpy as np
from PIL import Image

from phi_onnx.errors import ImageError, OptionsError

ImageInput: TypeAlias = str | os.PathLike | bytes | Image.Image | np.ndarray
"""A path, encoded bytes, a ``data:image/...;base64,`` URL, a PIL image, or an HxW / HxWx3 / HxWx4 array."""

MAX_IMAGE_PIXELS = 64_000_000
"""Images over this many pixels (width x height) are refused: a guard against decompression bombs."""

MAX_FRAMES_PIXELS = 256_000_000
"""The most pixels :func:`load_frames` decodes in total (about 768 MB of RGB); pass max_frames for longer clips."""

# What Pillow raises on malformed input (its own fuzzers see these); anything else is a bug worth a traceback.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error)
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<payload>.*)$", re.DOTALL)
_DIGITS = re.compile(r"(\d+)")
_ORIENTATION_TAG = 0x0112
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HINT = "pass a path, bytes, a data:image/...;base64 URL, a PIL image or a numpy array"


def load_image(src: ImageInput, *, name: str | None = None) -> Image.Image:
    """Decode one image into a fully loaded RGB PIL image.

    EXIF orientation is applied; alpha and palette transparency are composited over white; 16-bit and float images
    are scaled to 8 bits. Animated images give their first frame.

    Args:
        src: A file path, encoded bytes, a ``data:image/...;base64,`` URL, a PIL image, or a numpy array (HxW, HxWx3
            or HxWx4; uint8, or float in [0, 1]). Remote ``http(s)://`` URLs are refused, not fetched.
        name: How to call the image in error messages, e.g. ``"image 2"``; defaults to the path or the input kind.

    Returns:
        A new RGB image, not tied to any file.

    Raises:
        ImageError: The input is missing, unreadable, not an image, truncated, empty, or over
            :data:`MAX_IMAGE_PIXELS`.
    """
    label = _label(src, name)
    with _opened(src, label) as img:
        _check_size(img, label)
        start = img.tell()
        if start == 0:
            return _finish(img, label, _orientation(img))
        try:  # a PIL image the caller left on a later frame: use the first, then put it back
            img.seek(0)
            return _finish(img, label, _orientation(img))
        finally:
            img.seek(start)


def load_frames(src: ImageInput, *, max_frames: int | None = None, sampling: str = "uniform") -> list[Image.Image]:
    """Decode the frames of a video file, an animation, a folder of images, or a single still image.

    Args:
        src: An animated GIF / WebP / APNG (any form :func:`load_image` takes), a folder whose image files are the
            frames (natural name order, ``frame2`` before ``frame10``; hidden files skipped), a [T, H, W(, C)] array,
            or a still image (one frame).
        max_frames: Keep at most this many frames, sampled evenly (first and last kept). None keeps all.

    Returns:
        The frames as RGB images, fully composited and loaded.

    Raises:
        ImageError: A frame cannot be decoded, the folder has no images, or the frames exceed
            :data:`MAX_FRAMES_PIXELS` in total.
        OptionsError: max_frames is not a positive integer.
    """
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise OptionsError(f"max_frames must be a positive integer or None, got {max_frames!r}")
    from phi_onnx.video import is_video, load_video

    if is_video(src):  # mp4, mov, webm, mkv, avi: PyAV, seeking to the frames it keeps
        return load_video(src, max_frames=max_frames or 16, sampling=sampling)
    if isinstance(src, str | os.PathLike) and not _is_url(src) and os.path.isdir(src):
        return _folder_frames(os.fspath(src), max_frames)
    label = _label(src, None)
    if isinstance(src, np.ndarray) and src.ndim == 4:
        keep = _sample(src.shape[0], max_frames)
        _check_frames(src.shape[1] * src.shape[2] * len(keep), len(keep), label)
        return [load_image(src[i], name=f"{label} frame {i}") for i in keep]
    with _opened(src, label) as img:
        _check_size(img, label)
        orientation = _orientation(img)
        try:
            start, count = img.tell(), int(getattr(img, "n_frames", 1))
        except _DECODE_ERRORS as err:
            raise ImageError(f"{label} has unreadable frames ({err}): re-export the animation") from err
        keep = _sample(count, max_frames)
        _check_frames(img.width * img.height * len(keep), len(keep), label)
        frames = []
        try:
            for i in keep:
                try:
                    img.seek(i)
                except _DECODE_ERRORS as err:
                    raise ImageError(f"{label} frame {i} is truncated or corrupt ({err}): re-export the file") from err
                frames.append(_finish(img, f"{label} frame {i}", orientation))
        finally:
            if count > 1 and isinstance(src, Image.Image):
                with contextlib.suppress(*_DECODE_ERRORS):
                    img.seek(start)  # leave the caller's image on the frame it was on
        return frames


def to_rgb(image: Image.Image, *, name: str | None = None) -> Image.Image:
    """Convert a loaded image of any Pillow mode to RGB, compositing transparency over white.

    16-bit images (``I;16*``, and ``I`` holding values in 0..65535) are scaled by 255/65535; other ``I`` images and
    ``F`` images outside [0, 1] or [0, 255] are stretched from their minimum to their maximum.

    Args:
        image: The image; an RGB image is returned as is (not copied).
        name: How to call the image in error messages.

    Returns:
        An RGB image.

    Raises:
        ImageError: The mode cannot be converted.
    """
    mode = image.mode
    if mode == "RGB" and not image.has_transparency_data:
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), mode, name)).convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("LA").convert("RGBA") if mode == "La" else image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageError(
            f"{name or 'image'} has colour mode {mode}, which phi-onnx cannot convert: save it as RGB"
        ) from err


def _to_uint8(values: np.ndarray, mode: str, name: str | None = None) -> np.ndarray:
    if mode.startswith("I;16"):
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    values = values.astype(np.float64)
    if not np.isfinite(values).all():  # as for float arrays: never turn NaN or infinity into black pixels silently
        raise ImageError(f"{name or 'image'} (mode {mode}) holds NaN or infinite values: pass finite pixel values")
    low, high = float(values.min()), float(values.max())
    if mode == "I" and low >= 0 and high <= 65535:
        return np.rint(values * (255 / 65535)).astype(np.uint8)
    if mode == "F" and low >= 0 and high <= 1:
        return np.rint(values * 255).astype(np.uint8)
    if mode == "F" and low >= 0 and high <= 255:
        return np.rint(values).astype(np.uint8)
    if high == low:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - low) * (255 / (high - low))).astype(np.uint8)


def _finish(img: Image.Image, label: str, orientation: int) -> Image.Image:
    """Load the current frame, convert it to RGB and orient it; always a new image not tied to a file."""
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(_bomb_message(label, err)) from err
    except _DECODE_ERRORS as err:
        raise ImageError(f"{label} is truncated or corrupt ({err}): re-download or re-export the file") from err
    rgb = to_rgb(img, name=label)
    method = _ORIENTATIONS.get(orientation)
    if method is not None:
        return rgb.transpose(method)
    return rgb.copy() if rgb is img else rgb


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except (*_DECODE_ERRORS, KeyError, TypeError):
        return 1  # unreadable EXIF: the pixels are still fine, keep them as stored
    return value if isinstance(value, int) else 1


@contextlib.contextmanager
def _opened(src: ImageInput, label: str) -> Iterator[Image.Image]:
    """Yield a (lazily decoded) PIL image for src; files Pillow opens are closed on exit."""
    if isinstance(src, Image.Image):
        yield src
        return
    if isinstance(src, np.ndarray):
        yield _from_array(src, label)
        return
    if isinstance(src, bytes | bytearray | memoryview):
        if len(src) == 0:
            raise ImageError(f"{label} is empty (0 bytes): {_HINT} holding an encoded image")
        source: str | bytes | io.BytesIO = io.BytesIO(bytes(src))
    elif isinstance(src, str) and src[:5].lower() == "data:":
        source = io.BytesIO(_decode_data_url(src, label))
    elif isinstance(src, str | os.PathLike):
        if _is_url(src):
            scheme = str(src).split(":", 1)[0].lower()
            if scheme in ("http", "https"):
                raise ImageError(f"{label}: remote URLs are not fetched; download the image first and pass the file")
            raise ImageError(f"{label}: {scheme}:// URLs are not supported; {_HINT}")
        source = _check_path(os.fspath(src), label)
    else:
        raise ImageError(f"{label}: cannot read an image from a {type(src).__name__}; {_HINT}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(_bomb_message(label, err)) from err
    except Image.UnidentifiedImageError as err:
        raise ImageError(f"{label} is not an image Pillow can read: pass a PNG, JPEG, GIF, WebP, BMP or TIFF") from err
    except PermissionError as err:
        raise ImageError(f"{label} cannot be read (permission denied): check the file's permissions") from err
    except _DECODE_ERRORS as err:
        reason = getattr(err, "strerror", None) or shorten(str(err))
        raise ImageError(f"{label} could not be opened ({reason}): check that the file is a valid image") from err
    with img:
        yield img


def _check_path(path: str | bytes, label: str) -> str | bytes:
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise ImageError(f"{label} does not exist: check the path") from err
    except PermissionError as err:
        raise ImageError(f"{label} cannot be read (permission denied): check the file's permissions") from err
    except (OSError, ValueError) as err:  # ValueError: a path with a NUL byte
        reason = getattr(err, "strerror", None) or shorten(str(err))
        raise ImageError(f"{label} cannot be read ({reason}): check the path") from err
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{label} is a folder: pass an image file, or use load_frames for a folder of frames")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{label} is not a regular file: save the image to a file first")
    if info.st_size == 0:
        raise ImageError(f"{label} is empty (0 bytes): re-download or re-export the image")
    return path


def _decode_data_url(url: str, label: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise ImageError(f"{label} is not a valid data URL: use data:image/<type>;base64,<data>")
    mime, params = match["mime"].strip().lower(), match["params"].lower().split(";")
    if mime and not mime.startswith("image/"):
        raise ImageError(f"{label} is a data URL of type {mime!r}, not an image: use data:image/<type>;base64,<data>")
    if "base64" not in params:
        raise ImageError(f"{label} is a data URL without ;base64: use data:image/<type>;base64,<data>")
    try:
        data = base64.b64decode("".join(match["payload"].split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"{label} has invalid base64 data ({err}): re-encode the image") from err
    if not data:
        raise ImageError(f"{label} is an empty data URL: it holds no image bytes")
    return data


def _from_array(array: np.ndarray, label: str) -> Image.Image:
    shape = array.shape
    if array.ndim == 3 and shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        hint = " (channels first? use array.transpose(1, 2, 0))" if array.ndim == 3 and shape[0] in (1, 3, 4) else ""
        raise ImageError(f"{label} has shape {shape}: expected HxW, HxWx3 or HxWx4{hint}")
    if array.size == 0:
        raise ImageError(f"{label} has shape {shape}, which holds no pixels")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageError(
                f"{label} is a float array with NaN, infinite or values outside [0, 1]: scale it to [0, 1] or pass "
                "uint8"
            )
        array = np.rint(array.astype(np.float64) * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageError(f"{label} has dtype {array.dtype}: pass uint8 (0..255) or float (0..1)")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1] if array.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def _check_size(img: Image.Image, label: str) -> None:
    width, height = img.size
    if width == 0 or height == 0:
        raise ImageError(f"{label} is {width}x{height} pixels, which holds no pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{label} is {width}x{height} = {width * height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,} "
            "(a possible decompression bomb): downscale it first"
        )


def _check_frames(pixels: int, frames: int, label: str) -> None:
    if pixels > MAX_FRAMES_PIXELS:
        raise ImageError(
            f"{label}: {frames} frames hold {pixels:,} pixels, over the limit of {MAX_FRAMES_PIXELS:,}: "
            "pass max_frames to sample fewer frames"
        )


def _folder_frames(folder: str | bytes, max_frames: int | None) -> list[Image.Image]:
    extensions = Image.registered_extensions()
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            entry_name = os.fsdecode(entry.name)
            if entry_name.startswith(".") or os.path.splitext(entry_name)[1].lower() not in extensions:
                continue
            if entry.is_file():
                names.append(entry_name)
    label = f"folder '{os.fsdecode(folder)}'"
    if not names:
        raise ImageError(f"{label} has no image files (looked for .png, .jpg, .gif, .webp, ...): add the frames")
    names.sort(key=_natural_key)
    frames: list[Image.Image] = []
    total = 0
    for i in _sample(len(names), max_frames):
        path = os.path.join(os.fsdecode(folder), names[i])
        frame = load_image(path)
        total += frame.width * frame.height
        frames.append(frame)
        _check_frames(total, len(frames), label)
    return frames


def _natural_key(name: str) -> tuple[list[int | str], str]:
    parts = _DIGITS.split(name)  # text at even positions, digit runs at odd ones, so comparisons never mix types
    return [int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)], name


def _sample(count: int, max_frames: int | None) -> list[int]:
    if max_frames is None or count <= max_frames:
        return list(range(count))
    if max_frames == 1:
        return [0]
    return [int(i) for i in np.rint(np.linspace(0, count - 1, max_frames))]


def _bomb_message(label: str, err: BaseException) -> str:
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found.group(1)):,} pixels, " if found else ""
    return (
        f"{label} is too large to decode safely ({size}over the limit of {MAX_IMAGE_PIXELS:,}, a possible "
        "decompression bomb): downscale it first"
    )


def shorten(text: str, limit: int = 80) -> str:
    """Caller text fit for a one-line message: control characters escaped, cut to ``limit`` characters."""
    escaped = text.encode("unicode_escape", "backslashreplace").decode("ascii") if not text.isprintable() else text
    return escaped if len(escaped) <= limit else f"{escaped[: limit - 3]}..."


def _is_url(src: str | os.PathLike) -> bool:
    return isinstance(src, str) and _URL_SCHEME.match(src) is not None


def _label(src: ImageInput, name: str | None) -> str:
    if isinstance(src, str) and src[:5].lower() == "data:":
        described = "<data URL>"
    elif isinstance(src, str | os.PathLike):
        described = f"'{shorten(os.fsdecode(os.fspath(src)))}'"
    elif isinstance(src, bytes | bytearray | memoryview):
        described = "<bytes>"
    elif isinstance(src, Image.Image):
        described = "<PIL image>"
    elif isinstance(src, np.ndarray):
        described = "<array>"
    else:
        described = f"<{type(src).__name__}>"
    if name is None:
        return described
    return f"{name} ({described})" if isinstance(src, str | os.PathLike) and described != "<data URL>" else name
