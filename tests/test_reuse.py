"""Never encode the same thing twice: image feature cache, conversation KV reuse, prefix reuse for stateless callers.

Parity: every reuse path is compared with a fresh generator in which onnxruntime-genai runs the real vision graph
itself, fed exactly the ids the reused generator holds: greedy tokens identical, fp32 logits within 1e-4. Where the
request's own tokenisation is known to match, the held ids are also checked against a fresh tokenisation.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import phi_onnx
from phi_onnx import _og
from phi_onnx.errors import OptionsError
from phi_onnx.passthrough import passthrough_model
from phi_onnx.preprocess import image_token_count

TOL = 1e-4
NEW = 6
CLI_OPTS = ("--max-new-tokens", "4", "--device", "cpu")


@pytest.fixture(scope="module")
def reuse_model(tiny_model_dir):
    model = phi_onnx.load(tiny_model_dir, device="cpu", options={"max_new_tokens": NEW})
    model._probe = {}
    return model


@pytest.fixture(scope="module")
def fresh_model(tiny_model_dir):
    """The reference: og runs the vision graph, nothing is cached or kept."""
    return phi_onnx.load(tiny_model_dir, device="cpu", vision="onnxruntime-genai", kv_pool=0, image_cache_mb=0)


TURNS = [("Describe it.", [0]), ("What colour is it?", []), ("And this one?", [1]), ("Why?", [])]


@pytest.fixture(scope="module")
def eos_model_dir(tiny_model_dir, tmp_path_factory, images):
    """The tiny model with a share of its ordinary tokens declared end-of-sequence, so its random answers end the way
    real ones do (og stops at an EOS id by itself) after a few tokens. Which share (every m-th id, from the r-th): the
    first whose 4-turn chat of the test below ends every answer with EOS after at least one token, so the fixture holds
    whatever the random weights are (their answers cycle through a handful of tokens)."""
    config = json.loads((tiny_model_dir / "genai_config.json").read_text())
    base = list(config["model"]["eos_token_id"])
    for m, r in ((every, start) for every in (3, 2, 4, 5) for start in range(every)):
        folder = tmp_path_factory.mktemp(f"tiny-eos-{m}-{r}")
        for item in tiny_model_dir.iterdir():
            if item.name != "genai_config.json":
                os.symlink(item, folder / item.name)
        config["model"]["eos_token_id"] = [*base, *(i for i in range(300, 32000) if i % m == r)]
        (folder / "genai_config.json").write_text(json.dumps(config))
        chat = phi_onnx.load(folder, device="cpu", options={"max_new_tokens": NEW}).chat()
        answers = [chat.send(text, images=[images[i] for i in imgs]) for text, imgs in TURNS]
        if all(a.finish_reason == "stop" and a.token_ids for a in answers):
            return folder
    pytest.fail("no share of the vocabulary ends every answer of the tiny model's 4-turn chat: widen the search")


@pytest.fixture(scope="module")
def images(example_image):
    base = Image.open(example_image).convert("RGB")
    return [base, base.rotate(90, expand=True), base.resize((200, 500))]


def _user(text, imgs=()):
    return {"role": "user", "content": [*({"type": "image", "image": i} for i in imgs), {"type": "text", "text": text}]}


def _fresh_run(fresh, ids: list[int], messages, steps: int):
    """Greedy tokens and logits of a fresh og generator (og runs the vision graph) fed ``ids`` and the images."""
    prepared = fresh.prepare(messages=messages, options=phi_onnx.GenerationOptions(max_new_tokens=steps))
    inputs = dict(prepared.inputs)
    inputs["input_ids"] = np.asarray([ids], dtype=np.int32)
    gen = _og.LiveGenerator(fresh._model, {"max_length": len(ids) + steps, "do_sample": False, "top_k": 1})
    gen.probe = []
    gen.start(inputs)
    tokens = [t for _, t in zip(range(steps), gen.tokens(), strict=False)]
    return tokens, gen.probe


def _check_parity(model, fresh, result, messages):
    ids, logits = model._probe["ids"], model._probe["logits"]
    tokens, ref_logits = _fresh_run(fresh, ids, messages, len(logits))  # an EOS-ended answer's last step included
    assert list(result.token_ids) == tokens[: len(result.token_ids)]
    worst = max(float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits, strict=True))
    assert worst < TOL, worst
    return ids


def test_passthrough_graph_is_valid_onnx_and_identity():
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort

    for dtype, np_dtype in (("float32", np.float32), ("float16", np.float16)):
        data = passthrough_model(dtype, 64)
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((7, 64)).astype(np_dtype)
        out = session.run(None, {"pixel_values": x, "image_sizes": np.zeros((1, 2), np.int64)})[0]
        assert out.dtype == np_dtype and np.array_equal(out, x)


def test_model_folder_is_not_modified(reuse_model, tiny_model_dir):
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert not any("passthrough" in n for n in names)
    assert reuse_model._vision is not None


@pytest.mark.parametrize("count", [0, 1, 3])
def test_cached_features_match_og_vision(reuse_model, fresh_model, images, count):
    imgs = images[:count]
    reuse_model._vision.cache.clear()
    messages = [_user("Describe the pictures.", imgs)]
    reuse_model.sessions.clear()
    first = reuse_model.generate(messages=messages)
    ids = _check_parity(reuse_model, fresh_model, first, messages)
    assert ids == fresh_model.prepare(messages=messages).inputs["input_ids"][0].tolist()
    assert first.image_cache_hits == 0 and (first.vision_ms > 0) == (count > 0)
    reuse_model.sessions.clear()  # a new call, not a continuation: features from the cache
    second = reuse_model.generate(messages=messages)
    _check_parity(reuse_model, fresh_model, second, messages)
    assert second.image_cache_hits == count and second.vision_ms == 0 and second.cached_tokens == 0
    assert second.token_ids == first.token_ids


def test_feature_cache_keys_on_pixels_and_crops(reuse_model, example_image, tmp_path):
    cache = reuse_model._vision.cache
    cache.clear()
    reuse_model.generate("What is it?", images=[example_image], num_crops=4)
    png = tmp_path / "same-pixels.png"
    Image.open(example_image).convert("RGB").save(png)  # other file, other format, same decoded pixels
    again = reuse_model.generate("What is it?", images=[png], num_crops=4)
    assert again.image_cache_hits == 1 and again.vision_ms == 0
    other = reuse_model.generate("What is it?", images=[png], num_crops=2)
    assert other.image_cache_hits == 0 and other.vision_ms > 0
    edited = Image.open(png).convert("RGB")
    edited.putpixel((0, 0), (1, 2, 3))
    assert reuse_model.generate("What is it?", images=[edited], num_crops=4).image_cache_hits == 0


def test_feature_cache_is_bounded_lru(tiny_model_dir, images):
    model = phi_onnx.load(tiny_model_dir, device="cpu", image_cache_mb=0.8, options={"max_new_tokens": 1})
    one = model.generate("a", images=[images[0]], num_crops=4)  # 757 tokens x 64 x 4 bytes = 0.19 MB each
    assert one.image_cache_hits == 0
    for img in images[1:]:
        model.generate("a", images=[img], num_crops=4)
    assert model._vision.cache.nbytes <= 0.8 * 2**20
    model.generate("a", images=[images[0]], num_crops=16)  # 1921 tokens: 0.49 MB, pushes out the oldest
    assert model._vision.cache.nbytes <= 0.8 * 2**20
    assert model.generate("a", images=[images[0]], num_crops=4).image_cache_hits == 0  # evicted
    assert model.generate("a", images=[images[0]], num_crops=16).image_cache_hits == 1


@pytest.mark.parametrize("eos", [False, True], ids=["length-ended", "eos-ended"])
def test_four_turn_chat_appends_and_matches_fresh(reuse_model, fresh_model, eos_model_dir, images, eos):
    model = reuse_model
    if eos:
        model = phi_onnx.load(eos_model_dir, device="cpu", options={"max_new_tokens": NEW})
        model._probe = {}
    chat = model.chat()
    for number, (text, imgs) in enumerate(TURNS, start=1):
        result = chat.send(text, images=[images[i] for i in imgs])
        assert result.finish_reason == ("stop" if eos else "length")
        conversation = chat.messages[:-1]
        ids = _check_parity(model, fresh_model, result, conversation)
        if eos:  # the answers' ids re-tokenise exactly here: the held ids are a fresh tokenisation's
            assert ids == fresh_model.prepare(messages=conversation).inputs["input_ids"][0].tolist()
        if number in (2, 4):  # text follow-ups: only their own tokens are prefilled
            assert result.cached_tokens > 0 and result.vision_ms == 0
            assert result.prompt_tokens - result.cached_tokens < 30
        else:  # a turn with a new image encodes again, earlier images' features from the cache
            assert result.cached_tokens == 0
        if number == 3:
            assert result.image_cache_hits == 1
    # the first image kept its 16 crops when the second arrived (1921 tokens), the second got 4
    assert result.image_tokens == 1921 + image_token_count(*images[1].size, 4)


def test_stateless_messages_continue_a_recent_generation(reuse_model, fresh_model, images):
    reuse_model.sessions.clear()
    messages = [_user("What is this?", [images[0]])]
    first = reuse_model.generate(messages=messages)
    assert len(reuse_model.sessions) == 1
    messages += [{"role": "assistant", "content": first.text}, _user("Tell me more.")]
    second = reuse_model.generate(messages=messages)
    assert second.cached_tokens >= first.prompt_tokens and second.image_cache_hits == 1 and second.vision_ms == 0
    _check_parity(reuse_model, fresh_model, second, messages)
    # a different history (edited answer, or another image with the same placeholder ids) does not continue it
    edited = [messages[0], {"role": "assistant", "content": first.text + " no"}, messages[2]]
    assert reuse_model.generate(messages=edited).cached_tokens == 0
    other = [_user("What is this?", [images[0].transpose(Image.FLIP_LEFT_RIGHT)]), *messages[1:]]
    assert reuse_model.generate(messages=other).cached_tokens == 0


def _split_answer(model, live):
    """Make ``live`` hold its answer as other ids of the same text (one token split in two vocabulary pieces), as if
    the model had generated a tokenisation that re-tokenising its text does not give back."""
    vocab = json.loads((model.folder / "tokenizer.json").read_text())["model"]["vocab"]
    piece_of = {i: p for p, i in vocab.items()}
    start = live.answer_start
    answer = live.ids[start:]
    for n, token in enumerate(answer):
        piece = piece_of.get(token, "")
        cut = next((k for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab), None)
        if cut is not None:
            answer = [*answer[:n], vocab[piece[:cut]], vocab[piece[cut:]], *answer[n + 1 :]]
            break
    else:
        pytest.skip("no token of this answer splits into two vocabulary pieces")
    decode = model._tokenizer.decode
    assert decode(answer) == decode(live.ids[start:]) and answer != live.ids[start:]
    live.ids = [*live.ids[:start], *answer]


def test_an_answer_that_retokenises_differently(reuse_model, fresh_model):
    """Stateless callers: not continued, so the answer is exactly a fresh call's. A Chat: continued by the answer's
    text (the KV keeps the generated ids, the request's ids from <|end|> on are appended)."""
    reuse_model.sessions.clear()
    messages = [_user("Hello there.")]
    first = reuse_model.generate(messages=messages)
    _split_answer(reuse_model, next(iter(reuse_model.sessions._items.values())))
    follow = [*messages, {"role": "assistant", "content": first.text}, _user("Again.")]
    again = reuse_model.generate(messages=follow)
    assert again.cached_tokens == 0 and reuse_model.sessions.by_text == 0
    assert again.token_ids == fresh_model.generate(messages=follow, max_new_tokens=NEW).token_ids

    chat = reuse_model.chat()
    chat.send("Hello there.")
    _split_answer(reuse_model, next(iter(chat._live._items.values())))
    continued = chat.send("Again.")
    assert continued.cached_tokens > 0 and chat._live.by_text == 1
    # what the generator really holds is the generated ids, whatever ``live.ids`` said: parity on its sequence
    _check_parity(reuse_model, fresh_model, continued, chat.messages[:-1])


def test_one_generator_serves_one_continuation(tiny_model_dir):
    model = phi_onnx.load(tiny_model_dir, device="cpu", options={"max_new_tokens": NEW})
    messages = [_user("Hello there.")]
    first = model.generate(messages=messages)
    follow = [*messages, {"role": "assistant", "content": first.text}, _user("Again.")]
    continued = model.generate(messages=follow)
    model.sessions.clear()
    fresh = model.generate(messages=follow)
    assert continued.cached_tokens > 0 and fresh.cached_tokens == 0
    model.sessions.clear()
    model.generate(messages=messages)  # leaves one generator holding the first turn again
    results: list = []
    barrier = threading.Barrier(2)

    def ask():
        barrier.wait(timeout=30)
        results.append(model.generate(messages=follow))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2
    reused = [r for r in results if r.cached_tokens > 0]
    started = [r for r in results if r.cached_tokens == 0]
    assert len(reused) == 1 and len(started) == 1
    assert reused[0].token_ids == continued.token_ids and started[0].token_ids == fresh.token_ids


def test_stop_string_seed_and_guidance_are_not_kept(tiny_model_dir):
    model = phi_onnx.load(tiny_model_dir, device="cpu", options={"max_new_tokens": NEW})
    messages = [_user("Hello there.")]
    probe = model.generate(messages=messages)
    model.sessions.clear()
    stop = model._tokenizer.decode(list(probe.token_ids[2:3]))
    cut = model.generate(messages=messages, stop=[stop])
    assert cut.finish_reason == "stop" and len(model.sessions) == 0
    model.generate(messages=messages, temperature=0.7, seed=3)
    assert len(model.sessions) == 0
    model.generate(messages=messages, regex="[ab]{3}")
    assert len(model.sessions) == 0
    model.generate(messages=messages)
    follow = [*messages, {"role": "assistant", "content": probe.text}, _user("Again.")]
    guided = model.generate(messages=follow, regex="[ab]{3}")  # never continues an unconstrained generator
    assert guided.cached_tokens == 0 and guided.text in ("aaa", "aab", "aba", "abb", "baa", "bab", "bba", "bbb")
    assert len(model.sessions) == 1


def test_chat_after_a_constrained_turn_stays_correct(reuse_model, fresh_model):
    chat = reuse_model.chat()
    chat.send("Hello.")
    guided = chat.send("Pick.", regex="[ab]{3}")
    assert guided.cached_tokens == 0 and len(guided.text) == 3
    third = chat.send("Why?")  # continues turn 1's generator: turn 2 and 3 are prefilled as text
    assert third.cached_tokens > 0
    _check_parity(reuse_model, fresh_model, third, chat.messages[:-1])


def test_turn_that_does_not_fit_encodes_again(tiny_model_dir):
    model = phi_onnx.load(tiny_model_dir, device="cpu", kv_reserve=4, options={"max_new_tokens": NEW})
    chat = model.chat()
    chat.send("Hello there.")
    second = chat.send("A much longer follow-up question that cannot fit in four tokens of room.")
    assert second.cached_tokens == 0 and len(chat.messages) == 4
    assert chat.kv_bytes == model.kv_token_bytes * (second.prompt_tokens + NEW + 4)


def test_min_new_tokens_applies_to_appended_turns(eos_model_dir):
    model = phi_onnx.load(eos_model_dir, device="cpu", options={"max_new_tokens": NEW})
    chat = model.chat()
    assert chat.send("Hello there.").finish_reason == "stop"
    result = chat.send("Hello there.", min_new_tokens=NEW)
    assert result.cached_tokens > 0 and result.generated_tokens == NEW


def test_interrupted_turn_is_not_kept(reuse_model):
    chat = reuse_model.chat()
    stream = chat.stream("Hello.")
    next(stream)
    stream.close()
    assert chat.messages == [] and chat.kv_bytes == 0


def test_bad_reuse_options_are_one_line_errors(tiny_model_dir):
    for kw, word in (
        ({"vision": "gpu"}, "vision runner"),
        ({"image_cache_mb": -1}, "image_cache_mb"),
        ({"kv_reserve": 1.5}, "kv_reserve"),
        ({"kv_pool": -2}, "kv_pool"),
        ({"kv_pool_mb": float("nan")}, "kv_pool_mb"),
    ):
        with pytest.raises(OptionsError, match=word) as info:
            phi_onnx.load(tiny_model_dir, device="cpu", **kw)
        assert "\n" not in str(info.value)


def test_cli_chat_stats_show_cached_tokens(tiny_model_dir, example_image):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "phi_onnx", "chat", str(tiny_model_dir), "-i", str(example_image), *CLI_OPTS],
        input="Describe this image.\nWhat colour is it?\nAnd the shape?\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    stats = [line for line in (done.stdout + done.stderr).splitlines() if "prompt tokens" in line]
    assert len(stats) == 3, done.stderr
    assert ", 0 cached)" in stats[0] and all(", 0 cached)" not in s for s in stats[1:])
    assert "vision 0 ms" in stats[1] and "vision 0 ms" not in stats[0]


def test_an_unwritable_cache_dir_falls_back_to_og_vision(tiny_model_dir, tmp_path, monkeypatch, example_image):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PHI_ONNX_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="image features are not cached: the cache directory .* is not writable"):
        model = phi_onnx.load(tiny_model_dir, device="cpu")
    assert model._vision is None
    result = model.generate("What is it?", images=[example_image], max_new_tokens=2)
    assert result.image_tokens == 1921 and result.vision_ms == 0 and result.image_cache_hits == 0


@pytest.mark.parametrize(
    "crops, preprocessor", [(None, "phi-onnx"), (1, "phi-onnx"), (9, "phi-onnx"), (None, "onnxruntime-genai")]
)
def test_count_tokens_matches_the_prompt_fed(tiny_model_dir, reuse_model, images, crops, preprocessor, monkeypatch):
    """count_tokens (the server's check before a prompt pass) gives the prompt length stream() feeds, for one and
    several images, text only, and og's preprocessing, while it skips the HD transform where phi-onnx owns vision."""
    model = reuse_model if preprocessor == "phi-onnx" else phi_onnx.load(tiny_model_dir, preprocessor=preprocessor)
    opts = {"max_new_tokens": 1, **({"num_crops": crops} if crops else {})}
    cases = [
        [{"role": "user", "content": "just text"}],
        [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "What?"}]}],
        [
            {
                "role": "user",
                "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": "Compare."}],
            }
        ],
    ]
    transforms = []  # the HD transform, wherever count_tokens might call it
    for owner, name in ((model._hd, "transform"), (phi_onnx.vision.preprocess, "preprocess_images")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, **k: transforms.append(1) or _real(*a, **k))
    for messages in cases:
        before = len(transforms)
        count = model.count_tokens(messages=messages, options=model.options.updated(opts))
        if preprocessor == "phi-onnx":
            assert len(transforms) == before, "count_tokens ran the HD transform"
        fed = model.generate(messages=messages, options=opts).prompt_tokens
        assert count == fed == model.prepare(messages=messages, options=model.options.updated(opts)).prompt_tokens


def test_only_a_conversations_own_generator_continues_by_the_answers_text():
    """Shared pools (stateless callers, the server) continue exact id matches only: a request's answer never depends
    on what the pool held. A Chat's own generator also continues when its answer, re-tokenised, gives other ids for the
    same text: SentencePiece puts a space before a chunk's first word, so an answer generated without one ("d fila")
    comes back as " d fila"; the text compared is what the caller received from the stream."""
    from phi_onnx.sessions import Live, SessionPool, extends

    words = {1: "<s>", 5: "Q", 7: "d", 8: " fila", 9: " d", 10: "\ufffd", 11: "\u00e9", 32007: "<|end|>", 4: "?"}

    def decode(ids):
        return "".join(words[i] for i in ids if i not in (1, 32007))

    end = frozenset({32007})

    def live(answer, **more):
        return Live(None, [1, 5, *answer], 2, (), (), 0, **more)

    # exact: continues in both kinds of pool
    assert extends(live([7, 8]), [1, 5, 7, 8, 32007, 4], decode, end).exact
    # generated "d fila", resent as " d fila": only by text
    assert extends(live([7, 8]), [1, 5, 9, 8, 32007, 4], decode, end) is None
    found = extends(live([7, 8]), [1, 5, 9, 8, 32007, 4], decode, end, by_text=True)
    assert found is not None and not found.exact and found.tail == [32007, 4]
    # a different (edited) answer does not continue
    assert extends(live([7, 8]), [1, 5, 9, 9, 32007, 4], decode, end, by_text=True) is None
    # a byte that is not UTF-8 alone decodes to U+FFFD; the text the caller received is what its answer must equal
    assert extends(live([10, 8]), [1, 5, 11, 8, 32007, 4], decode, end, by_text=True) is None
    streamed = live([10, 8], answer_text="\u00e9 fila")
    assert extends(streamed, [1, 5, 11, 8, 32007, 4], decode, end, by_text=True) is not None
    # the question before the answer must be the same
    assert extends(live([7, 8]), [1, 4, 9, 8, 32007, 4], decode, end, by_text=True) is None
    # Turn 3: the cache holds the model's ids for answer 1 ([7, 8]), the caller resends its own ([9, 8]); what must
    # match is the caller's previous prompt, then answer 2 by text.
    third = Live(None, [1, 5, 7, 8, 32007, 4, 7, 8], 6, (), (), 0, prompt_ids=[1, 5, 9, 8, 32007, 4])
    found = extends(third, [1, 5, 9, 8, 32007, 4, 9, 8, 32007, 5], decode, end, by_text=True)
    assert found is not None and found.tail == [32007, 5]
    assert extends(third, [1, 5, 9, 8, 32007, 4, 9, 9, 32007, 5], decode, end, by_text=True) is None
    for owned in (True, False):
        pool = SessionPool(1, 2**62, owned=owned)
        pool.put(live([7, 8]))
        assert (pool.take([1, 5, 9, 8, 32007, 4], (), (), decode, end) is not None) == owned


def test_chat_history_edits_abandoned_turns_and_threads(reuse_model, fresh_model):
    """An edited answer is not continued (the next turn is encoded afresh and answers as a fresh model does); a caller
    that stops reading at finish_reason keeps its turn; starting a turn abandons an unfinished one; a turn from a
    second thread while one is being answered is refused in one line."""
    import threading

    from phi_onnx.errors import PromptError

    chat = reuse_model.chat()
    chat.send("Hello there.")
    chat.messages[-1]["content"] = "I said something else entirely."
    edited = chat.send("What did you say?")
    assert edited.cached_tokens == 0
    reference = fresh_model.generate(messages=chat.messages[:-1], max_new_tokens=NEW)
    assert edited.token_ids == reference.token_ids

    chat = reuse_model.chat()
    for chunk in chat.stream("First question."):
        if chunk.finish_reason is not None:
            break
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    unfinished = chat.stream("Second question.")
    next(unfinished)
    third = chat.send("Third question.")  # abandons the second turn
    assert [m["content"][-1]["text"] for m in chat.messages if m["role"] == "user"] == [
        "First question.",
        "Third question.",
    ]
    assert third.finish_reason is not None

    started, release, errors = threading.Event(), threading.Event(), []

    def slow_reader():
        for _ in chat.stream("Fourth question."):
            started.set()
            release.wait(10)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    assert started.wait(10)
    try:
        chat.send("From another thread.")
    except PromptError as err:
        errors.append(str(err))
    finally:
        release.set()
        reader.join(10)
    assert errors and "another thread" in errors[0]


def test_sampled_control_tokens_stay_out_of_the_text(reuse_model):
    """The random model samples ids that decode to control-token strings (``<unk>``, an unused id); the text never
    carries them, so the answer can be sent back as history (where such strings are refused) and a chat goes on."""
    from phi_onnx.prompt import _reserved_pattern

    pattern = _reserved_pattern(tuple(reuse_model.reserved_tokens))
    messages = [{"role": "user", "content": "ok"}]
    first = reuse_model.generate(messages=messages, max_new_tokens=256)
    stream = reuse_model._tokenizer.stream()
    raw = "".join(stream.decode(t) for t in first.token_ids)  # what the stream gave before control strings were cut
    assert pattern.search(raw), "this prompt no longer makes the tiny model sample a control token: pick another"
    assert not pattern.search(first.text)
    follow = [*messages, {"role": "assistant", "content": first.text}, {"role": "user", "content": "and then?"}]
    assert reuse_model.generate(messages=follow).generated_tokens > 0
    chat = reuse_model.chat(max_new_tokens=256)
    chat.send("ok")
    assert chat.send("and then?").generated_tokens > 0
