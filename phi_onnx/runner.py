"""Run a prepared prompt on a generator: a new one, or a live one that already holds the beginning of the prompt.

See :mod:`phi_onnx.sessions` for when a generator is kept and when a request continues one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from phi_onnx import _og
from phi_onnx.errors import ModelError
from phi_onnx.generation import Chunk, token_chunks
from phi_onnx.options import GenerationOptions
from phi_onnx.prompt import _reserved_pattern
from phi_onnx.sessions import Live, SessionPool, max_length, search_key

if TYPE_CHECKING:
    from phi_onnx.model import PhiVision, PreparedInputs


def run(
    model: PhiVision, prepared: PreparedInputs, opts: GenerationOptions, start: float, pool: SessionPool | None
) -> Iterator[Chunk]:
    """Generate for ``prepared``; continue a generator from ``pool`` when one holds its beginning, else start one
    (kept in ``pool`` afterwards when its KV cache and the answer agree).

    A generator function: og's work (the prompt pass included) starts at the first ``next()``, after ``stream()``
    returned.
    """
    guidance = opts.guidance()
    if guidance is not None or (opts.sampling and opts.seed is not None):
        pool = None  # a grammar stays attached to its generator; a seed promises the text a fresh call gives
    search = opts.search_options(prepared.prompt_tokens, model.context_length)
    key = search_key(search)
    ids = [int(t) for t in prepared.inputs["input_ids"][0]]
    found = None
    if pool is not None:
        found = pool.take(ids, prepared.image_keys, key, model._tokenizer.decode, model._turn_end)
    live: Live | None = None
    cached, prompt_tokens, vision_ms, hits = 0, prepared.prompt_tokens, 0.0, 0
    preprocess_ms = prepared.preprocess_ms
    try:
        if found is not None:
            total = len(found.live.ids) + len(found.tail)
            if total + opts.max_new_tokens <= found.live.generator.max_length:
                live, cached, prompt_tokens = found.live, found.cached_tokens, total
                hits = len(prepared.image_keys)  # their features are already in the KV cache
                live.generator.append(found.tail, total + opts.min_new_tokens if opts.min_new_tokens else 0)
                live.ids = [*live.ids, *found.tail]
                live.prompt_ids = ids  # the caller's ids for all of it, which its next request will start with
            else:
                found.live.close()  # the turn does not fit in what this generator has left: encode afresh
        if live is None:
            inputs = dict(prepared.inputs)
            if prepared.pixels is not None:
                pixels, hits, vision_ms, hd_ms = prepared.pixels()
                made = int(pixels["num_image_tokens"].sum())
                if made != prepared.image_tokens:  # the ids were spliced from the sizes before the HD transform
                    raise ModelError(
                        f"the HD transform made {made} image tokens where the prompt has {prepared.image_tokens}: "
                        "please report this; load(..., vision='onnxruntime-genai') avoids it"
                    )
                inputs.update(pixels)
                preprocess_ms += hd_ms
            if pool is not None:
                reserve = model.kv_reserve
                search["max_length"] = max_length(prompt_tokens, opts.max_new_tokens, model.context_length, reserve)
            generator = _og.LiveGenerator(model._model, search, guidance)
            nbytes = search["max_length"] * model.kv_token_bytes
            live = Live(generator, ids, len(ids), prepared.image_keys, key, nbytes)
            generator.start(inputs)
    except BaseException:
        if live is not None:
            live.close()
        raise
    if model._probe is not None:  # tests: the ids the generator holds before generating, and each step's logits
        model._probe["ids"] = live.generator.sequence()
        live.generator.probe = model._probe["logits"] = []
    chunks = token_chunks(
        live.generator.tokens(),
        _visible(model._tokenizer.stream().decode, model.reserved_tokens),
        start=start,
        preprocess_ms=preprocess_ms,
        prompt_tokens=prompt_tokens,
        image_tokens=prepared.image_tokens,
        max_new_tokens=opts.max_new_tokens,
        eos_ids=model._eos,
        stops=opts.stop,
        num_crops=prepared.num_crops,
        cached_tokens=cached,
        frame_times=prepared.frame_times,
        vision_ms=vision_ms,
        image_cache_hits=hits,
    )
    yield from _keep_after(chunks, live, pool, model._eos)


def _keep_after(chunks: Iterator[Chunk], live: Live, pool: SessionPool | None, eos: frozenset[int]) -> Iterator[Chunk]:
    """Pass a generation's chunks through; then keep its generator in ``pool`` if its KV cache and answer agree.

    Kept: answers that ended at end-of-turn or at max_new_tokens. Released at once: answers cut by a stop string
    (a closing chunk that carries a token), generators og stopped at max_length, abandoned or failed streams, and
    every generator when ``pool`` is None.
    """
    kept = False
    text: list[str] | None = [] if pool is not None and pool.owned else None  # only a conversation compares texts
    try:
        for chunk in chunks:
            if text is not None:
                text.append(chunk.text)
            if chunk.finish_reason is not None and pool is not None:
                # Kept before the last chunk goes out, so a caller that stops reading at finish_reason still has it.
                kept = _keep(chunk, live, pool, eos, None if text is None else "".join(text))
            yield chunk
    finally:
        if not kept:
            live.close()


def _keep(last: Chunk, live: Live, pool: SessionPool, eos: frozenset[int], text: str | None) -> bool:
    generator = live.generator
    if (last.token_id is None) != (last.finish_reason == "stop") or generator.full:
        return False  # a stop string cut the answer, or og stopped at max_length
    live.answer_text = text  # what a resending caller will send back (the stream's decoding, not a batch decode)
    live.answer_start = len(live.ids)
    live.ids = generator.sequence()
    live.end_kept = generator.pending and live.ids[-1] in eos
    pool.put(live)
    return True


def _visible(decode_step: Callable[[int], str], reserved: tuple[str, ...]) -> Callable[[int], str]:
    """The stream's text without control-token strings: a model can sample an id such as ``<unk>`` or
    ``<|user|>``; its id stays in the KV cache, but the text a caller gets (and may send back as history, where such
    strings are refused) never carries it."""
    pattern = _reserved_pattern(tuple(reserved))
    if pattern is None:
        return decode_step
    return lambda token: pattern.sub("", decode_step(token))
