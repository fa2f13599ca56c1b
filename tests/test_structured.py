"""Structured output: json_schema, regex and Lark grammar through onnxruntime-genai's guidance, on the tiny model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import phi_onnx
from phi_onnx import GenerationOptions, OptionsError, OutputError

# Schemas that force termination: enums, bounded strings and integers, no extra properties.
RECEIPT = {
    "type": "object",
    "properties": {
        "shop": {"type": "string", "maxLength": 12},
        "items": {"type": "integer", "minimum": 0, "maximum": 20},
        "paid": {"enum": ["cash", "card"]},
    },
    "required": ["shop", "items", "paid"],
    "additionalProperties": False,
}
PROMPTS = ["Extract the receipt.", "What does the receipt say?", "Read it.", "Total?", "Shop name and items."]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
        ({"json_schema": [1, 2]}, "json_schema must be a JSON object"),
        ({"json_schema": {"a": float("nan")}}, "json_schema cannot be written as JSON"),
        ({"json_schema": {"type": "object"}, "regex": "a+"}, "give at most one of json_schema, regex and grammar"),
        ({"regex": ""}, "regex must be a non-empty string"),
        ({"grammar": 5}, "grammar must be a non-empty string"),
    ],
)
def test_malformed_constraints_are_options_errors(values, message):
    with pytest.raises(OptionsError, match=re.escape(message)):
        GenerationOptions(**values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"json_schema": {"type": "strin"}}, "json_schema is not usable: Invalid type: strin"),
        ({"regex": "[a-"}, "regex is not usable"),
        ({"grammar": "start: ???"}, "grammar is not usable"),
    ],
)
def test_constraints_llguidance_rejects_are_refused_before_any_image_work(tiny_model, example_image, monkeypatch,
                                                                         values, message):  # fmt: skip
    import phi_onnx.preprocess as model_module  # every HD transform goes through this module

    calls = []
    monkeypatch.setattr(model_module, "preprocess_images", lambda *a, **k: calls.append(1))
    with pytest.raises(OptionsError, match=re.escape(message)) as info:
        tiny_model.generate("x", images=[example_image], **values)
    assert calls == [] and "\n" not in str(info.value)


def test_compact_json_is_the_default_and_the_users_x_guidance_wins():
    kind, data = GenerationOptions(json_schema={"type": "object"}).guidance()
    assert kind == "json_schema" and json.loads(data)["x-guidance"] == {"whitespace_flexible": False}
    mine = {"type": "object", "x-guidance": {"whitespace_flexible": True}}
    assert json.loads(GenerationOptions(json_schema=mine).guidance()[1])["x-guidance"]["whitespace_flexible"] is True
    assert GenerationOptions(regex="a+").guidance() == ("regex", "a+")
    assert GenerationOptions(grammar='start: "a"').guidance() == ("lark_grammar", 'start: "a"')
    assert GenerationOptions().guidance() is None


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_schema_constrained_answer_is_valid_and_compact(tiny_model, prompt):
    result = tiny_model.generate(prompt, json_schema=RECEIPT, max_new_tokens=80)
    assert result.finish_reason == "stop", result.text
    value = result.json()
    assert set(value) == {"shop", "items", "paid"} and value["paid"] in ("cash", "card")
    assert 0 <= value["items"] <= 20 and len(value["shop"]) <= 12
    assert not re.search(r"[\n\t]", result.text), "compact JSON: no whitespace runs between tokens"


def test_an_object_schema_alone_ends_or_is_cut_by_length_and_json_says_so(tiny_model):
    result = tiny_model.generate("x", json_schema={"type": "object"}, max_new_tokens=6)
    if result.finish_reason == "stop":
        assert isinstance(result.json(), dict)
    else:
        with pytest.raises(OutputError, match=r"stopped at max_new_tokens \(6\) before the JSON value was complete"):
            result.json()


def test_json_of_unconstrained_text_says_how_to_get_json(tiny_model):
    result = tiny_model.generate("hello", max_new_tokens=3)
    with pytest.raises(OutputError, match="pass json_schema"):
        result.json()


def test_regex_and_grammar_constrain_the_answer(tiny_model):
    for prompt in PROMPTS:
        text = tiny_model.generate(prompt, regex=r"[0-9]{3}-[0-9]{4}", max_new_tokens=20).text
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text), text
        answer = tiny_model.generate(prompt, grammar='start: "yes" | "no" | "maybe"', max_new_tokens=10)
        assert answer.text in ("yes", "no", "maybe") and answer.finish_reason == "stop"


def test_a_constrained_stream_equals_the_generation(tiny_model, example_image):
    options = {"json_schema": RECEIPT, "max_new_tokens": 80, "num_crops": 1}
    chunks = list(tiny_model.stream("Extract.", images=[example_image], **options))
    whole = tiny_model.generate("Extract.", images=[example_image], **options)
    assert "".join(c.text for c in chunks) == whole.text and chunks[-1].finish_reason == whole.finish_reason
    whole.json()


def test_chat_turns_take_a_schema(tiny_model, example_image):
    chat = tiny_model.chat(max_new_tokens=80)
    first = chat.send("Describe it.", images=[example_image], max_new_tokens=4)
    second = chat.send("Now as JSON.", json_schema=RECEIPT)
    assert first.finish_reason in ("stop", "length") and set(second.json()) == {"shop", "items", "paid"}
    assert chat.messages[-1]["content"] == second.text


def test_cli_json_schema_from_a_file_and_inline(tiny_model_dir, tmp_path):
    schema = tmp_path / "receipt.json"
    schema.write_text(json.dumps(RECEIPT))
    for value in (str(schema), json.dumps(RECEIPT)):
        done = subprocess.run(
            [sys.executable, "-m", "phi_onnx", "run", str(tiny_model_dir), "Extract.", "--json", "--json-schema", value,
             "--max-new-tokens", "80"], capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        assert data["value"] == json.loads(data["text"]) and set(data["value"]) == {"shop", "items", "paid"}
    missing = subprocess.run(
        [sys.executable, "-m", "phi_onnx", "run", str(tiny_model_dir), "x", "--json-schema", str(tmp_path / "no.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 2 and "cannot be read (No such file or directory)" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_output_error_is_a_value_error():
    assert issubclass(phi_onnx.OutputError, ValueError) and issubclass(phi_onnx.OutputError, phi_onnx.PhiOnnxError)


@pytest.mark.parametrize(
    "option, message",
    [
        ({"json_schema": {"type": "array", "minItems": 10**9}}, "json_schema.minItems is 1,000,000,000"),
        ({"json_schema": {"properties": {"a": {"type": "string", "pattern": "x{20000}"}}}}, "properties.a.pattern"),
        ({"regex": "a{1000000}"}, "repeat count '{1000000}'"),
        ({"regex": "(ab{1000}){1001}"}, "1,001,000 times through nested counts"),
        ({"grammar": 'start: "a" ~ 1000000'}, "'~ 1000000'"),
    ],
)
def test_constraints_that_would_unroll_into_huge_grammars_are_refused(tiny_model, option, message):
    """llguidance unrolls counted repeats: a tester's minItems of 10^9 ate the host's memory (the worker was killed
    after a minute). Refused before compiling, with the path to the count."""
    from phi_onnx.errors import OptionsError

    with pytest.raises(OptionsError, match=re.escape(message)):
        tiny_model.generate("Hi", max_new_tokens=4, **option)


def test_ordinary_counts_still_constrain(tiny_model):
    answer = tiny_model.generate("Phone:", max_new_tokens=16, regex=r"\d{3}-\d{4}( x\d{1,5})?")
    assert re.fullmatch(r"\d{3}-\d{4}( x\d{1,5})?", answer.text), answer.text


def test_a_regex_that_does_not_parse_says_why(tiny_model):
    """llguidance puts the reason after a caret diagram; the one-line error keeps it."""
    for option in ({"regex": "(("}, {"json_schema": {"type": "string", "pattern": "(("}}):
        with pytest.raises(OptionsError, match="regex parse error: unclosed group"):
            tiny_model.generate("x", max_new_tokens=2, **option)
