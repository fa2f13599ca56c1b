"""Video files as input: clips made here with PyAV (moving shapes, scene cuts, odd sizes, variable frame rate)."""

from __future__ import annotations

import fractions
import subprocess
import sys

import numpy as np
import pytest

from phi_onnx import ImageError, OptionsError
from phi_onnx.preprocess import image_token_count
from phi_onnx.video import TIMESTAMP, VideoLimits, is_video, load_video

av = pytest.importorskip("av")  # the `video` extra; installed by the test extra, so this runs in CI
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def make_clip(path, *, size=(160, 120), seconds=4.0, fps=10, cuts=(), codec="mpeg4", vfr=False):
    """A clip whose background colour changes at each time in ``cuts`` (integer milliseconds, so cuts are exact)."""
    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        ms = 0
        for i in range(int(seconds * fps)):
            img = np.zeros((h, w, 3), np.uint8)
            img[:] = COLOURS[sum(ms >= c * 1000 for c in cuts) % len(COLOURS)]
            x = (i * 7) % max(w - 20, 1)
            img[h // 3 : h // 3 + 20, x : x + 20] = 255  # a moving square
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = ms, fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
            step = 1000 // fps
            ms += step // 2 if vfr and i % 2 else step * 3 // 2 if vfr else step
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {
        "mp4": make_clip(d / "cuts.mp4", seconds=6, cuts=(2.0, 4.0)),
        "mkv": make_clip(d / "odd.mkv", size=(161, 121), codec="ffv1", seconds=3, cuts=(1.5,)),
        "vfr": make_clip(d / "vfr.mp4", seconds=5, vfr=True, cuts=(2.5,)),
        "webm": make_clip(d / "clip.webm", codec="libvpx", seconds=2),
        "mov": make_clip(d / "clip.mov", seconds=2),
        "avi": make_clip(d / "clip.avi", seconds=2),
    }


def times(frames) -> list[float]:
    return [f.info[TIMESTAMP] for f in frames]


def test_uniform_frames_cover_the_clip_in_order(clips):
    frames = load_video(clips["mp4"], max_frames=4)
    assert len(frames) == 4 and times(frames) == sorted(times(frames))
    assert times(frames)[0] < 1.5 and times(frames)[-1] > 4.5, times(frames)
    assert all(f.mode == "RGB" and f.size == (160, 120) for f in frames)


def test_scene_sampling_picks_the_cuts(clips):
    frames = load_video(clips["mp4"], max_frames=3, sampling="scenes")
    assert times(frames) == [0.0, 2.0, 4.0]
    colours = [tuple(np.asarray(f)[5, 5] // 50) for f in frames]
    assert len(set(colours)) == 3, "one frame from each shot"
    vfr = load_video(clips["vfr"], max_frames=2, sampling="scenes")
    assert times(vfr)[0] == 0.0 and 2.4 < times(vfr)[1] < 2.7, times(vfr)


def test_scenes_are_topped_up_and_thinned_to_max_frames(clips):
    assert len(load_video(clips["mp4"], max_frames=6, sampling="scenes")) == 6
    assert times(load_video(clips["mp4"], max_frames=2, sampling="scenes"))[0] == 0.0
    assert len(load_video(clips["mp4"], max_frames=2, sampling="scenes")) == 2


@pytest.mark.parametrize("kind", ["mkv", "webm", "mov", "avi", "vfr"])
def test_every_container_decodes(clips, kind):
    frames = load_video(clips[kind], max_frames=3)
    assert 1 <= len(frames) <= 3 and times(frames) == sorted(times(frames))
    if kind == "mkv":
        assert frames[0].size == (161, 121), "odd sizes are kept"


def test_video_bytes_and_detection(clips):
    data = clips["mp4"].read_bytes()
    assert is_video(data) and is_video(clips["mkv"]) and not is_video(b"\x89PNG\r\n\x1a\n....")
    assert times(load_video(data, max_frames=2)) == times(load_video(clips["mp4"], max_frames=2))


def test_limits_are_checked_before_decoding(clips):
    with pytest.raises(ImageError, match=r"lasts 6 s, over the limit of 1 s: cut the clip first"):
        load_video(clips["mp4"], limits=VideoLimits(max_duration_s=1))
    with pytest.raises(ImageError, match=r"160x120 = 19,200 pixels a frame, over the limit of 1,000"):
        load_video(clips["mp4"], limits=VideoLimits(max_pixels=1000))
    with pytest.raises(ImageError, match="finding scenes reads every frame"):
        load_video(clips["mp4"], sampling="scenes", limits=VideoLimits(max_scanned_frames=10))
    with pytest.raises(OptionsError, match="unknown frame_sampling 'shots'"):
        load_video(clips["mp4"], sampling="shots")


def test_corrupt_truncated_and_audio_only_files_are_image_errors(clips, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(ImageError, match=r"bad.mp4' is not a readable video"):
        load_video(bad)
    truncated = tmp_path / "trunc.mp4"
    truncated.write_bytes(clips["mp4"].read_bytes()[:3000])
    with pytest.raises(ImageError, match=r"trunc\.mp4"):
        load_video(truncated)
    audio = tmp_path / "audio.mkv"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    with pytest.raises(ImageError, match=r"audio.mkv' has no video stream \(audio\)"):
        load_video(audio)
    with pytest.raises(ImageError, match="does not exist"):
        load_video(tmp_path / "missing.mp4")


def test_a_clip_in_a_prompt_costs_frames_times_per_frame_tokens(tiny_model_dir, clips):
    import phi_onnx

    model = phi_onnx.load(tiny_model_dir, device="cpu", max_frames=4, frame_times=True)
    result = model.generate("Summarise this clip.", images=[clips["mp4"]], max_new_tokens=3)
    assert len(result.frame_times) == 4 and result.num_crops == 4
    assert result.image_tokens == 4 * image_token_count(160, 120, 4)
    prompt = model.prepare("Summarise this clip.", [clips["mp4"]]).prompt
    assert "[0:00.8] <|image_1|>" in prompt, prompt[:120]
    content = [{"type": "image_url", "image_url": {"url": str(clips["mkv"])}}, {"type": "text", "text": "What?"}]
    assert len(model.generate(messages=[{"role": "user", "content": content}], max_new_tokens=2).frame_times) == 4


def test_cli_prints_the_frames_used(tiny_model_dir, clips):
    done = subprocess.run(
        [sys.executable, "-m", "phi_onnx", "run", str(tiny_model_dir), "-i", str(clips["mp4"]), "--max-frames", "3",
         "--frame-sampling", "scenes", "Summarise this clip", "--max-new-tokens", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "[video: 3 frames, at 0, 2, 4 s]" in done.stderr
