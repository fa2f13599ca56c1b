"""Stream chunks and generation results, and the token loop that produces them.

Every chunk carries running numbers (token counts, time to first token, decode speed, finish_reason on the last), so
the CLI, the chat loop and the benchmark all measure exactly what users see.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Chunk:
    """One step of a stream.

    Attributes:
        text: New text since the previous chunk (may be empty while a stop string is still undecided).
        token_id: The token generated at this step (None on a closing chunk that carries no token).
        prompt_tokens: Tokens in the prompt, image tokens included.
        image_tokens: Of those, how many are image tokens.
        generated_tokens: Tokens generated so far.
        time_to_first_token_ms: From the call (image bytes in hand) to the first token, preprocessing included.
        preprocess_ms: Image decoding, HD transform and tokenisation.
        decode_tokens_per_s: Tokens per second after the first token (0 until there are two).
        elapsed_ms: From the call to this chunk.
        finish_reason: None until the last chunk; then "stop" (end of turn or a stop string) or "length".
        num_crops: HD crops per image used for this prompt (None without images).
        cached_tokens: Prompt tokens whose KV cache was reused from an earlier generation, not computed again.
        frame_times: Times (seconds) of the video frames in the prompt, in order; empty without video.
        vision_ms: Time spent running the vision graph for this prompt (0 when no image needed it: features from
            the feature cache, or already in a reused KV cache).
        image_cache_hits: Images whose vision graph did not run because their features were cached (in the feature
            cache, or in the KV cache of a continued generator).
    """

    text: str
    token_id: int | None
    prompt_tokens: int
    image_tokens: int
    generated_tokens: int
    time_to_first_token_ms: float
    preprocess_ms: float
    decode_tokens_per_s: float
    elapsed_ms: float
    finish_reason: str | None = None
    num_crops: int | None = None
    cached_tokens: int = 0
    frame_times: tuple[float, ...] = ()
    vision_ms: float = 0.0
    image_cache_hits: int = 0


@dataclass(frozen=True)
class Generation:
    """The result of :meth:`PhiVision.generate`: the text and the same numbers the last chunk carried."""

    text: str
    finish_reason: str
    prompt_tokens: int
    image_tokens: int
    generated_tokens: int
    time_to_first_token_ms: float
    preprocess_ms: float
    decode_tokens_per_s: float
    elapsed_ms: float
    num_crops: int | None = None
    cached_tokens: int = 0
    frame_times: tuple[float, ...] = ()
    vision_ms: float = 0.0
    image_cache_hits: int = 0
    token_ids: tuple[int, ...] = field(default=(), repr=False)

    def json(self) -> Any:
        """The answer parsed as JSON (for generations constrained by ``json_schema``).

        Raises:
            OutputError: The text is not JSON; if generation stopped at max_new_tokens, says so and how to fix it.
        """
        import json

        from phi_onnx.errors import OutputError

        try:
            return json.loads(self.text)
        except ValueError as err:
            starts_like_json = self.text.lstrip()[:1] in tuple('{["-0123456789tfn')
            if self.finish_reason == "length" and starts_like_json:
                raise OutputError(
                    f"generation stopped at max_new_tokens ({self.generated_tokens}) before the JSON value was "
                    "complete: raise max_new_tokens"
                ) from err
            raise OutputError(
                f"the answer is not JSON ({err}): pass json_schema (e.g. {{'type': 'object'}}) to constrain it"
            ) from err

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["token_ids"] = list(self.token_ids)
        data["frame_times"] = list(self.frame_times)
        return data


def collect(chunks: Iterable[Chunk]) -> Generation:
    """Drain a stream into a Generation (the text, and the numbers the last chunk carried)."""
    parts: list[str] = []
    ids: list[int] = []
    last: Chunk | None = None
    for chunk in chunks:
        parts.append(chunk.text)
        if chunk.token_id is not None:
            ids.append(chunk.token_id)
        last = chunk
    if last is None:  # a stream always ends with a chunk carrying finish_reason
        raise RuntimeError("the generation stream ended without a final chunk")
    numbers = {name: getattr(last, name) for name in _CARRIED}
    return Generation(text="".join(parts), finish_reason=last.finish_reason or "stop", token_ids=tuple(ids), **numbers)


_CARRIED = tuple(f.name for f in fields(Chunk) if f.name not in ("text", "token_id", "finish_reason"))


class StopMatcher:
    """Holds back text that may be the start of a stop string; reports when one appears."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, stopped)."""
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = max((_overlap(self.pending, s) for s in self.stops), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def token_chunks(
    tokens: Iterator[int],
    decode_step,
    *,
    start: float,
    preprocess_ms: float,
    prompt_tokens: int,
    image_tokens: int,
    max_new_tokens: int,
    eos_ids: frozenset[int],
    stops: tuple[str, ...] = (),
    num_crops: int | None = None,
    cached_tokens: int = 0,
    frame_times: tuple[float, ...] = (),
    vision_ms: float = 0.0,
    image_cache_hits: int = 0,
) -> Iterator[Chunk]:
    """Turn generated token ids into chunks with running numbers.

    Args:
        tokens: Token ids as the generator produces them (it stops by itself at max_length or end of turn).
        decode_step: ``token_id -> str``, an incremental detokenizer.
        start: ``time.perf_counter()`` at the call.
    """
    matcher = StopMatcher(stops)
    count = 0
    first_at = 0.0
    ttft = 0.0
    reason = "length"

    def numbers(now: float) -> dict[str, float | int | None]:
        rate = (count - 1) / (now - first_at) if count > 1 and now > first_at else 0.0
        return {
            "prompt_tokens": prompt_tokens,
            "image_tokens": image_tokens,
            "generated_tokens": count,
            "time_to_first_token_ms": ttft,
            "preprocess_ms": preprocess_ms,
            "decode_tokens_per_s": rate,
            "elapsed_ms": (now - start) * 1e3,
            "num_crops": num_crops,
            "cached_tokens": cached_tokens,
            "frame_times": frame_times,
            "vision_ms": vision_ms,
            "image_cache_hits": image_cache_hits,
        }

    try:
        for token in tokens:
            now = time.perf_counter()
            count += 1
            if count == 1:
                first_at, ttft = now, (now - start) * 1e3
            if token in eos_ids:
                reason = "stop"
                break
            text, stopped = matcher.feed(decode_step(token))
            if stopped:
                reason = "stop"
                yield Chunk(text, token, **numbers(time.perf_counter()), finish_reason="stop")
                return
            if count >= max_new_tokens:
                yield Chunk(text + matcher.flush(), token, **numbers(time.perf_counter()), finish_reason="length")
                return
            yield Chunk(text, token, **numbers(time.perf_counter()))
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()  # release the og generator now, not at garbage collection
    yield Chunk(matcher.flush(), None, **numbers(time.perf_counter()), finish_reason=reason)
