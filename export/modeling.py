"""Our own PyTorch Phi-3-V: the CLIP tower, the HD feature transform, the projector, and the Phi-3 decoder.

No remote code. The vision part is written here (its parameter names follow the official checkpoint, so the state
dict loads one to one); the decoder is transformers' ``Phi3ForCausalLM`` with LongRoPE. Two implementations of the
HD feature transform live side by side: :func:`hd_features_reference`, a straight per-image loop that mirrors the
Hugging Face code, and :meth:`ImageEmbedding.forward`, branch-free tensor arithmetic that traces into an ONNX graph
for any number of images and crop slots and skips the zero-padded crops. Tests hold them equal.
"""

from __future__ import annotations

import torch
from torch import nn

from phi_onnx_export.config import TOKENS_PER_CROP, Phi3VConfig, VisionConfig

GRID = 12  # merged cells per crop side (24 patches merged 2x2)


class ClipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, h, d // h).transpose(1, 2)

        # The scale on q (n x d values) rather than on the scores (h x n x n): the same result up to rounding (exactly
        # the same for CLIP-L's head size 64, a power of two), and the graph skips a pass over every score matrix.
        q = split(self.q_proj(x) * (d // h) ** -0.5)
        k, v = split(self.k_proj(x)), split(self.v_proj(x))
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class ClipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick_gelu


class ClipLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.self_attn = ClipAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight.to(patches.dtype)


class ClipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(cfg.num_hidden_layers))


class ClipVisionTransformer(nn.Module):
    """CLIP ViT with the official parameter names; returns ``hidden_states[-2]`` without the CLS token."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = ClipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # in checkpoints, never used

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers[:-1]:  # hidden_states[-2]: every layer but the last
            x = layer(x)
        return x[:, 1:]


class ClipWrapper(nn.Module):
    """Keeps the ``img_processor.vision_model.`` key prefix of the official checkpoint."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.vision_model = ClipVisionTransformer(cfg)


def merge_2x2(feats: torch.Tensor) -> torch.Tensor:
    """[crops, 576, C] -> [crops, 144, 4C]: cell (r, c) holds patches (2r+dh, 2c+dw) in (dh, dw) order."""
    n, _, c = feats.shape
    x = feats.reshape(n, GRID, 2, GRID, 2, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, GRID * GRID, 4 * c)


class ImageEmbedding(nn.Module):
    """Pixels of HD-transformed images to projected image-token features (``model.vision_embed_tokens``)."""

    def __init__(self, cfg: Phi3VConfig) -> None:
        super().__init__()
        dim = 4 * cfg.image_dim_out
        hidden = cfg.text.hidden_size
        self.img_processor = ClipWrapper(cfg.vision)
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))
        self.img_projection = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """[crops, 3, 336, 336] -> merged features [crops, 144, 4C]."""
        return merge_2x2(self.img_processor.vision_model(crops))

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Image features for all images, rank 2 ``[image_tokens, hidden]`` in image order.

        Args:
            pixel_values: ``[images, crop_slots, 3, 336, 336]``; slot 0 is the global image, then the local crops
                row-major, then zero padding (never computed here).
            image_sizes: ``[images, 2]`` int64, the padded HD height and width (multiples of 336).
        """
        n_img, slots = pixel_values.shape[0], pixel_values.shape[1]
        h = image_sizes[:, 0].long() // 336
        w = image_sizes[:, 1].long() // 336
        # Pick the crops in use (global + h*w tiles per image); padded slots are never run through CLIP.
        n_crops = h * w + 1
        crop_end = torch.cumsum(n_crops, 0)
        crop_start = crop_end - n_crops
        j = torch.arange(crop_end[-1], device=pixel_values.device)
        img_of_crop = (j.unsqueeze(1) >= crop_end.unsqueeze(0)).long().sum(1)
        slot = j - crop_start[img_of_crop]
        crops = pixel_values.reshape(n_img * slots, *pixel_values.shape[2:])[img_of_crop * slots + slot]
        merged = self.crop_features(crops)
        bank = torch.cat([merged.reshape(-1, merged.shape[-1]), self.sub_GN.reshape(1, -1), self.glb_GN.reshape(1, -1)])
        bank = self.img_projection(bank)  # per-token projection, so project the bank and gather after
        sub_row = merged.shape[0] * TOKENS_PER_CROP
        glb_row = sub_row + 1

        # For every output token: its image, its offset in that image's block, and the bank row it copies.
        n_tok = n_crops * TOKENS_PER_CROP + 1 + (h + 1) * GRID
        tok_end = torch.cumsum(n_tok, 0)
        t = torch.arange(tok_end[-1], device=pixel_values.device)
        img = (t.unsqueeze(1) >= tok_end.unsqueeze(0)).long().sum(1)
        off = t - (tok_end - n_tok)[img]
        hi, wi, first = h[img], w[img], crop_start[img]
        row_len = wi * GRID + 1
        sub_len = hi * GRID * row_len
        row, col = off // row_len, off % row_len
        tile = first + 1 + (row // GRID) * wi + col // GRID
        sub_src = torch.where(col == wi * GRID, sub_row, tile * TOKENS_PER_CROP + (row % GRID) * GRID + col % GRID)
        g = off - sub_len - 1
        grow, gcol = g // (GRID + 1), g % (GRID + 1)
        glob_src = torch.where(gcol == GRID, sub_row, first * TOKENS_PER_CROP + grow * GRID + gcol)
        src = torch.where(off < sub_len, sub_src, torch.where(off == sub_len, glb_row, glob_src))
        return bank[src]


def hd_features_reference(embed: ImageEmbedding, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """The Hugging Face ``hd_feature_transform`` (order sub_glb), one image at a time; every crop slot goes
    through CLIP as in the original. The oracle for :meth:`ImageEmbedding.forward`."""
    n_img, slots = pixel_values.shape[:2]
    feats = embed.crop_features(pixel_values.flatten(0, 1)).reshape(n_img, slots, TOKENS_PER_CROP, -1)
    dim = feats.shape[-1]
    out = []
    for i in range(n_img):
        h, w = int(image_sizes[i, 0]) // 336, int(image_sizes[i, 1]) // 336
        glb = feats[i, 0].reshape(1, GRID, GRID, dim)
        glb = torch.cat([glb, embed.sub_GN.repeat(1, GRID, 1, 1)], dim=2).reshape(1, -1, dim)
        sub = feats[i, 1 : 1 + h * w].reshape(h, w, GRID, GRID, dim).permute(0, 2, 1, 3, 4)
        sub = sub.reshape(1, h * GRID, w * GRID, dim)
        sub = torch.cat([sub, embed.sub_GN.repeat(1, h * GRID, 1, 1)], dim=2).reshape(1, -1, dim)
        out.append(torch.cat([sub, embed.glb_GN, glb], dim=1).squeeze(0))
    return embed.img_projection(torch.cat(out))


def merge_embeddings(input_ids: torch.Tensor, image_features: torch.Tensor, embed_tokens: nn.Embedding) -> torch.Tensor:
    """Token embeddings with image features written, in order of appearance, at the negative ids.

    Branch-free so it exports: a cumulative count over the image-slot mask picks the feature row; a zero row appended
    to ``image_features`` keeps an empty feature tensor (decode steps, text-only prompts) valid.
    """
    is_img = input_ids < 0
    text = embed_tokens(input_ids.clamp(min=0))
    feats = torch.cat([image_features.to(text.dtype), image_features.new_zeros(1, text.shape[-1]).to(text.dtype)])
    flat = is_img.reshape(-1)
    row = torch.where(flat, torch.cumsum(flat.long(), 0) - 1, feats.shape[0] - 1)
    picked = feats[row].reshape(text.shape)
    return torch.where(is_img.unsqueeze(-1), picked, text)


class Phi3VModel(nn.Module):
    """Phi-3-vision / Phi-3.5-vision. State-dict keys are the official checkpoint's."""

    def __init__(self, cfg: Phi3VConfig, attn_implementation: str = "eager") -> None:
        super().__init__()
        from transformers import Phi3ForCausalLM

        self.config = cfg
        self.lm = Phi3ForCausalLM(cfg.hf_text_config(attn_implementation))
        self.vision = ImageEmbedding(cfg)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.lm.model.embed_tokens

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values, image_sizes)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        if image_features is None:
            image_features = self.embed_tokens.weight.new_zeros(0, self.config.text.hidden_size)
        return merge_embeddings(input_ids, image_features, self.embed_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ):
        feats = None if pixel_values is None else self.image_features(pixel_values, image_sizes)
        embeds = self.embed(input_ids, feats)
        return self.lm(inputs_embeds=embeds, past_key_values=past_key_values, use_cache=use_cache)
