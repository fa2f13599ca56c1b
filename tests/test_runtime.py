"""The runtime on the tiny model with the real onnxruntime-genai: inputs, outputs, options, chat, errors, memory."""

from __future__ import annotations

import gc
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import phi_onnx
from phi_onnx import _og
from phi_onnx.errors import ContextLengthError, ImageError, ModelError, OptionsError, PromptError, ProviderError
from phi_onnx.preprocess import image_token_count
from phi_onnx_export.verify import test_image as make_image

EXPECTED_600x400 = {16: 1921, 4: 757}


def text_ids_without_images(model, prompt: str) -> list[int]:
    return model.prepare(prompt).inputs["input_ids"][0].tolist()


def test_text_only(tiny_model):
    result = tiny_model.generate("Hello there", max_new_tokens=6)
    assert result.image_tokens == 0
    assert result.generated_tokens == 6
    assert result.finish_reason == "length"
    assert result.text.strip()
    assert result.prompt_tokens == len(text_ids_without_images(tiny_model, "Hello there"))


def test_one_image_uses_16_crops(tiny_model, example_image):
    result = tiny_model.generate("Describe this image.", images=[example_image], max_new_tokens=4)
    assert result.image_tokens == EXPECTED_600x400[16]
    assert result.num_crops == 16
    assert result.time_to_first_token_ms >= result.preprocess_ms > 0


def test_three_images_use_4_crops_each(tiny_model):
    images = [make_image(600, 400, 0), make_image(1000, 100, 1), make_image(200, 1000, 2)]
    result = tiny_model.generate("Compare these.", images=images, max_new_tokens=4)
    assert result.num_crops == 4
    assert result.image_tokens == sum(image_token_count(*im.size, 4) for im in images)


@pytest.mark.parametrize("num_crops", [4, 16])
def test_num_crops_sets_token_counts_and_generates(tiny_model, example_image, num_crops):
    prepared = tiny_model.prepare(
        "What is this?", [example_image], options=tiny_model.options.updated(num_crops=num_crops)
    )
    assert prepared.image_tokens == EXPECTED_600x400[num_crops]
    assert prepared.inputs["pixel_values"].shape == (1, num_crops + 1, 3, 336, 336)
    result = tiny_model.generate("What is this?", images=[example_image], num_crops=num_crops, max_new_tokens=3)
    assert result.image_tokens == EXPECTED_600x400[num_crops]
    assert result.generated_tokens == 3


def test_images_change_the_answer(tiny_model):
    a = tiny_model.generate("What is this?", images=[make_image(600, 400, 0)], max_new_tokens=8)
    b = tiny_model.generate("What is this?", images=[Image.new("RGB", (600, 400), "black")], max_new_tokens=8)
    assert a.token_ids != b.token_ids


def test_stream_text_equals_generate_text(tiny_model, example_image):
    chunks = list(tiny_model.stream("Describe it.", images=[example_image], max_new_tokens=12))
    result = tiny_model.generate("Describe it.", images=[example_image], max_new_tokens=12)
    assert "".join(c.text for c in chunks) == result.text
    assert [c.generated_tokens for c in chunks[:3]] == [1, 2, 3]
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].decode_tokens_per_s > 0
    assert all(c.time_to_first_token_ms == chunks[0].time_to_first_token_ms for c in chunks)


def test_greedy_is_deterministic_and_seeded_sampling_repeats(tiny_model):
    g1 = tiny_model.generate("Tell me a story", max_new_tokens=10)
    g2 = tiny_model.generate("Tell me a story", max_new_tokens=10)
    assert g1.text == g2.text
    s1 = tiny_model.generate("Tell me a story", max_new_tokens=10, temperature=5.0, seed=7)
    s2 = tiny_model.generate("Tell me a story", max_new_tokens=10, temperature=5.0, seed=7)
    others = {
        tiny_model.generate("Tell me a story", max_new_tokens=10, temperature=5.0, seed=s).text for s in (1, 2, 3)
    }
    assert s1.text == s2.text
    assert len(others | {s1.text}) > 1, "different seeds should not all give the same sample"


def test_stop_strings_cut_the_text(tiny_model):
    full = tiny_model.generate("Tell me a story", max_new_tokens=12)
    words = full.text.split()
    stop = words[2]
    cut = tiny_model.generate("Tell me a story", max_new_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert full.text.startswith(cut.text)


def test_messages_and_prompt_agree(tiny_model, example_image):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": str(example_image)}},
                {"type": "text", "text": "Describe it."},
            ],
        }
    ]
    a = tiny_model.prepare(messages=messages)
    b = tiny_model.prepare("Describe it.", [example_image])
    np.testing.assert_array_equal(a.inputs["input_ids"], b.inputs["input_ids"])
    np.testing.assert_array_equal(a.inputs["pixel_values"], b.inputs["pixel_values"])


def test_chat_keeps_images_across_turns(tiny_model):
    first, second = make_image(600, 400, 0), make_image(400, 600, 1)
    chat = tiny_model.chat(max_new_tokens=4)
    t1 = chat.send("What is in this picture?", images=[first])
    assert t1.image_tokens == image_token_count(600, 400, 16)
    t2 = chat.send("And its colour?")
    assert t2.image_tokens == t1.image_tokens, "turn 2 still sees turn 1's image"
    assert t2.prompt_tokens > t1.prompt_tokens
    t3 = chat.send("Compare with this one.", images=[second])
    # Each image keeps the crops it was first sent with: the first stays at 16, the newcomer gets 4.
    assert t3.image_tokens == image_token_count(600, 400, 16) + image_token_count(400, 600, 4)
    prompt = tiny_model.prepare(messages=[*chat.messages[:-2], chat.messages[-2]]).prompt
    assert prompt.count("<|image_1|>") == 1 and prompt.count("<|image_2|>") == 1
    assert prompt.index("<|image_1|>") < prompt.index("And its colour?") < prompt.index("<|image_2|>")
    assert prompt.count("<|assistant|>") == 3
    chat.reset()
    assert chat.send("Hi").image_tokens == 0


def test_chat_turn_joins_history_only_when_complete(tiny_model):
    chat = tiny_model.chat(max_new_tokens=5)
    stream = chat.stream("Hello")
    next(stream)
    stream.close()
    assert chat.messages == []


def test_our_preprocessing_matches_onnxruntime_genai_processor(tiny_model):
    """With num_crops=16, our pixel_values, image_sizes and ids equal og.MultiModalProcessor's.

    Tolerance: local crops and padding are bit-identical in principle (same bilinear resize, white pad, CLIP
    normalisation); we allow 2e-2 for rounding inside the resampler. The global 336x336 image differs by design:
    we follow the Hugging Face processor (torch bicubic, no antialias), onnxruntime-extensions uses Pillow's antialiased
    bicubic. On a smooth photo-like image the two agree to a small mean difference, checked separately.
    """
    img = make_image(600, 400, 0)
    og_ids = phi_onnx.load(tiny_model.folder, device="cpu", token_ids="onnxruntime-genai")  # og's convention: no BOS
    prepared = og_ids.prepare("What is shown?", [img], options=og_ids.options.updated(num_crops=16))
    ours = prepared.inputs
    theirs = _og.processor_inputs(og_ids._model, prepared.prompt, [_og.png_bytes(img)])
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["image_sizes"], theirs["image_sizes"])
    np.testing.assert_array_equal(ours["num_image_tokens"], theirs["num_image_tokens"])
    a, b = ours["pixel_values"], theirs["pixel_values"]
    assert a.shape == b.shape == (1, 17, 3, 336, 336)
    np.testing.assert_allclose(a[:, 1:], b[:, 1:], atol=2e-2)
    assert float(np.abs(a[:, 0] - b[:, 0]).mean()) < 0.05


def test_og_processor_fallback_generates(tiny_model_dir, example_image):
    model = phi_onnx.load(tiny_model_dir, device="cpu", preprocessor="onnxruntime-genai")
    result = model.generate("What is this?", images=[example_image], max_new_tokens=3)
    assert result.image_tokens == EXPECTED_600x400[16], "og's processor always cuts 16 crops"
    with pytest.raises(OptionsError, match="always cuts 16 crops"):  # never ignored silently
        model.generate("What is this?", images=[example_image], num_crops=4, max_new_tokens=3)


def test_image_inputs_of_every_kind(tiny_model, example_image):
    raw = example_image.read_bytes()
    pil = Image.open(example_image)
    arr = np.asarray(pil.convert("RGB"))
    import base64

    url = "data:image/jpeg;base64," + base64.b64encode(raw).decode()
    ids = [tiny_model.prepare("x", [src]).inputs["input_ids"] for src in (str(example_image), raw, pil, arr, url)]
    for other in ids[1:]:
        np.testing.assert_array_equal(ids[0], other)


def test_animated_gif_becomes_frames(tiny_model, tmp_path):
    frames = [make_image(320, 240, i) for i in range(3)]
    path = tmp_path / "clip.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    prepared = tiny_model.prepare("What happens?", [path])
    assert prepared.inputs["pixel_values"].shape[0] == 3
    assert prepared.num_crops == 4
    assert "<|image_3|>" in prepared.prompt


def test_options_validation():
    with pytest.raises(OptionsError, match="unknown option 'max_tokens': did you mean 'max_new_tokens'"):
        phi_onnx.GenerationOptions.from_mapping({"max_tokens": 3})
    with pytest.raises(OptionsError, match=r"top_p is 0.0, outside its range \(0, 1\]"):
        phi_onnx.GenerationOptions(top_p=0)
    with pytest.raises(OptionsError, match="max_new_tokens must be a whole number"):
        phi_onnx.GenerationOptions(max_new_tokens=2.5)
    with pytest.raises(OptionsError, match="num_crops is 0"):
        phi_onnx.GenerationOptions(num_crops=0)
    with pytest.raises(OptionsError, match="min_new_tokens"):
        phi_onnx.GenerationOptions(max_new_tokens=2, min_new_tokens=5)
    opts = phi_onnx.GenerationOptions(max_new_tokens=7)
    search = opts.search_options(prompt_tokens=100, context_length=4096)
    assert search["max_length"] == 107, "max_length is prompt + new tokens, never the 128k default"
    assert search["do_sample"] is False


def test_unknown_option_in_generate(tiny_model):
    with pytest.raises(OptionsError, match="unknown option 'temprature': did you mean 'temperature'"):
        tiny_model.generate("hi", temprature=0.5)


def test_min_new_tokens_fixes_the_length(tiny_model):
    result = tiny_model.generate("hi", max_new_tokens=20, min_new_tokens=20)
    assert result.generated_tokens == 20


@pytest.mark.parametrize(
    ("prompt", "count", "message"),
    [
        ("<|image_1|>\n<|image_1|>\nx", 2, "appears twice"),
        ("<|image_1|>\n<|image_3|>\nx", 2, r"<\|image_3\|>"),
        ("<|image_2|>\n<|image_1|>\nx", 2, "order"),
        ("<|image_1|>\nx", 0, r"<\|image_1\|>"),
    ],
    ids=["repeated", "too-high", "out-of-order", "tag-without-image"],
)
def test_tags_that_do_not_match_images(tiny_model, prompt, count, message):
    images = [make_image(100, 100, i) for i in range(count)]
    with pytest.raises(PromptError, match=message):
        tiny_model.generate(prompt, images=images, max_new_tokens=2)


def test_context_overflow_gives_the_numbers(tiny_model_dir, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(tiny_model_dir, small)
    cfg = json.loads((small / "genai_config.json").read_text())
    cfg["model"]["context_length"] = 2048
    (small / "genai_config.json").write_text(json.dumps(cfg))
    model = phi_onnx.load(small, device="cpu")
    with pytest.raises(
        ContextLengthError, match=r"prompt is 1,9\d\d tokens, max_new_tokens 256, context 2,048: .*num_crops"
    ):
        model.generate("x", images=[make_image(600, 400, 0)])
    assert model.generate("x", images=[make_image(600, 400, 0)], num_crops=4, max_new_tokens=2).generated_tokens == 2


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("missing.jpg", None, "does not exist"), ("empty.png", b"", "empty"), ("notes.png", b"just text", "not an image")],
    ids=["missing", "empty", "text-file"],
)
def test_bad_images_name_the_file(tiny_model, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as err:
        tiny_model.generate("x", images=[path])
    assert path.name in str(err.value)


def test_truncated_image_is_refused(tiny_model, tmp_path):
    buf = io.BytesIO()
    make_image(600, 400, 0).save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(ImageError, match=r"cut\.jpg"):
        tiny_model.generate("x", images=[path])


def test_not_a_phi3v_folder(tiny_model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "genai_config.json").read_text())
    cfg["model"]["type"] = "phi3"
    (other / "genai_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="not 'phi3v'"):
        phi_onnx.load(other, device="cpu")


def test_unavailable_provider_names_what_to_install(tiny_model_dir):
    if _og.provider_status()["cuda"] is None:
        pytest.skip("this machine has a usable CUDA device")
    with pytest.raises(ProviderError, match=r"device 'cuda' is not available \(.*\); available here: cpu"):
        phi_onnx.load(tiny_model_dir, device="cuda")
    assert phi_onnx.load(tiny_model_dir, device="auto").device == "cpu"


def test_threads_default_to_all_cores(tiny_model, tiny_model_dir):
    assert tiny_model.threads == _og.default_threads()
    overlay = _og.session_overlay("cpu", None)
    for graph in ("decoder", "vision", "embedding"):  # every session, not only the decoder
        assert overlay["model"][graph]["session_options"]["intra_op_num_threads"] == _og.default_threads()
    assert _og.session_overlay("cpu", 1)["model"]["vision"]["session_options"]["intra_op_num_threads"] == 1
    assert _og.session_overlay("cuda", None) == {}
    # og replaces a graph's session_options as a whole: the folder's own (the kernels' library too) are carried over
    folder = tiny_model.info.config["model"]
    carried = _og.session_overlay("cpu", 1, tiny_model.info.config)["model"]
    for graph in ("decoder", "vision", "embedding"):
        assert carried[graph]["session_options"] == {**folder[graph]["session_options"], **_og.cpu_session_options(1)}
    assert (
        "custom_ops_library" in carried["vision"]["session_options"]
        or not (tiny_model_dir / "phi_onnx_ops.so").exists()
    )
    one = phi_onnx.load(tiny_model_dir, device="cpu", threads=1)  # onnxruntime-genai accepts the overlay
    assert one.threads == 1
    assert one.generate("Hi", max_new_tokens=2).generated_tokens == 2


def test_no_memory_growth_over_100_generations(tiny_model, example_image):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    img = Image.open(example_image).convert("RGB").resize((336, 336))
    for _ in range(10):  # warm-up: arenas and caches reach their steady size
        tiny_model.generate("Describe.", images=[img], max_new_tokens=4, num_crops=1)
    gc.collect()
    base = proc.memory_info().rss
    for _ in range(100):
        tiny_model.generate("Describe.", images=[img], max_new_tokens=4, num_crops=1)
    gc.collect()
    growth = (proc.memory_info().rss - base) / base
    assert growth < 0.05, f"RSS grew {growth:.1%} over 100 generations"


@pytest.mark.parametrize("vision", ["phi-onnx", "onnxruntime-genai"])
def test_chat_history_images_are_preprocessed_once(tiny_model, tiny_model_dir, monkeypatch, vision):
    import phi_onnx.preprocess

    calls = []
    real = phi_onnx.preprocess.preprocess_images

    def counting(images, num_crops, **kw):
        calls.append((len(images), num_crops))
        return real(images, num_crops, **kw)

    monkeypatch.setattr(phi_onnx.preprocess, "preprocess_images", counting)
    model = tiny_model if vision == "phi-onnx" else phi_onnx.load(tiny_model_dir, device="cpu", vision=vision)
    chat = model.chat(max_new_tokens=2)
    first = chat.send("What is it?", images=[make_image(500, 300, 5)])
    second = chat.send("Again?")
    assert calls == [(1, 16)], "turn 2 reuses turn 1's HD transform"
    assert second.image_tokens == first.image_tokens
    chat.send("And this?", images=[make_image(300, 500, 6)])
    assert calls[1:] == [(1, 4)], "only the new image is transformed; the first keeps its 16 crops"


def test_stream_checks_inputs_before_returning(tiny_model):
    with pytest.raises(ImageError):
        tiny_model.stream("x", images=["/no/such/image.png"])  # raises at the call, not at the first next()


def test_generate_reports_num_crops_for_messages(tiny_model, example_image):
    content = [{"type": "image", "image": str(example_image)}, {"type": "text", "text": "Describe."}]
    messages = [{"role": "user", "content": content}]
    assert tiny_model.generate(messages=messages, max_new_tokens=2).num_crops == 16
    assert tiny_model.generate("Hi", max_new_tokens=2).num_crops is None


def test_plain_calls_retain_no_preprocessed_images(tiny_model_dir, example_image):
    # The HD transform cache serves the vision graph run inside og; phi-onnx's own vision session caches features.
    tiny_model = phi_onnx.load(tiny_model_dir, device="cpu", vision="onnxruntime-genai")
    tiny_model._pre_cache.clear()
    tiny_model.generate("What is it?", images=[example_image], max_new_tokens=1)
    assert len(tiny_model._pre_cache) == 0
    chat = tiny_model.chat(max_new_tokens=1)
    chat.send("What is it?", images=[make_image(300, 200, 9)])
    assert len(tiny_model._pre_cache) == 1
    chat.reset()
    gc.collect()
    tiny_model.generate("x", images=[make_image(100, 100, 1)], max_new_tokens=1)  # any later call purges
    assert len(tiny_model._pre_cache) == 0, "an entry goes when its conversation image does"


def test_threads_can_share_one_model(tiny_model, example_image):
    """Concurrent requests on one loaded model (as a server makes them) give the answers sequential calls give."""
    import threading

    prompts = [f"Question {i}: what is shown?" for i in range(4)]
    want = [tiny_model.generate(p, images=[example_image], num_crops=1, max_new_tokens=6).text for p in prompts]
    got: list[str | None] = [None] * len(prompts)

    def work(i: int) -> None:
        got[i] = tiny_model.generate(prompts[i], images=[example_image], num_crops=1, max_new_tokens=6).text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want


def test_weight_file_pages_are_given_back_and_answers_do_not_change(tiny_model, example_image):
    """onnxruntime keeps the weight files mapped after packing them; phi_onnx.memory gives their resident pages back
    at load. Pages read again later come back from the file, so generation is unchanged."""
    from phi_onnx.memory import _weight_regions, release_mapped_weights

    def resident() -> int:
        files = {str(p.resolve()) for p in tiny_model.folder.iterdir() if p.name.endswith(".data")}
        with open("/proc/self/smaps", encoding="utf-8") as smaps:
            return sum(size for *_, size in _weight_regions(smaps, files))

    ask = {"images": [example_image], "max_new_tokens": 8}
    first = tiny_model.generate("Describe.", **ask).token_ids
    assert resident() > 0  # the prompt pass read some weight pages again (the embedding rows, at least)
    assert release_mapped_weights(tiny_model.folder) > 0 and resident() == 0
    assert tiny_model.generate("Describe.", **ask).token_ids == first


def test_load_gives_the_weight_pages_back(tiny_model_dir, monkeypatch):
    """phi_onnx.load hands the folder to release_mapped_weights once its sessions exist (the tiny model's weights leave
    no pages behind at load, so the call itself is what is checked here; the release is checked above)."""
    import phi_onnx.model as model_module

    seen = []
    monkeypatch.setattr(model_module, "release_mapped_weights", lambda folder: seen.append(folder) or 123)
    loaded = phi_onnx.load(tiny_model_dir, device="cpu")
    assert seen == [loaded.folder] and loaded.released_bytes == 123
