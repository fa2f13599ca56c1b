"""Video files as frames: decoded with PyAV (the `video` extra), bounded, seeking instead of decoding every frame.

A clip becomes up to ``max_frames`` RGB frames, each a PIL image whose ``info`` carries its time in seconds under
:data:`TIMESTAMP`. Frames are picked "uniform"ly over the clip (the default), or at "scenes": the first frame of each
shot, found from frame-to-frame differences, then topped up with evenly spaced frames or thinned to the strongest cuts.
Limits (resolution, duration, frames scanned) are checked from the container's header before any frame is decoded.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from phi_onnx.errors import ImageError, OptionsError, require
from phi_onnx.images import MAX_IMAGE_PIXELS, shorten

TIMESTAMP = "phi_onnx.timestamp"
"""Key in a frame's PIL ``info``: its time in the clip, in seconds."""

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"})
SAMPLING = ("uniform", "scenes")
_SCENE_SIZE = 32  # frames are compared as 32x32 grey thumbnails


@dataclass(frozen=True)
class VideoLimits:
    """What a clip may be before phi-onnx decodes it.

    Attributes:
        max_pixels: Most pixels per frame (width x height).
        max_duration_s: Longest clip, in seconds.
        max_scanned_frames: Most frames decoded to find scene cuts (scene sampling reads every frame).
    """

    max_pixels: int = MAX_IMAGE_PIXELS
    max_duration_s: float = 4 * 3600.0
    max_scanned_frames: int = 20_000


def is_video(src: Any) -> bool:
    """Whether ``src`` is a video file path (by extension) or video bytes (by signature)."""
    if isinstance(src, str | os.PathLike) and not str(src).startswith("data:"):
        return os.path.splitext(os.fsdecode(os.fspath(src)))[1].lower() in VIDEO_EXTENSIONS
    if isinstance(src, bytes | bytearray | memoryview):
        head = bytes(src[:16])
        return head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:11] == b"AVI")
    return False


def load_video(
    src: str | os.PathLike | bytes,
    *,
    max_frames: int = 16,
    sampling: str = "uniform",
    limits: VideoLimits | None = None,
) -> list[Image.Image]:
    """Decode up to ``max_frames`` frames of a clip.

    Args:
        src: A video file path or its bytes (mp4, mov, webm, mkv, avi).
        max_frames: Most frames to return.
        sampling: "uniform" (evenly over the clip) or "scenes" (the first frame of each shot).
        limits: Resolution, duration and scanning limits (defaults: :class:`VideoLimits`).

    Returns:
        RGB frames in time order, each with its time in seconds in ``info[TIMESTAMP]``.

    Raises:
        DependencyError: PyAV is not installed (``pip install 'phi-onnx[video]'``).
        ImageError: The file is missing, corrupt, truncated, has no video stream, or exceeds a limit.
        OptionsError: sampling or max_frames is invalid.
    """
    if sampling not in SAMPLING:
        raise OptionsError(f"unknown frame_sampling {sampling!r}: choose one of {', '.join(SAMPLING)}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise OptionsError(f"max_frames must be a positive whole number, got {max_frames!r}")
    av = require("av", extra="video", purpose="reading video files")
    limits = limits or VideoLimits()
    label = _label(src)
    source = io.BytesIO(bytes(src)) if isinstance(src, bytes | bytearray | memoryview) else os.fspath(src)
    if isinstance(source, str | bytes) and not os.path.isfile(source):
        raise ImageError(f"{label} does not exist: check the path")
    try:
        with av.open(source, metadata_errors="ignore") as container:
            stream = _video_stream(container, label)
            duration, count = _check(container, stream, label, limits, sampling)
            if sampling == "scenes":
                frames = _scenes(container, stream, max_frames, duration)
            else:
                frames = _uniform(container, stream, max_frames, duration, count)
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as err:
        if isinstance(err, ImageError):
            raise
        raise ImageError(
            f"{label} is not a readable video ({shorten(str(err), 120)}): re-encode or re-download it"
        ) from err
    if not frames:
        raise ImageError(f"{label} holds no decodable video frames: re-encode or re-download it")
    return frames


def _label(src: Any) -> str:
    if isinstance(src, bytes | bytearray | memoryview):
        return "<video bytes>"
    return f"'{shorten(os.fsdecode(os.fspath(src)))}'"


def _video_stream(container, label: str):
    streams = [s for s in container.streams if s.type == "video"]
    if not streams:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
        raise ImageError(f"{label} has no video stream ({kinds}): pass a file with video")
    stream = streams[0]
    stream.thread_type = "AUTO"
    return stream


def _check(container, stream, label: str, limits: VideoLimits, sampling: str) -> tuple[float, int]:
    """(duration in seconds, estimated frame count), after refusing what is over the limits."""
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise ImageError(f"{label} has a video stream without a frame size: re-encode it")
    if width * height > limits.max_pixels:
        raise ImageError(
            f"{label} is {width}x{height} = {width * height:,} pixels a frame, over the limit of "
            f"{limits.max_pixels:,}: downscale the clip first"
        )
    duration = 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    if duration > limits.max_duration_s:
        raise ImageError(
            f"{label} lasts {duration:,.0f} s, over the limit of {limits.max_duration_s:,.0f} s: cut the clip first"
        )
    rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    count = int(stream.frames) or round(duration * rate)
    if sampling == "scenes" and count > limits.max_scanned_frames:
        raise ImageError(
            f"{label} has about {count:,} frames; finding scenes reads every frame and the limit is "
            f"{limits.max_scanned_frames:,}: use frame_sampling='uniform' or cut the clip"
        )
    return duration, count


def _frame(frame, stream) -> Image.Image:
    image = frame.to_image()  # RGB
    image.info[TIMESTAMP] = round(float(frame.time if frame.time is not None else 0.0), 3)
    return image


def _decoded(container, stream) -> Iterator[Any]:
    yield from container.decode(stream)


def _uniform(container, stream, max_frames: int, duration: float, count: int) -> list[Image.Image]:
    """Evenly spaced frames: seek to each target time and take the first frame at or after it."""
    if (count and count <= max_frames * 2) or duration <= 0:  # short clips: decoding them whole is cheapest
        frames = list(_decoded(container, stream))
        keep = np.unique(np.rint(np.linspace(0, len(frames) - 1, min(max_frames, len(frames)))).astype(int))
        return [_frame(frames[i], stream) for i in keep] if frames else []
    targets = [duration * (i + 0.5) / max_frames for i in range(max_frames)]
    out: list[Image.Image] = []
    for target in targets:
        container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
        chosen = None
        for frame in _decoded(container, stream):
            chosen = frame
            if frame.time is not None and frame.time >= target - 1e-6:
                break
        if chosen is not None and (not out or out[-1].info[TIMESTAMP] < round(float(chosen.time or 0), 3)):
            out.append(_frame(chosen, stream))
    return out


def _scenes(container, stream, max_frames: int, duration: float) -> list[Image.Image]:
    """The first frame of each shot (every frame is compared with the one before as a grey thumbnail)."""
    kept: dict[int, Any] = {}
    scores: list[float] = []
    times: list[float] = []
    previous = None
    for index, frame in enumerate(_decoded(container, stream)):
        thumb = frame.reformat(width=_SCENE_SIZE, height=_SCENE_SIZE, format="gray").to_ndarray().astype(np.float32)
        diff = float(np.abs(thumb - previous).mean()) if previous is not None else float("inf")
        previous = thumb
        scores.append(diff)
        times.append(float(frame.time or 0.0))
        if index == 0 or diff > 0:
            kept[index] = frame.to_image()  # candidates only; thinned below
        if len(kept) > 4 * max_frames + 64:  # bound memory: keep the strongest changes so far
            strongest = sorted(kept, key=lambda i: -scores[i])[: 2 * max_frames]
            kept = {i: kept[i] for i in sorted(strongest)}
    if not scores:
        return []
    finite = np.array([s for s in scores[1:]] or [0.0])
    threshold = max(12.0, float(finite.mean() + 3 * finite.std()))
    cuts = [i for i in kept if i == 0 or scores[i] >= threshold]
    if len(cuts) > max_frames:  # thin: the first frame and the strongest cuts
        cuts = [0, *sorted(sorted((i for i in cuts if i), key=lambda i: -scores[i])[: max_frames - 1])]
    elif len(cuts) < max_frames:  # top up with the kept frames farthest in time from those chosen
        for i in sorted(kept, key=lambda i: -min(abs(times[i] - times[c]) for c in cuts)):
            if len(cuts) >= max_frames:
                break
            if i not in cuts:
                cuts.append(i)
    out = []
    for i in sorted(cuts):
        image = kept[i]
        image.info[TIMESTAMP] = round(times[i], 3)
        out.append(image)
    return out
