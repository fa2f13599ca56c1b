"""Live generators kept between calls, so that a conversation's next turn prefills only its own tokens.

A finished generation leaves its generator, whose KV cache holds the prompt and the answer, in a :class:`SessionPool`
together with the ids it holds and the identities (pixel digests) of its images. A later request whose ids extend
those ids, with the same images, continues that generator: only the rest (``<|end|>\\n<|user|>\\n...<|assistant|>``)
is appended. The match is on token ids, so the continuation is exactly a fresh generator fed the same ids.

Re-tokenising an answer's text does not always give back the ids the model generated (a word generated in two pieces
is one token when the text is encoded again). Such a request still continues the generator when everything before the
answer matches id for id and the answer's text decodes the same: the KV keeps the ids the model generated, and the
rest of the request's ids (from its ``<|end|>`` on) are appended.

Never pooled, so that the KV cache and what callers see never disagree:

- answers cut by a stop string (the KV holds the stop string, the returned text does not), abandoned or failed
  streams, and generators og stopped at ``max_length``;
- constrained generations (json_schema, regex, grammar): the grammar stays attached to the generator and a next turn
  cannot be generated without it; a constrained request never continues a pooled generator either;
- generations sampled with a seed (a seed promises the text a fresh call gives).

A generator serves one continuation at a time: :meth:`SessionPool.take` removes it from the pool, and a second request
for the same prefix meanwhile starts fresh.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from phi_onnx import _og

DEFAULT_RESERVE_TOKENS = 512
"""Room a pooled generator keeps beyond its first answer, for follow-up turns (see :func:`max_length`)."""

DEFAULT_POOL_SIZE = 4
"""Generators kept for stateless callers (``generate``/``stream`` with messages)."""

DEFAULT_POOL_MB = 4096
"""Bound of the KV memory those generators may hold together."""


def kv_bytes_per_token(config: dict[str, Any], kv_dtype: str) -> int:
    """Bytes of KV cache one token takes: layers x 2 (key, value) x kv heads x head size x dtype size."""
    decoder = config["model"]["decoder"]
    heads = decoder.get("num_key_value_heads", decoder.get("num_attention_heads", 1))
    head_size = decoder.get("head_size") or decoder["hidden_size"] // decoder.get("num_attention_heads", 1)
    size = 2 if kv_dtype in ("float16", "bfloat16") else 4
    return int(decoder.get("num_hidden_layers", 1)) * 2 * int(heads) * int(head_size) * size


def max_length(prompt_tokens: int, max_new_tokens: int, context: int, reserve: int) -> int:
    """A pooled generator's ``max_length``: the prompt, the answer, and ``reserve`` tokens for later turns.

    og allocates the KV cache for ``max_length`` tokens up front (phi3v shares the past and present buffers), so the
    reserve costs memory while the generator lives (:func:`kv_bytes_per_token` per token). A later turn that does not
    fit in what is left starts a new generator sized the same way: never an error while the conversation fits in
    the context.
    """
    return min(context, prompt_tokens + max_new_tokens + max(0, reserve))


@dataclass
class Live:
    """A generator between calls, and what its KV cache holds."""

    generator: _og.LiveGenerator
    ids: list[int]  # the sequence the KV cache holds (image slots negative), the answer included
    answer_start: int  # where the last answer begins in ``ids``
    images: tuple  # the images' identities, in order
    search_key: tuple  # search options that must match to continue (lengths excluded)
    nbytes: int  # KV memory reserved (max_length x bytes per token)
    end_kept: bool = False  # ``ids`` ends with the end-of-turn id the answer stopped at (og was not done)
    # The last request's prompt as its caller's ids: a resending caller's next request starts with these, while the
    # cache may hold other ids for the same text (answers the model generated in a tokenisation of its own).
    prompt_ids: list[int] | None = None
    answer_text: str | None = None  # the last answer as its caller received it (None: decode it from ``ids``)

    @property
    def said(self) -> list[int]:
        return self.prompt_ids if self.prompt_ids is not None else self.ids[: self.answer_start]

    def close(self) -> None:
        self.generator.close()


@dataclass
class Continuation:
    """A request that continues a live generator: the ids still to prefill, and how many of the KV were reused."""

    live: Live
    tail: list[int]
    exact: bool  # the request's ids extend the generator's ids (False: the answer's text matched, not its ids)

    @property
    def cached_tokens(self) -> int:
        return len(self.live.ids) - int(self.live.generator.pending)


class SessionPool:
    """A thread-safe LRU of live generators, bounded by count and by KV bytes."""

    def __init__(self, max_count: int, max_bytes: int, *, owned: bool = False) -> None:
        # One conversation's own pool (a Chat): its next turn may continue by the answer's text. Shared pools
        # continue exact id matches only, so that a request's answer never depends on what the pool held.
        self.owned = owned
        self.max_count = max(0, int(max_count))
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[int, Live] = OrderedDict()
        self._lock = threading.Lock()
        self.exact = 0  # continuations whose ids matched exactly
        self.by_text = 0  # continuations whose answer matched only by text (re-tokenisation differed)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(live.nbytes for live in self._items.values())

    def take(
        self, ids: Sequence[int], images: tuple, search_key: tuple, decode: Callable, end_ids: frozenset[int]
    ) -> Continuation | None:
        """Remove and return the live generator this request extends (the longest match), or None."""
        with self._lock:
            best: tuple[int, Continuation] | None = None
            for key, live in self._items.items():
                if live.images != images or live.search_key != search_key:
                    continue
                found = extends(live, ids, decode, end_ids, by_text=self.owned)
                if found is not None and (best is None or len(live.ids) > len(best[1].live.ids)):
                    best = (key, found)
            if best is None:
                return None
            self._items.pop(best[0])
            if best[1].exact:
                self.exact += 1
            else:
                self.by_text += 1
            return best[1]

    def put(self, live: Live) -> None:
        """Keep a generator for later; the least recently used go when the bounds are passed."""
        if self.max_count == 0 or live.nbytes > self.max_bytes:
            live.close()
            return
        dropped = []
        with self._lock:
            self._items[id(live)] = live
            while len(self._items) > self.max_count or sum(v.nbytes for v in self._items.values()) > self.max_bytes:
                dropped.append(self._items.popitem(last=False)[1])
        for old in dropped:
            old.close()

    def clear(self) -> None:
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
        for live in items:
            live.close()


def extends(
    live: Live, ids: Sequence[int], decode: Callable, end_ids: frozenset[int], *, by_text: bool = False
) -> Continuation | None:
    """How a request's ``ids`` continue ``live``, or None when they do not.

    Exact: ``ids`` start with everything the generator holds; the answer is then the one a fresh generator fed the
    same ids gives. By text (``by_text``, for a conversation's own generator only): re-tokenising a generated answer
    need not give back the ids the model generated, so the request may instead start with the ids of the request the
    generator last served, then an answer whose text is the text that request received (but for the space
    SentencePiece puts before a chunk's first word), then an end-of-turn id; the rest is appended. The cache then
    holds the model's own ids where a fresh encoding would hold the re-tokenised ones.
    """
    held = live.ids
    if len(ids) > len(held) and list(ids[: len(held)]) == held:
        return Continuation(live, list(ids[len(held) :]), True)
    if not by_text:
        return None
    said = live.said
    start = len(said)
    if len(ids) <= start or list(ids[:start]) != said:
        return None
    end = next((i for i in range(start, len(ids)) if ids[i] in end_ids), None)
    if end is None:
        return None
    answer = held[live.answer_start : -1] if live.end_kept else held[live.answer_start :]
    tail = list(ids[end + 1 :] if live.end_kept else ids[end:])
    sent = live.answer_text if live.answer_text is not None else decode(answer)
    if not tail or not _same_text(sent, decode(list(ids[start:end]))):
        return None
    if live.end_kept and held[-1] != ids[end]:
        return None
    return Continuation(live, tail, False)


def _same_text(generated: str, resent: str) -> bool:
    return generated.removeprefix(" ") == resent.removeprefix(" ")


def search_key(search: dict[str, Any]) -> tuple:
    """The search options a continuation must share with the generator (lengths change per turn)."""
    return tuple(sorted((k, v) for k, v in search.items() if k not in ("max_length", "min_length")))
