"""Random-weight Phi-3-V checkpoints with the real architecture, in the official layout.

No machine of this project can download weights, so every test builds one of these and runs the real pipeline on it.
Same size and seed, same bytes: the weights come from a seeded generator and the tokenizer is trained here on a fixed
corpus.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from phi_onnx_export.config import Phi3VConfig, TextConfig, VisionConfig

SPECIAL_TOKENS = (  # ids 32000..32010, as in Phi-3
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)
BASE_VOCAB = 32000
VOCAB_SIZE = 32064

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. What is shown in this image? Describe the picture in detail.
The chart shows sales by month: January, February, March, April, May, June, July, August, September, October,
November and December. The table has three columns and twelve rows. A photo of a cat sitting on a red sofa.
A document with a title, two paragraphs and a signature. The graph rises from 10 to 42 percent over 5 years.
There are 3 people in the picture, standing in front of a white house with a green door and blue windows.
Question: how many cars are parked on the street? Answer: four cars, two of them are black.
Summarize the frames of the video: a man walks into the room, sits down, opens a laptop and starts typing.
The receipt lists coffee 3.50, sandwich 7.25, total 10.75. The map shows rivers, roads and mountains.
"""


@dataclass(frozen=True)
class Size:
    vision: VisionConfig
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    dtype: torch.dtype = torch.float32  # the checkpoint's stored dtype


SIZES: dict[str, Size] = {
    # Every test uses `tiny`: seconds to build on 2 CPU cores. Head size 16 in both towers, the smallest that CPU builds
    # route to phi-onnx's own attention kernels (phi_onnx_export.ops), so the tests run them.
    "tiny": Size(VisionConfig(32, 64, 3, 2), hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4),
    # Compute dominates overhead on a 2-core CPU; the CPU benchmark uses it. The vision tower (384 wide, 5 layers, head
    # size 64 as in CLIP-L) keeps the real model's vision/decoder prefill FLOP ratio: 0.32 for one 600x400 image at
    # 16 crops (13 crops, 1,936 tokens; Phi-3.5-vision 0.33), 0.42 for 17 crops (0.43); see benchmarks/flops.py.
    # Until issue 12 it was 256 wide x 4 layers (ratio 0.13; 0.17 at 17 crops).
    "bench": Size(VisionConfig(384, 1536, 5, 6), hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16),
    # The real dimensions of Phi-3-vision (CLIP ViT-L/14-336 and Phi-3-mini), random weights.
    # Stored in bfloat16 like the published checkpoints (8.3 GB; fp32 would be 16.6 GB), written tensor by tensor.
    "full": Size(
        VisionConfig(), hidden=3072, intermediate=8192, layers=32, heads=32, kv_heads=32, dtype=torch.bfloat16
    ),
}


def make_config(size: str, seed: int = 0) -> Phi3VConfig:
    s = SIZES[size]
    gen = torch.Generator().manual_seed(seed + 1)
    half = s.hidden // s.heads // 2
    short = (1.0 + 0.1 * torch.rand(half, generator=gen)).tolist()
    long = torch.linspace(1.0, 40.0, half).tolist()
    text = TextConfig(
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_theta=10000.0,
        short_factor=tuple(round(x, 6) for x in short),
        long_factor=tuple(round(x, 6) for x in long),
    )
    return Phi3VConfig(text=text, vision=s.vision)


def random_weights(cfg: Phi3VConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, fp32 tensor)`` for every parameter of ``Phi3VModel(cfg)``, one at a time, in name order.

    Seeded random weights scaled so activations stay O(1) and logits are peaked (greedy decoding is then well
    separated from ties, which keeps ONNX/PyTorch token parity meaningful). One tensor at a time, so a full-size
    checkpoint never needs the whole model in memory.
    """
    from phi_onnx_export.modeling import Phi3VModel

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Phi3VModel(cfg).named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) == 1 and ("norm" in name or "layer_norm" in name or "layrnorm" in name):
            base = 1.0 if name.endswith("weight") else 0.0
            yield name, base + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("bias"):
            yield name, 0.02 * torch.randn(shape, generator=gen)
        elif "lm_head" in name:
            yield name, torch.randn(shape, generator=gen) * (6.0 / math.sqrt(shape[-1]))
        elif ("embed" in name and "patch" not in name) or name.endswith("_GN"):
            yield name, torch.randn(shape, generator=gen) * 0.5
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            yield name, torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def random_model(cfg: Phi3VConfig, seed: int = 0):
    """A Phi3VModel with the seeded random weights of :func:`random_weights`."""
    from phi_onnx_export.modeling import Phi3VModel

    torch.manual_seed(seed)
    model = Phi3VModel(cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in random_weights(cfg, seed):
            params[name].copy_(tensor)
    return model.eval()


def _pseudo_words():
    """Endless distinct words ("▁ka", "▁kabo", ...) so random weights decode to readable gibberish."""
    syllables = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]
    n = 0
    while True:
        word, i = "", n
        while True:
            word += syllables[i % len(syllables)]
            i //= len(syllables)
            if i == 0:
                break
        yield "\u2581" + word  # SentencePiece spells a leading space as U+2581
        n += 1


SPACE_ID = 29871  # "▁" in Phi-3's (Llama's) vocabulary: `<|user|>\n` is 32010, 29871, 13
_RSTRIP = {"<|assistant|>", *(f"<|placeholder{k}|>" for k in range(1, 7))}  # strip whitespace to their right


def write_tokenizer(folder: Path, merges_wanted: int = 768) -> None:
    """A Llama-style SentencePiece BPE like Phi-3's, trained here on a fixed corpus.

    As the real tokenizer: "▁" is prepended to each text chunk (also right after a special token) and spaces become
    "▁"; characters outside the vocabulary fall back to byte tokens ``<0x00>``..``<0xFF>`` (ids 3..258, so ``\\n`` is
    13); "▁" is id 29871; the special tokens keep Phi-3's ids (0..2, 32000..32010), ``<|assistant|>`` and the
    placeholders strip whitespace to their right; ``add_bos_token`` is true.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    # Like SentencePiece's own splitting (by whitespace, script and digit), no merge crosses a word, a punctuation mark
    # or a digit boundary; onnxruntime-extensions' Llama tokenizer splits the same way.
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\u2581", behavior="merged_with_next"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(vocab_size=merges_wanted, show_progress=False, special_tokens=[])
    trainer_tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    alphabet = sorted((t for t in trained["vocab"] if len(t) == 1), key=lambda t: (t != "\u2581", t))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    # Ids in merge order, as in Llama's vocabulary: onnxruntime-extensions ranks merges by the merged token's id.
    merged = list(dict.fromkeys(a + b for a, b in merges))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for token in merged:
        vocab[token] = len(vocab)
    words = _pseudo_words()
    while len(vocab) < SPACE_ID:
        word = next(words)
        if word not in vocab:
            vocab[word] = len(vocab)  # filler no merge reaches, so "▁" and the specials get Phi-3's ids
    for token in alphabet:  # single characters from "▁" (29871) on, as in Llama's vocabulary
        vocab[token] = len(vocab)
    while len(vocab) < BASE_VOCAB:
        word = next(words)
        if word not in vocab:
            vocab[word] = len(vocab)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )  # fmt: skip
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t in _RSTRIP) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )  # add_bos_token, as in Phi-3's tokenizer.json
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "use_default_system_prompt": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in added
        },
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def write_random_checkpoint(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight Phi-3-V checkpoint in the official Hugging Face layout.

    Streams: each tensor is made, cast to the size's dtype and added to the current shard, and a shard is written
    once it reaches 2 GiB, so peak memory is about one shard (the `full` size never holds its 8.3 GB at once).
    """
    from safetensors.torch import save_file

    from phi_onnx_export.build import _apply_umask
    from phi_onnx_export.checkpoint import SHARD_LIMIT, official_key

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = make_config(size, seed)
    dtype = SIZES[size].dtype
    config = {**cfg.to_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
    shard_bytes = total = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"shard-{len(written) + 1}.tmp"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        written.append((name, sorted(shard)))
        shard, shard_bytes = {}, 0

    for name, tensor in random_weights(cfg, seed):
        tensor = tensor.to(dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > SHARD_LIMIT:
            flush()
        shard[official_key(name)] = tensor
        shard_bytes += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        os.replace(folder / written[0][0], folder / "model.safetensors")
    else:
        index: dict = {"metadata": {"total_size": total}, "weight_map": {}}
        for i, (tmp, keys) in enumerate(written, 1):
            final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
            os.replace(folder / tmp, folder / final)
            index["weight_map"].update(dict.fromkeys(keys, final))
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    write_tokenizer(folder)
    gen_cfg = {"bos_token_id": 1, "eos_token_id": [32000, 32007], "pad_token_id": 32000, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2, sort_keys=True) + "\n")
    _apply_umask(folder)  # safetensors writes its shards 0600
    return folder
