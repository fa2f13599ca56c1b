"""Generation options: one validated object, mapped one to one to onnxruntime-genai search options.

The CLI builds its flags from :data:`FIELDS`, so the Python API and the command line accept the same names, types and
ranges.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from phi_onnx.errors import ContextLengthError, OptionsError
from phi_onnx.prompt import kind_of

MAX_CROPS = 64


@dataclass(frozen=True)
class Field:
    name: str
    kind: type
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False


FIELDS: tuple[Field, ...] = (
    Field("max_new_tokens", int, "Most tokens to generate.", 1, 131072),
    Field(
        "min_new_tokens",
        int,
        "Fewest tokens to generate before end-of-turn may stop (benchmarks fix length).",
        0,
        131072,
    ),
    Field("temperature", float, "Sampling temperature; 0 means greedy.", 0, 100),
    Field("top_k", int, "Sample from the k most likely tokens (0 = no limit).", 0, 1_000_000),
    Field("top_p", float, "Nucleus sampling: smallest token set with this total probability.", 0, 1, low_open=True),
    Field("do_sample", bool, "Sample instead of greedy decoding (default: on when temperature > 0)."),
    Field("repetition_penalty", float, "Penalty for repeated tokens (1 = none).", 0, 10, low_open=True),
    Field("seed", int, "Random seed for sampling (same seed, same text).", 0, 2**31 - 1),
    Field("num_crops", int, "HD crops per image (default 16 for one image, 4 for several).", 1, MAX_CROPS),
)
_BY_NAME = {f.name: f for f in FIELDS}


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate. Every field is validated on creation.

    Attributes:
        max_new_tokens: Most tokens to generate (the generation stops earlier at ``<|end|>``).
        min_new_tokens: Fewest tokens before end-of-turn may stop generation.
        temperature: 0 for greedy decoding; > 0 samples (unless ``do_sample`` is False).
        top_k: Keep the k most likely tokens when sampling; 0 keeps all.
        top_p: Nucleus sampling threshold in (0, 1].
        do_sample: Force sampling on or off; None decides from ``temperature``.
        repetition_penalty: > 0; 1 disables it.
        seed: Sampling seed; None picks a random one.
        stop: Strings that end the generation; the text returned stops before them.
        num_crops: HD crops per image; None uses 16 for a single image and 4 for several images or frames.
        json_schema: Constrain the answer to JSON matching this schema (a dict or JSON text; kept as compact JSON
            text). Whitespace between tokens is off unless the schema's own ``x-guidance`` says otherwise.
        regex: Constrain the answer to match this regular expression.
        grammar: Constrain the answer to this Lark grammar.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    num_crops: int | None = None
    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        for f in FIELDS:
            value = getattr(self, f.name)
            if value is None and f.name in ("do_sample", "seed", "num_crops"):
                continue
            object.__setattr__(self, f.name, _check(f, value))
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise OptionsError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "json_schema", _check_schema(self.json_schema))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise OptionsError(f"{name} must be a non-empty string, got {value!r}")
            if value is not None:
                _check_repeats(value, name, lark=name == "grammar")
        given = [n for n in ("json_schema", "regex", "grammar") if getattr(self, n) is not None]
        if len(given) > 1:
            raise OptionsError(f"give at most one of json_schema, regex and grammar, got {' and '.join(given)}")
        if self.min_new_tokens > self.max_new_tokens:
            raise OptionsError(
                f"min_new_tokens ({self.min_new_tokens}) is larger than max_new_tokens ({self.max_new_tokens}): "
                "lower min_new_tokens or raise max_new_tokens"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None = None, **more: Any) -> GenerationOptions:
        """Build options from a dict and keywords; unknown keys are an error that suggests the closest name."""
        merged = {**(values or {}), **more}
        known = {f.name for f in fields(cls)}
        for key in merged:
            if key not in known:
                raise cls._unknown(key)
        return cls(**merged)

    @staticmethod
    def _unknown(key: str) -> OptionsError:
        known = sorted(f.name for f in fields(GenerationOptions))
        hint = difflib.get_close_matches(key, known, n=1)
        suggestion = f"did you mean '{hint[0]}'?" if hint else f"valid options: {', '.join(known)}"
        return OptionsError(f"unknown option '{key}': {suggestion}")

    def updated(self, values: Mapping[str, Any] | None = None, **more: Any) -> GenerationOptions:
        """A copy with some fields changed (validated like the constructor); None values are ignored."""
        changes = {k: v for k, v in {**(values or {}), **more}.items() if v is not None}
        GenerationOptions.from_mapping(changes)  # reject unknown names with the same message
        return replace(self, **changes)

    def guidance(self) -> tuple[str, str] | None:
        """(kind, data) for onnxruntime-genai's ``set_guidance``, or None when the output is unconstrained.

        A JSON schema gets llguidance's ``"x-guidance": {"whitespace_flexible": false}`` (compact JSON that ends)
        unless the schema sets ``whitespace_flexible`` itself: with flexible whitespace a model can write newlines
        and tabs until max_new_tokens.
        """
        if self.json_schema is not None:
            schema = json.loads(self.json_schema)
            if isinstance(schema, dict):
                extra = schema.get("x-guidance") if isinstance(schema.get("x-guidance"), dict) else {}
                schema = {**schema, "x-guidance": {"whitespace_flexible": False, **extra}}
            return "json_schema", json.dumps(schema, separators=(",", ":"))
        if self.regex is not None:
            return "regex", self.regex
        if self.grammar is not None:
            return "lark_grammar", self.grammar
        return None

    @property
    def sampling(self) -> bool:
        return self.temperature > 0 if self.do_sample is None else self.do_sample

    def crops_for(self, num_images: int) -> int:
        """num_crops in effect for a prompt with this many images (16 for one, 4 for several)."""
        if self.num_crops is not None:
            return self.num_crops
        return 16 if num_images <= 1 else 4

    def max_length(self, prompt_tokens: int, context_length: int) -> int:
        """``max_length`` for onnxruntime-genai: prompt + new tokens, checked against the context."""
        total = prompt_tokens + self.max_new_tokens
        if total > context_length:
            raise ContextLengthError(
                f"prompt is {prompt_tokens:,} tokens, max_new_tokens {self.max_new_tokens:,}, context "
                f"{context_length:,}: shorten the prompt or history, lower num_crops, or lower max_new_tokens"
            )
        return total

    def search_options(self, prompt_tokens: int, context_length: int) -> dict[str, Any]:
        """The onnxruntime-genai search options for this request."""
        opts: dict[str, Any] = {
            "max_length": self.max_length(prompt_tokens, context_length),
            "min_length": prompt_tokens + self.min_new_tokens if self.min_new_tokens else 0,
            "repetition_penalty": self.repetition_penalty,
            "num_beams": 1,
        }
        if self.sampling:
            opts.update(
                do_sample=True,
                temperature=self.temperature if self.temperature > 0 else 1.0,
                top_k=self.top_k,
                top_p=self.top_p,
            )
            if self.seed is not None:
                opts["random_seed"] = self.seed
        else:
            opts.update(do_sample=False, top_k=1, top_p=1.0, temperature=1.0)
        return opts


def _check(f: Field, value: Any) -> Any:
    if f.kind is bool:
        if not isinstance(value, bool):
            raise OptionsError(f"{f.name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionsError(f"{f.name} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionsError(f"{f.name} is {value}, not a finite number: give a value in {_range(f)}")
    if f.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise OptionsError(f"{f.name} must be a whole number, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    too_low = f.low is not None and (value <= f.low if f.low_open else value < f.low)
    if too_low or (f.high is not None and value > f.high):
        raise OptionsError(f"{f.name} is {value}, outside its range {_range(f)}")
    return value


def _check_schema(schema: Any) -> str | None:
    """A JSON schema as compact JSON text, or an OptionsError saying what is wrong with it."""
    if schema is None:
        return None
    if isinstance(schema, str):
        return _schema_text(schema)
    return _compact_schema(schema)


@functools.lru_cache(maxsize=64)
def _schema_text(text: str) -> str:
    """:func:`_check_schema` for JSON text, once per text: options are merged again for every request and item, and
    each merge checks its schema."""
    return _compact_schema(text)


def _compact_schema(schema: Any) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as err:
            raise OptionsError(f"json_schema is not valid JSON ({err}): pass a dict or JSON text") from err
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise OptionsError(f"json_schema must be a JSON object (a dict), got {kind_of(schema)}")
    _check_counts(schema, "json_schema")
    try:
        return json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise OptionsError(
            f"json_schema cannot be written as JSON ({err}): use plain dicts, lists, str and numbers"
        ) from err


# llguidance unrolls counted repetition (an array's minItems, a regex's {n}) into its grammar: memory grows with the
# count (10 million items took 1.4 GB and a minute to compile), so a request could exhaust the host. No answer can
# hold 10,000 items or repeats within a context anyway, at two tokens or more each.
MAX_REPEAT = 10_000
_COUNT_KEYS = ("minItems", "maxItems", "minContains", "maxContains", "minProperties", "maxProperties")
_QUANTIFIER = re.compile(r"(?<!\\)\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_LARK_REPEAT = re.compile(r"~\s*(\d+)(?:\s*\.\.\s*(\d+))?")


def _check_counts(node: Any, where: str, depth: int = 0) -> None:
    """Refuse counts and regex repeats in a JSON schema that would make its grammar huge."""
    if depth > 64:
        raise OptionsError(f"{where} is nested more than 64 levels deep: flatten the schema")
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}"
            if key in _COUNT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                if value > MAX_REPEAT:
                    raise OptionsError(
                        f"{here} is {value:,}, over the {MAX_REPEAT:,} a constrained answer can use: lower it (no "
                        "answer holds that many within the context)"
                    )
            elif key == "pattern" and isinstance(value, str):
                _check_repeats(value, here)
            else:
                _check_counts(value, here, depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_counts(value, f"{where}[{i}]", depth + 1)


def _check_repeats(text: str, where: str, lark: bool = False) -> None:
    """Refuse a regex (or a Lark grammar's ``~ n``) that repeats something more than MAX_REPEAT times, directly or
    through nested groups (``(a{1000}){1000}`` is a million)."""
    found = [m for m in _QUANTIFIER.finditer(text) if any(g and int(g) > MAX_REPEAT for g in m.groups())]
    if lark:
        found += [m for m in _LARK_REPEAT.finditer(text) if any(g and int(g) > MAX_REPEAT for g in m.groups())]
    if found:
        raise OptionsError(
            f"{where} has the repeat count {found[0].group(0)!r}, over the {MAX_REPEAT:,} a constrained answer can "
            "use: lower it (no answer holds that many repeats within the context)"
        )
    nested = _nested_repeats(text)
    if nested > 10 * MAX_REPEAT:
        raise OptionsError(
            f"{where} repeats a group {nested:,} times through nested counts, over the {10 * MAX_REPEAT:,} a "
            "constrained answer can use: lower the counts"
        )


def _nested_repeats(text: str) -> int:
    """The largest product of counts along a chain of nested groups in a regex (an estimate, not a full parser)."""
    stack = [1]  # per open group: the largest repeat product inside it
    worst, i = 1, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":  # a character class holds no groups or counts
            i += 1
            while i < len(text) and text[i] != "]":
                i += 2 if text[i] == "\\" else 1
            i += 1
            continue
        inner = 1
        if c == "(":
            stack.append(1)
            i += 1
            continue
        if c == ")":
            inner = stack.pop() if len(stack) > 1 else 1
            i += 1
        else:
            i += 1
        m = _QUANTIFIER.match(text, i)
        count = max(int(g) for g in m.groups() if g) if m else 1
        value = inner * max(count, 1)
        stack[-1] = max(stack[-1], value)
        worst = max(worst, value)
        if m:
            i = m.end()
    return worst


def _range(f: Field) -> str:
    return f"{'(' if f.low_open else '['}{_num(f.low)}, {_num(f.high)}]"


def _num(x: float | None) -> str:
    return "-inf" if x is None else (str(int(x)) if float(x).is_integer() else str(x))


def _checked_init(init):
    """Wrap the dataclass ``__init__`` so unknown keywords are an OptionsError (with a hint), not a TypeError."""

    @functools.wraps(init)
    def __init__(self, *args: Any, **values: Any) -> None:
        known = {f.name for f in fields(GenerationOptions)}
        for key in values:
            if key not in known:
                raise GenerationOptions._unknown(key)
        if len(args) > len(known):
            raise OptionsError(f"GenerationOptions takes at most {len(known)} values, got {len(args)}: use keywords")
        init(self, *args, **values)

    return __init__


GenerationOptions.__init__ = _checked_init(GenerationOptions.__init__)  # type: ignore[method-assign]
