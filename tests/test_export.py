"""The export step: our PyTorch Phi-3-V is faithful, checkpoints round-trip, builds are atomic, graphs match PyTorch."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from phi_onnx.errors import ExportError
from phi_onnx_export.build import build, check_plan
from phi_onnx_export.checkpoint import load_checkpoint, save_checkpoint
from phi_onnx_export.modeling import hd_features_reference, merge_embeddings
from phi_onnx_export.tiny import make_config, random_model, write_random_checkpoint
from phi_onnx_export.verify import verify


@pytest.fixture(scope="module")
def torch_tiny(tiny_checkpoint):
    model, cfg = load_checkpoint(tiny_checkpoint)
    return model, cfg


def test_clip_tower_matches_transformers_hidden_states_minus_2(torch_tiny):
    """Our CLIP equals transformers' CLIPVisionModel hidden_states[-2] without CLS, on the same weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model, cfg = torch_tiny
    v = cfg.vision
    hf = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads,
            image_size=336,
            patch_size=14,
            hidden_act="quick_gelu",
            layer_norm_eps=v.layer_norm_eps,
        )
    ).eval()
    ours = model.vision.img_processor.vision_model
    state = ours.state_dict()
    target = hf.state_dict()
    prefix = next(p for p in ("vision_model.", "") if p + "pre_layrnorm.weight" in target)
    missing = hf.load_state_dict({prefix + k: w for k, w in state.items()}, strict=False)
    assert not [k for k in missing.missing_keys if "position_ids" not in k], missing
    pixels = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        want = hf(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = ours(pixels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "sizes",
    [[[1008, 1344]], [[336, 4368], [1344, 336]], [[672, 672], [336, 336], [2688, 672]]],
    ids=["one", "two-mixed", "three"],
)
def test_vectorised_hd_transform_equals_reference_loop(torch_tiny, sizes):
    model, _ = torch_tiny
    sizes_t = torch.tensor(sizes)
    slots = int(max((h // 336) * (w // 336) + 1 for h, w in sizes)) + 2
    pixels = torch.randn(len(sizes), slots, 3, 336, 336)
    with torch.no_grad():
        fast = model.image_features(pixels, sizes_t)
        ref = hd_features_reference(model.vision, pixels, sizes_t)
    expect = sum((h // 336 * (w // 336) + 1) * 144 + 1 + (h // 336 + 1) * 12 for h, w in sizes)
    assert fast.shape == (expect, model.config.text.hidden_size)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_merge_embeddings_places_features_in_order():
    emb = torch.nn.Embedding(10, 3)
    ids = torch.tensor([[4, -1, -1, 5, -2, 6]])
    feats = torch.arange(9, dtype=torch.float32).reshape(3, 3) + 100
    out = merge_embeddings(ids, feats, emb)
    torch.testing.assert_close(out[0, [1, 2, 4]], feats)
    torch.testing.assert_close(out[0, [0, 3, 5]], emb.weight[[4, 5, 6]])
    text_only = merge_embeddings(torch.tensor([[1, 2]]), torch.zeros(0, 3), emb)
    torch.testing.assert_close(text_only[0], emb.weight[[1, 2]])


def test_checkpoint_roundtrip_and_determinism(tmp_path):
    a = write_random_checkpoint(tmp_path / "a", seed=3)
    b = write_random_checkpoint(tmp_path / "b", seed=3)
    c = write_random_checkpoint(tmp_path / "c", seed=4)

    def digest(folder: Path) -> str:
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()

    assert digest(a) == digest(b), "same size and seed must give the same bytes"
    assert digest(a) != digest(c)
    config = json.loads((a / "config.json").read_text())
    assert config["model_type"] == "phi3_v"
    assert config["img_processor"]["vision_config"]["hidden_size"] == 32
    model, _ = load_checkpoint(a)
    fresh = random_model(make_config("tiny", 3), 3)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_checkpoint_keys_follow_the_official_layout(tiny_checkpoint):
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight" in keys
    assert "model.vision_embed_tokens.img_processor.vision_model.pre_layrnorm.weight" in keys
    assert {"model.vision_embed_tokens.sub_GN", "model.vision_embed_tokens.glb_GN"} <= keys
    assert "model.vision_embed_tokens.img_projection.2.weight" in keys
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.qkv_proj.weight", "lm_head.weight"} <= keys


def test_checkpoint_without_vision_model_prefix_and_wte_alias_loads(tmp_path, torch_tiny):
    """The other key style: CLIP keys without ``vision_model.``; the embedding table stored as ``wte``."""
    from safetensors.torch import load_file, save_file

    src = write_random_checkpoint(tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    renamed = {}
    for key, value in state.items():
        key = key.replace("img_processor.vision_model.", "img_processor.")
        key = key.replace("model.embed_tokens.weight", "model.vision_embed_tokens.wte.weight")
        renamed[key] = value
    save_file(renamed, str(src / "model.safetensors"))
    model, _ = load_checkpoint(src)
    torch.testing.assert_close(model.embed_tokens.weight, state["model.embed_tokens.weight"])


def test_unknown_and_missing_keys_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    src = write_random_checkpoint(tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    state.pop("model.vision_embed_tokens.glb_GN")
    state["model.surprise.weight"] = torch.zeros(1)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ExportError, match=r"1 unknown keys \(model.surprise.weight\); 1 missing keys \(.*glb_GN\)"):
        load_checkpoint(src)


def test_save_reloads_what_it_saved(tmp_path, torch_tiny):
    model, cfg = torch_tiny
    save_checkpoint(model, cfg, tmp_path / "copy")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "copy" / name).write_text("{}")
    again, _ = load_checkpoint(tmp_path / "copy")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: (d / "config.json").unlink(), "missing config.json"),
        (lambda d: [p.unlink() for p in d.glob("*.safetensors")], r"missing \*\.safetensors"),
        (lambda d: (d / "tokenizer.json").unlink(), "missing tokenizer.json"),
        (lambda d: (d / "config.json").write_text('{"model_type": "phi3"}'), "model_type 'phi3', not 'phi3_v'"),
        (lambda d: (d / "config.json").write_text("{nope"), "not valid JSON"),
    ],
    ids=["no-config", "no-weights", "no-tokenizer", "not-phi3v", "bad-json"],
)
def test_bad_checkpoints_are_refused_before_writing(tmp_path, tiny_checkpoint, change, message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    change(ckpt)
    with pytest.raises(ExportError, match=message):
        build(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "a refused build leaves nothing behind"


@pytest.mark.parametrize(
    ("precision", "device", "message"),
    [
        ("fp8", "cpu", "unknown precision 'fp8'"),
        ("fp32", "tpu", "unknown device 'tpu'"),
        ("fp16", "cpu", "fp16 does not run on the CPU"),
    ],
)
def test_bad_precision_or_device(tmp_path, tiny_checkpoint, precision, device, message):
    with pytest.raises(ExportError, match=message):
        check_plan(tiny_checkpoint, tmp_path / "out", precision, device, force=False)


def test_non_empty_output_needs_force(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not empty: choose another --output or pass --force"):
        build(tiny_checkpoint, out)
    assert (out / "keep.txt").read_text() == "user data"


def test_failed_build_leaves_nothing_behind(tmp_path, tiny_checkpoint, monkeypatch):
    import phi_onnx_export.build as b

    def boom(*args, **kwargs):
        raise RuntimeError("decoder build failed")

    monkeypatch.setattr(b, "build_decoder", boom)
    with pytest.raises(RuntimeError, match="decoder build failed"):
        build(tiny_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_built_folder_layout(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    for part in ("vision", "embedding", "text"):
        assert f"phi-3-v-instruct-{part}.onnx" in names
    assert {"genai_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((tiny_model_dir / "genai_config.json").read_text())
    assert cfg["model"]["type"] == "phi3v"
    assert cfg["model"]["decoder"]["hidden_size"] == 64
    assert 32007 in cfg["model"]["eos_token_id"]
    assert cfg["search"]["max_length"] <= 8192


def test_onnxruntime_genai_generates_from_the_built_folder(tiny_model_dir, example_image):
    """What a new user does after `phi-onnx export tiny`: og's own processor and generator on the folder."""
    import onnxruntime_genai as og

    model = og.Model(str(tiny_model_dir))
    processor = model.create_multimodal_processor()
    inputs = processor(
        "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n", images=og.Images.open(str(example_image))
    )
    prompt_len = np.array(inputs["input_ids"].as_numpy()).shape[1]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + 5)
    generator = og.Generator(model, params)
    generator.set_inputs(inputs)
    tokens = []
    while not generator.is_done() and len(tokens) < 5:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert len(tokens) == 5
    assert all(0 <= t < 32064 for t in tokens)


def test_parity_fp32_against_pytorch(tiny_model_dir, tiny_checkpoint):
    """Token counts for 8 shapes (10:1 .. 1:10), prompt logits within 1e-4, 32 greedy tokens, 0/1/3 images."""
    report = verify(tiny_model_dir, tiny_checkpoint)
    print(report.render())
    assert report.passed, report.render()
    names = [c.name for c in report.checks]
    assert "image-token counts" in names
    for case in ("text only", "1 image", "3 images"):
        assert any(n.startswith(f"{case}: prompt logits") for n in names)
        assert any(
            n == f"{case}: greedy tokens" and c.detail.startswith("32 tokens") for n, c in zip(names, report.checks)
        )


def test_parity_detects_a_wrong_vision_graph(tmp_path, tiny_model_dir, tiny_checkpoint):
    """The parity check can fail: perturb one separator in the checkpoint and every image case must mismatch."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    state["model.vision_embed_tokens.glb_GN"] = state["model.vision_embed_tokens.glb_GN"] + 1.0
    save_file(state, str(ckpt / "model.safetensors"))
    report = verify(
        tiny_model_dir,
        ckpt,
        new_tokens=4,
        cases={"1 image": ((600, 400),), "text only": ()},
        count_shapes=((600, 400),),
    )
    failed = {c.name for c in report.checks if not c.passed}
    assert not report.passed
    assert any(n.startswith("1 image: prompt logits") for n in failed)
    assert not any(n.startswith("text only") for n in failed), "text-only prompts do not touch the vision graph"


def test_int4_build_reports_agreement(tmp_path, tiny_checkpoint):
    out = build(tiny_checkpoint, tmp_path / "int4", precision="int4", device="cpu", log=lambda m: None)
    text = (out / "phi-3-v-instruct-text.onnx").read_bytes()
    assert b"MatMulNBits" in text
    assert b"DynamicQuantizeMatMul" in text, "CPU int4 builds get the int8 prompt path by default"
    assert b"MatMulInteger" in (out / "phi-3-v-instruct-vision.onnx").read_bytes(), "and int8 vision weights"
    import onnx

    graph = onnx.load(str(out / "phi-3-v-instruct-text.onnx"), load_external_data=False).graph
    # the int8 twins' Ifs and (where the kernels were built) the causal attention's read one prompt condition
    prompt_ifs = [n for n in graph.node if n.op_type == "If" and n.name.endswith(("/dual", "/prompt_or_step"))]
    assert prompt_ifs and {n.input[0] for n in prompt_ifs} == {"/prompt/is_prompt"}
    assert sum(n.op_type == "Shape" and n.name.startswith("/prompt/") for n in graph.node) == 1
    report = verify(out, tiny_checkpoint, new_tokens=8, cases={"1 image": ((600, 400),)}, count_shapes=((600, 400),))
    assert report.precision == "int4"
    info = [c for c in report.checks if not c.asserted]
    assert any("greedy agreement" in c.name for c in info)
    assert report.passed  # only the token counts are asserted for int4
    assert "reported, NOT checked (pass --min-agreement to check it)" in report.render()
    assert "all checks passed" not in report.render()
    strict = verify(
        out, tiny_checkpoint, new_tokens=8, cases={"1 image": ((600, 400),)}, count_shapes=((600, 400),),
        min_agreement=1.0,
    )  # fmt: skip
    agreement = next(c for c in strict.checks if "greedy agreement" in c.name)
    assert agreement.asserted and "(at least 100% required)" in agreement.detail
    assert strict.passed == agreement.passed == agreement.detail.startswith("100%")


def test_failed_export_tiny_leaves_nothing_behind(tmp_path):
    from phi_onnx.cli import main

    done = CliRunner().invoke(main, ["export", "tiny", "--output", str(tmp_path / "t3"), "--precision", "int8"])
    assert done.exit_code == 2 and "unknown precision 'int8'" in done.output
    assert list(tmp_path.iterdir()) == [], "no checkpoint folder, no model folder"
    # fp16 on the CPU is refused the same way
    done = CliRunner().invoke(main, ["export", "tiny", "--output", str(tmp_path / "t4"), "--precision", "fp16"])
    assert done.exit_code == 2 and list(tmp_path.iterdir()) == []


def test_built_folders_respect_the_umask(tmp_path, tiny_checkpoint):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = build(tiny_checkpoint, tmp_path / "perm", log=lambda m: None)
        checkpoint = write_random_checkpoint(tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in checkpoint.iterdir()} == {0o644}, "safetensors alone writes 0600"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes == {0o644}, modes


def test_the_built_folder_carries_the_checkpoints_own_tokenizer_files(tmp_path, tiny_checkpoint, tiny_model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tiny_model_dir / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name


def test_fp16_cuda_build_has_a_consistent_dtype_chain_and_runs(tmp_path, tiny_checkpoint, tiny_model, example_image):
    """The CUDA fp16 folder: fp16 pixel_values -> image_features -> inputs_embeds, as onnxruntime-genai requires.
    Its graphs also run on the CPU provider, which lets us check it answers like the fp32 build."""
    import phi_onnx
    from phi_onnx.hub.modelinfo import inspect_model

    out = build(tiny_checkpoint, tmp_path / "fp16", precision="fp16", device="cuda", log=lambda m: None)
    info = inspect_model(out)
    assert info.vision.input("pixel_values").dtype == "float16"
    assert info.vision.output("image_features").dtype == info.embedding.input("image_features").dtype == "float16"
    assert info.embedding.output("inputs_embeds").dtype == info.decoder.input("inputs_embeds").dtype == "float16"
    half = phi_onnx.load(out, device="cpu")
    a = half.generate("What is this?", images=[example_image], num_crops=4, max_new_tokens=8)
    b = tiny_model.generate("What is this?", images=[example_image], num_crops=4, max_new_tokens=8)
    assert a.image_tokens == b.image_tokens == 757
    agree = sum(x == y for x, y in zip(a.token_ids, b.token_ids))
    assert agree >= 6, f"fp16 agrees with fp32 on {agree}/8 greedy tokens"


def test_int4_without_int8_prefill_has_no_int8_decoder_copy_but_int8_vision(tmp_path, tiny_checkpoint, tiny_model):
    out = build(tiny_checkpoint, tmp_path / "lean", precision="int4", device="cpu", int8_prefill=False, log=print)
    text = (out / "phi-3-v-instruct-text.onnx").read_bytes()
    assert b"DynamicQuantizeMatMul" not in text and b"MatMulNBits" in text
    # the lean folder's vision graph is int8 too: smaller and faster than fp32
    assert b"MatMulInteger" in (out / "phi-3-v-instruct-vision.onnx").read_bytes()
    import phi_onnx

    assert phi_onnx.load(out, device="cpu").generate("Hi", max_new_tokens=3).generated_tokens == 3
    with pytest.raises(ExportError, match="int8-prefill applies to --precision int4 --device cpu"):
        check_plan(tiny_checkpoint, tmp_path / "x", "fp32", "cpu", force=False, int8_prefill=True)


def _graph_tensors(graph, acc: dict) -> dict:
    """Every tensor of a graph (initializers, attribute tensors, subgraphs) by a stable name, as arrays."""
    import onnx
    from onnx import numpy_helper

    for t in graph.initializer:
        acc[t.name] = numpy_helper.to_array(t)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _graph_tensors(attr.g, acc)
            elif attr.type == onnx.AttributeProto.TENSOR:
                acc[f"{node.name}/{attr.name}"] = numpy_helper.to_array(attr.t)
    return acc


def test_cpu_int4_quantization_equals_the_model_builders_int4(tmp_path, torch_tiny, tiny_checkpoint):
    """CPU int4 builds run the builder in fp32 and quantize one weight at a time (quantize_decoder), which needs
    memory for one weight where the builder's own int4 pass holds the model several times over. Without the int8
    twins the result is exactly the builder's int4 decoder; with them, every body MatMulNBits is an If whose prompt
    branch carries int8 weights within half an int8 step of the int4 weights."""
    import onnx
    from onnx import helper

    from phi_onnx_export.build import BuildPlan, build_decoder
    from phi_onnx_export.cpu_int4 import quantize_decoder

    model, _ = torch_tiny
    text = tmp_path / "hf-text"
    model.lm.save_pretrained(text)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tiny_checkpoint / name, text / name)
    built = {}
    for precision in ("fp32", "int4"):
        folder = tmp_path / precision
        plan = BuildPlan(tiny_checkpoint, folder, precision, "cpu")
        build_decoder(text, folder, "text.onnx", plan, tmp_path / "cache")
        built[precision] = folder / "text.onnx"
    (tmp_path / "ours").mkdir()
    quantize_decoder(built["fp32"], tmp_path / "ours" / "text.onnx", int8_prefill=False)
    theirs, ours = (onnx.load(str(p)) for p in (built["int4"], tmp_path / "ours" / "text.onnx"))

    def nodes(m):
        return [(n.op_type, n.name, list(n.input), list(n.output)) for n in m.graph.node]

    assert nodes(ours) == nodes(theirs) and sum(n[0] == "MatMulNBits" for n in nodes(ours)) == 11
    for a, b in zip(theirs.graph.node, ours.graph.node, strict=True):
        if a.op_type != "If":
            assert {x.name: helper.get_attribute_value(x) for x in a.attribute} == {
                x.name: helper.get_attribute_value(x) for x in b.attribute
            }, a.name
    want, got = _graph_tensors(theirs.graph, {}), _graph_tensors(ours.graph, {})
    assert sorted(want) == sorted(got)
    for name, value in want.items():
        assert value.dtype == got[name].dtype and np.array_equal(value, got[name]), name

    (tmp_path / "dual").mkdir()
    quantize_decoder(built["fp32"], tmp_path / "dual" / "text.onnx", int8_prefill=True)
    dual = onnx.load(str(tmp_path / "dual" / "text.onnx"))
    twins = [n for n in dual.graph.node if n.op_type == "If" and n.name.endswith("/dual")]
    assert len(twins) == 10 and not any("lm_head" in n.name for n in twins)
    for node in twins:
        branches = {a.name: a.g for a in node.attribute}
        (int8,) = branches["then_branch"].node
        (int4,) = branches["else_branch"].node
        assert (int8.op_type, int4.op_type) == ("DynamicQuantizeMatMul", "MatMulNBits")
        w4 = want[int4.input[1]]  # the builder's packed int4 weights and scales for this MatMul
        scales = want[int4.input[2]].reshape(w4.shape[0], -1)
        q = np.stack([w4 & 0x0F, w4 >> 4], -1).reshape(w4.shape[0], scales.shape[1], -1).astype(np.float32) - 8
        k = {a.name: a.i for a in int4.attribute}["K"]
        weights = (q * scales[:, :, None]).reshape(w4.shape[0], -1)[:, :k].T
        tensors = _graph_tensors(branches["then_branch"], {})
        w8, s8 = tensors[int8.input[1]], tensors[int8.input[2]]
        assert np.abs(w8 * s8 - weights).max() <= 0.5 * s8.max() + 1e-7, node.name


def test_same_checkpoint_builds_to_the_same_bytes(tmp_path, tiny_checkpoint):
    a = build(tiny_checkpoint, tmp_path / "a", log=lambda m: None)
    b = build(tiny_checkpoint, tmp_path / "b", log=lambda m: None)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    differ = [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]
    assert differ == [], f"non-deterministic build output: {differ}"


def test_export_is_quiet_by_default_and_verbose_with_v(tmp_path):
    import subprocess
    import sys

    def run(*flags: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-m", "phi_onnx", "export", *flags, "tiny", "--output", str(tmp_path / f"m{len(flags)}")],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stderr.splitlines()

    quiet = run()
    assert quiet and all(line.startswith("[export] ") for line in quiet), quiet
    assert any(not line.startswith("[export] ") for line in run("-v")), "-v shows the builder's own output"


def test_the_tiny_tokenizer_behaves_like_phi3s(tiny_model, tiny_model_dir):
    """SentencePiece-like, as the real Phi-3 tokenizer: "▁" before each chunk (also after a special token), byte
    fallback, <|assistant|> strips whitespace to its right, add_bos_token (added by the processor, not by encode)."""
    encode = tiny_model._tokenizer.encode
    assert encode("<|user|>\n") == [32010, 29871, 13]
    assert encode("\n") == [29871, 13]
    assert encode("<|assistant|>\n") == [32001]
    assert encode("<|end|>\n<|assistant|>\n") == [32007, 29871, 13, 32001]
    assert encode("€") == [29871, 3 + 0xE2, 3 + 0x82, 3 + 0xAC], "byte fallback, <0xE2><0x82><0xAC>"
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["chat_template"] and config["added_tokens_decoder"]


def test_transformers_and_onnxruntime_genai_tokenize_the_tiny_tokenizer_alike(tiny_model, tiny_checkpoint):
    from transformers import AutoTokenizer

    from phi_onnx_export.tiny import _CORPUS

    hf = AutoTokenizer.from_pretrained(tiny_checkpoint)
    texts = [*_CORPUS.splitlines(), "What is shown? ünï € 日本 42", "<|user|>\nHi<|end|>\n<|assistant|>\n", "a, b; c."]
    for text in texts:
        assert hf(text)["input_ids"] == [1, *tiny_model._tokenizer.encode(text)], text


def test_prompt_ids_follow_microsofts_processor_bos_convention(tiny_model_dir, example_image):
    import phi_onnx

    ms = phi_onnx.load(tiny_model_dir, device="cpu")
    og_ids = phi_onnx.load(tiny_model_dir, device="cpu", token_ids="onnxruntime-genai")
    one_crop = ms.options.updated(num_crops=1)
    for images, bos in (([], 1), ([example_image], 2), ([example_image] * 3, 4)):
        ids = ms.prepare("What is it?", images, options=one_crop).inputs["input_ids"][0]
        assert ids[0] == 1 and int((ids == 1).sum()) == bos, (len(images), ids[:8])
        for k in range(1, len(images) + 1):  # <s> right after every image
            assert ids[np.flatnonzero(ids == -k)[-1] + 1] == 1
        plain = og_ids.prepare("What is it?", images, options=one_crop).inputs["input_ids"][0]
        assert 1 not in plain.tolist() and len(ids) == len(plain) + bos
    with pytest.raises(phi_onnx.OptionsError, match="unknown token_ids"):
        phi_onnx.load(tiny_model_dir, device="cpu", token_ids="hf")
