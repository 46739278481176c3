"""CLIP's text transformer (the ViT-L/14 text tower), which turns token ids into the context c
that every cross-attention of the UNet reads.

    x = E_tok[ids] + E_pos[0 … L−1]                    ids (B, L) → x (B, L, D)
    for each of the N layers (pre-LayerNorm, as GPT-2):
        x = x + Attn(LN₁(x))                            causal: token i attends to tokens ≤ i
        x = x + W₂ · quick_gelu(W₁ · LN₂(x) + b₁) + b₂    quick_gelu(u) = u · σ(1.702 u)
    c = LN_final(x)                                     (B, L, D): the last hidden state

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision";
reference code: transformers `models/clip/modeling_clip.py` (`CLIPTextModel`). SD v1.x
(`CLIPTextConfig.sd15()`): 12 layers, D = 768, 12 heads, MLP 3072, L = 77, 123 M parameters.
SD uses all 77 positions of c, after the final LayerNorm; there is no padding mask, only the
causal one, so the padding positions (end tokens) carry a summary of the whole prompt.

Module and parameter names are transformers' (`text_model.encoder.layers.0.self_attn.q_proj.weight`),
so a text encoder's state dict loads with `load_state_dict(strict=True)`. There are no buffers:
transformers keeps `position_ids` as one (some checkpoints store it, sometimes as corrupted
floats); here the positions are `arange(L)` made in `forward`, so the model builds on the meta
device and loads with `assign=True`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import attention, tag_attention_layers
from .configs import CLIPTextConfig


def quick_gelu(u: torch.Tensor) -> torch.Tensor:
    """u · σ(1.702 u): OpenAI's sigmoid approximation of GELU, which CLIP was trained with."""
    return u * torch.sigmoid(1.702 * u)


class CLIPTextEmbeddings(nn.Module):
    """x = E_tok[ids] + E_pos[0 … L−1].   ids (B, L) → (B, L, D)"""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention.   (B, L, D) → (B, L, D)

        Q, K, V = x W_q + b_q, x W_k + b_k, x W_v + b_v
        out = softmax(Q Kᵀ / √d + M) V W_o + b_o      M = −∞ above the diagonal, d = D / heads

    `tag` is the layer's qualified name (`text_model.encoder.layers.3.self_attn`), filled in by
    `tag_attention_layers`, so an `AttentionRecorder` can capture this layer's attention maps.
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.tag: str | None = None

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(attention(q, k, v, self.heads, causal=True, tag=self.tag, key_mask=key_mask))


class CLIPMLP(nn.Module):
    """W₂ · quick_gelu(W₁ x + b₁) + b₂.   (B, L, D) → (B, L, D), through width intermediate_size"""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """One pre-LN block: x + Attn(LN₁(x)), then + MLP(LN₂(·)).   (B, L, D) → (B, L, D)"""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The N blocks in sequence.   (B, L, D) → (B, L, D)"""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


class CLIPTextTransformer(nn.Module):
    """Embeddings, the encoder, the final LayerNorm.   ids (B, L) → (B, L, D)"""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(ids), key_mask))


class CLIPTextModel(nn.Module):
    """The text encoder of SD v1.x: token ids → the last hidden state, after the final LayerNorm.

        ids (B, L) integer, L ≤ max_position_embeddings (77)  →  (B, L, hidden_size)

    `pipe.text_encoder(pipe.tokenizer(prompts))` is the context c for the UNet: (B, 77, 768).
    The ids may live on any device; they are moved to the model's. `attention_mask` (B, L) of
    0/1 (transformers' argument; SD itself never passes one) hides the tokens marked 0 from
    every attention, on top of the causal mask: compel's down-weighting encodes prompts so.
    """

    def __init__(self, config: CLIPTextConfig = CLIPTextConfig.sd15()):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        tag_attention_layers(self)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_ids(ids)                  # on the ids' own device: no GPU sync for CPU ids
        device = self.text_model.embeddings.token_embedding.weight.device
        if attention_mask is not None:
            if attention_mask.shape != ids.shape:
                raise ValueError(f"attention_mask must have the ids' shape {tuple(ids.shape)}; got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.to(device, torch.bool)
        return self.text_model(ids.to(device), attention_mask)

    def _check_ids(self, ids: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"CLIPTextModel expects token ids as a LongTensor (B, L); got a {type(ids).__name__}. "
                            "Make them with the tokenizer: text_encoder(tokenizer(prompts)).")
        if ids.dtype not in (torch.long, torch.int32):
            raise TypeError(f"CLIPTextModel expects integer token ids (torch.long); got dtype {ids.dtype}. "
                            "Token ids index the embedding table: make them with the tokenizer, or use ids.long().")
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= cfg.max_position_embeddings:
            raise ValueError(f"CLIPTextModel expects ids of shape (B, L) with 1 ≤ L ≤ "
                             f"{cfg.max_position_embeddings}; got {tuple(ids.shape)}. A single prompt is (1, 77).")
        rows = self.text_model.embeddings.token_embedding.num_embeddings   # > vocab_size with added tokens
        if ids.device.type != "meta" and ((ids < 0) | (ids >= rows)).any():
            bad = ids[(ids < 0) | (ids >= rows)][0].item()
            raise ValueError(f"token ids must lie in 0 … {rows - 1} (the vocabulary); found {bad}. "
                             "Was the tokenizer built for another vocabulary?")
