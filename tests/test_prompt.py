"""Chat format, image tags and token splicing: pure functions, checked with a character-level fake tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from phi_onnx.errors import PromptError
from phi_onnx.prompt import BuiltPrompt, build_prompt, check_image_tags, prompt_from_text, splice_image_tokens


def encode_chars(text: str) -> list[int]:
    """A fake tokenizer: one id per character."""
    return [ord(c) for c in text]


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


# --- build_prompt ---------------------------------------------------------------------------------------------------


def test_single_user_turn_with_string_content():
    built = build_prompt([{"role": "user", "content": "Hello"}])
    assert built == BuiltPrompt("<|user|>\nHello<|end|>\n<|assistant|>\n", [])


def test_image_tags_come_first_even_when_parts_put_text_first():
    built = build_prompt([{"role": "user", "content": [text("Compare"), image("a.png"), image("b.png")]}])
    assert built.text == "<|user|>\n<|image_1|>\n<|image_2|>\nCompare<|end|>\n<|assistant|>\n"
    assert built.images == ["a.png", "b.png"]


def test_tags_are_numbered_across_the_whole_conversation():
    pil_like = object()  # any ImageInput is passed through untouched
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [image("a.png"), image("b.png"), text("What is this?")]},
        {"role": "assistant", "content": "Two cats."},
        {"role": "user", "content": [{"type": "image", "image": pil_like}, text("And this?")]},
    ]
    built = build_prompt(messages)
    assert built.text == (
        "<|system|>\nBe brief.<|end|>\n"
        "<|user|>\n<|image_1|>\n<|image_2|>\nWhat is this?<|end|>\n"
        "<|assistant|>\nTwo cats.<|end|>\n"
        "<|user|>\n<|image_3|>\nAnd this?<|end|>\n"
        "<|assistant|>\n"
    )
    assert built.images[:2] == ["a.png", "b.png"]
    assert built.images[2] is pil_like


def test_image_url_may_be_a_plain_string_and_text_parts_join_with_newlines():
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AA=="}]}]
    messages[0]["content"] += [text("line one"), text("line two")]
    built = build_prompt(messages)
    assert built.text == "<|user|>\n<|image_1|>\nline one\nline two<|end|>\n<|assistant|>\n"
    assert built.images == ["data:image/png;base64,AA=="]


def test_image_only_user_turn():
    built = build_prompt([{"role": "user", "content": [image("x.jpg")]}])
    assert built.text == "<|user|>\n<|image_1|>\n<|end|>\n<|assistant|>\n"


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], "messages is empty"),
        ("hello", "must be a list"),
        ([{"role": "user", "content": "a"}, "oops"], "message 1 is a string"),
        ([{"role": "tool", "content": "a"}], "message 0 has role 'tool'"),
        ([{"content": "a"}], "message 0 has role None"),
        ([{"role": "user"}], "message 0 (user) has no content"),
        ([{"role": "user", "content": 5}], "message 0 (user) content is a number"),
        ([{"role": "user", "content": ""}], "message 0 (user) is empty"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "message 0 (user) part 0 has type 'audio'"),
        ([{"role": "user", "content": ["just a string"]}], "message 0 (user) part 0 is a string"),
        ([{"role": "user", "content": [{"type": "text"}]}], "part 0 is a text part without a 'text' string"),
        ([{"role": "user", "content": [text("a"), {"type": "image_url"}]}], "part 1 is an image_url part without"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"uri": "x"}}]}], "without a url"),
        ([{"role": "user", "content": [{"type": "image"}]}], "part 0 is an image part without an 'image' value"),
        ([{"role": "system", "content": [image("a.png")]}, {"role": "user", "content": "hi"}], "user turns only"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [image("a.png")]}],
            "message 1 (assistant) part 0 is an image",
        ),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "message 1 is an assistant turn"),
        ([{"role": "system", "content": "be nice"}], "last message must be a user turn"),
        ([{"role": "user", "content": "<|image_1|>\nhi"}], "message 0 (user) contains the tag <|image_1|>"),
        ([{"role": "user", "content": [text("see <|image_2|>")]}], "message 0 (user) part 0 contains the tag"),
    ],
)
def test_malformed_messages_are_refused_with_the_message_index(messages, expected):
    with pytest.raises(PromptError) as info:
        build_prompt(messages)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


# --- prompt_from_text -----------------------------------------------------------------------------------------------


def test_plain_prompt_is_wrapped_with_tags_in_front():
    assert prompt_from_text("Describe.", 2) == "<|user|>\n<|image_1|>\n<|image_2|>\nDescribe.<|end|>\n<|assistant|>\n"
    assert prompt_from_text("Hi", 0) == "<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_plain_prompt_with_its_own_tags_keeps_them():
    assert prompt_from_text("<|image_1|>\nWhat?", 1) == "<|user|>\n<|image_1|>\nWhat?<|end|>\n<|assistant|>\n"


def test_formatted_prompts_are_refused_and_system_has_its_own_argument():
    formatted = "<|system|>\nS<|end|>\n<|user|>\nDescribe.<|end|>\n<|assistant|>\n"
    with pytest.raises(PromptError, match=r"'<\|system\|>' at character 0, one of the model's control tokens"):
        prompt_from_text(formatted, 0)
    assert (
        prompt_from_text("Describe.", 1, system="S")
        == "<|system|>\nS<|end|>\n<|user|>\n<|image_1|>\nDescribe.<|end|>\n<|assistant|>\n"
    )
    # Tags the caller wrote keep working with a system prompt (the CLI's -s used to break them).
    assert prompt_from_text("A <|image_1|> B", 1, system="S").endswith(
        "<|user|>\nA <|image_1|> B<|end|>\n<|assistant|>\n"
    )
    with pytest.raises(PromptError, match="the system prompt contains the tag"):
        prompt_from_text("x", 1, system="<|image_1|>")


def test_prompt_from_text_validates_tags():
    with pytest.raises(PromptError, match=r"2 images were given: there is no image 3"):
        prompt_from_text("<|image_1|><|image_3|> compare", 2)
    with pytest.raises(PromptError, match="non-negative integer"):
        prompt_from_text("hi", -1)


# --- check_image_tags -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "count"),
    [("no images", 0), ("<|image_1|>", 1), ("<|image_1|> a <|image_2|> b <|image_3|>", 3)],
)
def test_valid_tags_pass(prompt, count):
    assert check_image_tags(prompt, count) is None


@pytest.mark.parametrize(
    ("prompt", "count", "expected"),
    [
        (
            "<|image_1|><|image_1|>",
            2,
            "the prompt has tags <|image_1|>, <|image_1|> but 2 images were given: tag <|image_1|> appears twice; "
            "number the tags <|image_1|>..<|image_2|> once each, in order",
        ),
        (
            "<|image_1|><|image_3|>",
            2,
            "the prompt has tags <|image_1|>, <|image_3|> but 2 images were given: there is no image 3; "
            "number the tags <|image_1|>..<|image_2|> once each, in order",
        ),
        (
            "hello",
            2,
            "2 images were given but the prompt has no <|image_N|> tags: put <|image_1|>..<|image_2|> where the "
            "images belong",
        ),
        (
            "hello",
            1,
            "1 image was given but the prompt has no <|image_N|> tags: put <|image_1|> where the image belongs",
        ),
        (
            "<|image_1|>",
            0,
            "the prompt has tags <|image_1|> but no images were given: pass the images or remove the tags",
        ),
        (
            "<|image_2|> then <|image_1|>",
            2,
            "the prompt has tags <|image_2|>, <|image_1|> but 2 images were given: <|image_2|> comes before "
            "<|image_1|>, and images are used in order of appearance, so they would be swapped; number the tags "
            "<|image_1|>..<|image_2|> once each, in order",
        ),
        (
            "<|image_1|>",
            3,
            "the prompt has tags <|image_1|> but 3 images were given: tags <|image_2|>, <|image_3|> missing; "
            "number the tags <|image_1|>..<|image_3|> once each, in order",
        ),
        (
            "<|image_0|>",
            1,
            "the prompt has tags <|image_0|> but 1 image was given: tag <|image_0|> is not valid, tags count from 1; "
            "use the tag <|image_1|> once",
        ),
    ],
)
def test_tag_errors_name_the_problem(prompt, count, expected):
    with pytest.raises(PromptError) as info:
        check_image_tags(prompt, count)
    assert str(info.value) == expected


# --- splice_image_tokens --------------------------------------------------------------------------------------------


def test_splice_encodes_chunks_separately_and_inserts_negative_slots_in_order():
    calls: list[str] = []

    def encode(chunk: str) -> list[int]:
        calls.append(chunk)
        return encode_chars(chunk)

    prompt = "<|user|>\n<|image_1|>\n<|image_2|>\nHi<|end|>\n<|assistant|>\n"
    ids = splice_image_tokens(prompt, encode, [3, 2])
    assert ids.dtype == np.int32
    assert ids.shape == (1, len("<|user|>\n") + 3 + 1 + 2 + len("\nHi<|end|>\n<|assistant|>\n"))
    assert calls == ["<|user|>\n", "\n", "\nHi<|end|>\n<|assistant|>\n"]
    expected = encode_chars("<|user|>\n") + [-1] * 3 + encode_chars("\n") + [-2] * 2
    expected += encode_chars("\nHi<|end|>\n<|assistant|>\n")
    assert ids[0].tolist() == expected


def test_splice_skips_empty_chunks_and_accepts_array_counts():
    calls: list[str] = []

    def encode(chunk: str) -> list[int]:
        calls.append(chunk)
        return encode_chars(chunk)

    ids = splice_image_tokens("<|image_1|><|image_2|>", encode, np.array([[2], [1]], dtype=np.int64))
    assert calls == []
    assert ids.tolist() == [[-1, -1, -2]]


def test_splice_without_images_is_plain_encoding():
    assert splice_image_tokens("abc", encode_chars, []).tolist() == [[97, 98, 99]]


def test_splice_refuses_mismatched_tags_and_bad_counts():
    with pytest.raises(PromptError, match="appears twice"):
        splice_image_tokens("<|image_1|><|image_1|>", encode_chars, [5, 5])
    with pytest.raises(PromptError, match="must be positive"):
        splice_image_tokens("<|image_1|>", encode_chars, [0])
