"""The Phi-3-V chat format, ``<|image_N|>`` tags, and splicing image slots into token ids.

Pure functions, no model needed. A conversation renders as::

    <|system|>\\n{text}<|end|>\\n                       (optional)
    <|user|>\\n<|image_1|>\\n<|image_2|>\\n{text}<|end|>\\n
    <|assistant|>\\n{text}<|end|>\\n
    ...
    <|assistant|>\\n                                     (generation starts here)

Tags are numbered in image order across the whole conversation. onnxruntime-genai (like Hugging Face) feeds image
features in order of appearance, whatever the tag number says, so tags must be exactly 1..N in order; see
reference/phi3v-spec.md §1.5 and §3.2.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from phi_onnx.errors import PromptError
from phi_onnx.images import ImageInput

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
"""An image tag, ``<|image_N|>``; group 1 is N."""

ROLES = ("system", "user", "assistant")
USER_MARKER = "<|user|>"
END = "<|end|>"
GENERATION_PROMPT = "<|assistant|>\n"

_MAX_LISTED_TAGS = 8

PHI3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<|assistant|>",
    *(f"<|placeholder{k}|>" for k in range(1, 7)),
    "<|system|>",
    "<|end|>",
    "<|user|>",
)
"""The added tokens of the Phi-3-vision tokenizer. Caller text may contain none of them (see :func:`check_text`)."""

# Characters the tokenizer cannot carry: NUL ends the text for onnxruntime-genai's tokenizer (everything after it is
# silently dropped), lone surrogates are not text at all, and Unicode noncharacters come back as U+FFFD.
_NONCHARACTERS = "".join(f"{chr(plane * 0x10000 + 0xFFFE)}{chr(plane * 0x10000 + 0xFFFF)}" for plane in range(17))
_UNCARRIED = re.compile(f"[\x00\ud800-\udfff\ufdd0-\ufdef{_NONCHARACTERS}]")
_UNCARRIED_NAMES = {"\x00": "a NUL character"}


@dataclass(frozen=True)
class BuiltPrompt:
    """A rendered conversation and its images.

    Attributes:
        text: The prompt in the Phi-3-V chat format, ending with ``<|assistant|>\\n``.
        images: The images in tag order: ``images[k - 1]`` belongs to ``<|image_k|>``.
    """

    text: str
    images: list[ImageInput]


def build_prompt(messages: Sequence[Mapping], reserved: Collection[str] = PHI3_SPECIAL_TOKENS) -> BuiltPrompt:
    """Render OpenAI-style chat messages in the Phi-3-V chat format.

    Each message is ``{"role": "system" | "user" | "assistant", "content": str | list[part]}``. Parts are
    ``{"type": "text", "text": str}``, ``{"type": "image_url", "image_url": {"url": str}}`` (or the url string
    itself), and ``{"type": "image", "image": ImageInput}``; images are allowed in user turns only. A user turn's image
    tags come first, one per line, then its text parts joined by newlines.

    Args:
        messages: The conversation; the last message must be a user turn.
        reserved: The tokenizer's control tokens, refused in every text (see :func:`check_text`).

    Returns:
        The prompt text, ending with the generation prompt ``<|assistant|>\\n``, and the images in tag order.

    Raises:
        PromptError: A message is malformed, or its text holds a control token or a character the tokenizer cannot
            carry; the message's index and the problem are named.
    """
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise PromptError(f"messages must be a list of {{'role', 'content'}} dicts, got {kind_of(messages)}")
    if not messages:
        raise PromptError("messages is empty: give at least one user message")
    pieces: list[str] = []
    images: list[ImageInput] = []
    for index, message in enumerate(messages):
        role, texts, message_images = _parse_message(index, message, reserved)
        if role == "user" and not texts and not message_images:
            raise PromptError(f"message {index} (user) is empty: give it text or an image")
        tags = "".join(f"<|image_{len(images) + k}|>\n" for k in range(1, len(message_images) + 1))
        images.extend(message_images)
        body = "\n".join(texts)
        pieces.append(f"<|{role}|>\n{tags}{body}{END}\n")
    last_role = messages[-1]["role"]
    if last_role != "user":
        raise PromptError(
            f"message {len(messages) - 1} is {'an' if last_role == 'assistant' else 'a'} {last_role} turn, but the "
            "last message must be a user turn: "
            "end the conversation with the user's message"
        )
    text = "".join(pieces) + GENERATION_PROMPT
    check_image_tags(text, len(images))
    return BuiltPrompt(text, images)


def prompt_from_text(
    prompt: str,
    num_images: int,
    *,
    system: str | None = None,
    reserved: Collection[str] = PHI3_SPECIAL_TOKENS,
    labels: Sequence[str] | None = None,
) -> str:
    """Turn a plain prompt plus a number of images into a checked Phi-3-V prompt (one user turn).

    If the prompt has no image tags, ``<|image_1|>\\n`` ... ``<|image_N|>\\n`` go before the text; with tags, they
    must be exactly 1..N in order. The prompt is caller text: control tokens such as ``<|end|>`` are refused (see
    :func:`check_text`); pass ``messages`` for a conversation.

    Args:
        prompt: The question, plain text, optionally with ``<|image_N|>`` tags.
        num_images: How many images go with it.
        system: An optional system prompt (no image tags).
        reserved: The tokenizer's control tokens.
        labels: Text put before each image's tag (e.g. a video frame's time), when phi-onnx places the tags.

    Returns:
        The formatted prompt, ending with the generation prompt.

    Raises:
        PromptError: The tags do not match the images (see :func:`check_image_tags`), or the text holds a control token
            or a character the tokenizer cannot carry.
    """
    check_text(prompt, "the prompt", reserved)
    num_images = _check_count(num_images)
    head = ""
    if system is not None:
        check_text(system, "the system prompt", reserved)
        _refuse_tags(system, "the system prompt")
        head = f"<|system|>\n{system}{END}\n" if system else ""
    has_tags = IMAGE_TAG.search(prompt) is not None
    labels = list(labels) if labels is not None else [""] * num_images
    tags = "" if has_tags else "".join(f"{labels[k - 1]}<|image_{k}|>\n" for k in range(1, num_images + 1))
    text = f"{head}{USER_MARKER}\n{tags}{prompt}{END}\n{GENERATION_PROMPT}"
    check_image_tags(text, num_images)
    return text


def check_image_tags(prompt: str, num_images: int) -> None:
    """Check that the prompt's ``<|image_N|>`` tags are exactly 1..num_images, each once, in increasing order.

    onnxruntime-genai consumes image features in order of appearance, so tags out of order would silently swap the
    images, and a repeated tag crashes the embedding graph later; both are refused here.

    Args:
        prompt: The prompt text.
        num_images: How many images go with it.

    Raises:
        PromptError: The tags do not match; the message names the tags, the problem and the fix.
    """
    num_images = _check_count(num_images)
    tags = [int(match.group(1)) for match in IMAGE_TAG.finditer(prompt)]
    if tags == list(range(1, num_images + 1)):
        return
    fix = (
        "use the tag <|image_1|> once"
        if num_images == 1
        else f"number the tags <|image_1|>..<|image_{num_images}|> once each, in order"
    )
    if not tags:
        raise PromptError(
            f"{_given(num_images)} but the prompt has no <|image_N|> tags: put <|image_1|>"
            f"{f'..<|image_{num_images}|>' if num_images > 1 else ''} where the "
            f"{'images belong' if num_images > 1 else 'image belongs'}"
        )
    listed = ", ".join(f"<|image_{k}|>" for k in tags[:_MAX_LISTED_TAGS]) + (
        ", ..." if len(tags) > _MAX_LISTED_TAGS else ""
    )
    head = f"the prompt has tags {listed} but {_given(num_images)}"
    if num_images == 0:
        raise PromptError(f"{head}: pass the images or remove the tags")
    if 0 in tags:
        raise PromptError(f"{head}: tag <|image_0|> is not valid, tags count from 1; {fix}")
    if max(tags) > num_images:
        raise PromptError(f"{head}: there is no image {max(tags)}; {fix}")
    repeated = next((k for k in tags if tags.count(k) > 1), None)
    if repeated is not None:
        times = {2: "twice", 3: "three times"}.get(tags.count(repeated), f"{tags.count(repeated)} times")
        raise PromptError(f"{head}: tag <|image_{repeated}|> appears {times}; {fix}")
    missing = [k for k in range(1, num_images + 1) if k not in tags]
    if missing:
        names = ", ".join(f"<|image_{k}|>" for k in missing)
        raise PromptError(f"{head}: {'tags' if len(missing) > 1 else 'tag'} {names} missing; {fix}")
    later = next(i for i in range(len(tags) - 1) if tags[i] > tags[i + 1])
    raise PromptError(
        f"{head}: <|image_{tags[later]}|> comes before <|image_{tags[later + 1]}|>, and images are used in order of "
        f"appearance, so they would be swapped; {fix}"
    )


def kind_of(value: object) -> str:
    """What a value is, in words a Python and a JSON caller both read ("a string", "null", "a list", ...)."""
    if value is None:
        return "null (None)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object (dict)"
    return f"a {type(value).__name__}"


def check_text(text: str, where: str, reserved: Collection[str] = PHI3_SPECIAL_TOKENS) -> None:
    """Refuse caller text that would not reach the model as the caller wrote it.

    Two kinds of text are refused, never altered silently:

    - the model's control tokens (``reserved``: ``<|end|>``, ``<|assistant|>``, ``<s>``, ...). The tokenizer turns
      them into the real special tokens, so text containing them could forge chat turns; phi-onnx writes the chat
      format itself.
    - characters the tokenizer cannot carry: NUL (onnxruntime-genai's tokenizer drops everything after it), lone
      surrogates (not text; the CLI gets them from undecodable bytes in its arguments) and Unicode noncharacters.

    Args:
        text: The caller's text.
        where: How to name it in the error, e.g. ``"message 2 (user)"``.
        reserved: The tokenizer's added tokens; :data:`PHI3_SPECIAL_TOKENS` by default.

    Raises:
        PromptError: The text is not a str, or contains one of the above; the message names it and its position.
    """
    if not isinstance(text, str):
        raise PromptError(f"{where} must be a string, got {kind_of(text)}")
    bad = _UNCARRIED.search(text)
    if bad is not None:
        char = bad.group(0)
        name = _UNCARRIED_NAMES.get(char) or (
            f"a lone surrogate U+{ord(char):04X} (undecodable input?)"
            if 0xD800 <= ord(char) <= 0xDFFF
            else f"the noncharacter U+{ord(char):04X}"
        )
        raise PromptError(
            f"{where} contains {name} at character {bad.start()}, which the tokenizer cannot carry: remove it "
            "(or fix the text's encoding)"
        )
    pattern = _reserved_pattern(tuple(reserved))
    found = pattern.search(text) if pattern is not None else None
    if found is not None:
        raise PromptError(
            f"{where} contains {found.group(0)!r} at character {found.start()}, one of the model's control tokens: "
            "caller text cannot write chat-format markers, remove it (pass a conversation as messages with roles)"
        )


@functools.lru_cache(maxsize=8)
def _reserved_pattern(tokens: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex for a tokenizer's control tokens, longest first (compiled once per token set)."""
    ordered = sorted({t for t in tokens if t}, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in ordered)) if ordered else None


def splice_image_tokens(
    prompt: str, encode: Callable[[str], Sequence[int]], num_image_tokens: Sequence[int], *, bos_id: int | None = None
) -> np.ndarray:
    """Tokenize a prompt with image slots spliced in, the way Microsoft's ``Phi3VProcessor`` (or og's) does.

    The prompt is split on the image tags and each text chunk is encoded on its own; the tag ``<|image_k|>`` becomes
    ``num_image_tokens[k - 1]`` copies of ``-k``. With ``bos_id`` (Microsoft's processor, whose tokenizer has
    ``add_bos_token``), every chunk, even an empty one, starts with BOS: ``<s>`` opens the prompt and follows every
    image. Without it (onnxruntime-genai's processor), no BOS is added and empty chunks add nothing.

    Args:
        prompt: The formatted prompt; its tags are checked with :func:`check_image_tags`.
        encode: The tokenizer's encode function, text to token ids (adding no BOS itself).
        num_image_tokens: The image tokens of each image, in image order.
        bos_id: The BOS id to start each chunk with, or None.

    Returns:
        int32 input ids of shape [1, S].

    Raises:
        PromptError: The tags do not match the images, or a token count is not a positive integer.
    """
    counts = [int(n) for n in np.asarray(num_image_tokens, dtype=np.int64).reshape(-1)]
    if any(n < 1 for n in counts):
        raise PromptError(f"num_image_tokens must be positive, got {counts}")
    check_image_tags(prompt, len(counts))
    parts = IMAGE_TAG.split(prompt)  # text chunks at even positions, tag numbers at odd ones
    ids: list[np.ndarray] = []
    for i, part in enumerate(parts):
        if i % 2:
            k = int(part)
            ids.append(np.full(counts[k - 1], -k, dtype=np.int32))
            continue
        if bos_id is not None:
            ids.append(np.array([bos_id], dtype=np.int32))
        if part:
            ids.append(np.asarray(encode(part), dtype=np.int64).astype(np.int32).reshape(-1))
    if not ids:
        return np.zeros((1, 0), dtype=np.int32)
    return np.concatenate(ids)[None, :]


def _parse_message(index: int, message: object, reserved: Collection[str]) -> tuple[str, list[str], list[ImageInput]]:
    """(role, text parts, images) of one message, or a PromptError naming it."""
    where = f"message {index}"
    if not isinstance(message, Mapping):
        raise PromptError(f"{where} is {kind_of(message)}, not a {{'role', 'content'}} dict")
    role = message.get("role")
    if role not in ROLES:
        raise PromptError(f"{where} has role {role!r}: use one of {', '.join(ROLES)}")
    where = f"message {index} ({role})"
    content = message.get("content")
    if isinstance(content, str):
        check_text(content, where, reserved)
        _refuse_tags(content, where)
        return role, ([content] if content else []), []
    if content is None:
        raise PromptError(f"{where} has no content: give it a string or a list of parts")
    if not isinstance(content, Sequence) or isinstance(content, bytes):
        raise PromptError(f"{where} content is {kind_of(content)}: give a string or a list of parts")
    texts: list[str] = []
    images: list[ImageInput] = []
    for p, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise PromptError(f"{where} part {p} is a text part without a 'text' string")
            check_text(text, f"{where} part {p}", reserved)
            _refuse_tags(text, f"{where} part {p}")
            texts.append(text)
        elif kind in ("image_url", "image"):
            if role != "user":
                raise PromptError(f"{where} part {p} is an image, but images are allowed in user turns only")
            images.append(_image_of(part, kind, f"{where} part {p}"))
        else:
            raise PromptError(
                f"{where} part {p} has type {kind!r}: use 'text', 'image_url' or 'image' parts"
                if isinstance(part, Mapping)
                else f"{where} part {p} is {kind_of(part)}, not a {{'type': ...}} dict"
            )
    return role, [t for t in texts if t], images


def _refuse_tags(text: str, where: str) -> None:
    match = IMAGE_TAG.search(text)
    if match is not None:
        raise PromptError(
            f"{where} contains the tag {match.group(0)}: pass images as image parts, phi-onnx numbers the tags"
        )


def _image_of(part: Mapping, kind: str, where: str) -> ImageInput:
    value = part.get(kind)
    if kind == "image_url":
        url = value.get("url") if isinstance(value, Mapping) else value
        if not isinstance(url, str) or not url:
            raise PromptError(f"{where} is an image_url part without a url: use {{'image_url': {{'url': ...}}}}")
        return url
    if value is None:
        raise PromptError(f"{where} is an image part without an 'image' value")
    return value


def _check_count(num_images: int) -> int:
    if isinstance(num_images, bool) or not isinstance(num_images, int | np.integer) or num_images < 0:
        raise PromptError(f"the number of images must be a non-negative integer, got {num_images!r}")
    return int(num_images)


def _noun(count: int) -> str:
    return "1 image" if count == 1 else f"{count} images"


def _given(count: int) -> str:
    if count == 0:
        return "no images were given"
    return f"{_noun(count)} {'was' if count == 1 else 'were'} given"
