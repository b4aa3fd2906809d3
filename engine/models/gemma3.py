"""Gemma 3, text only (Gemma3ForCausalLM, model_type gemma3_text).

What differs from the Llama family: the embedding is scaled by sqrt(hidden) in the model dtype; RMSNorms
scale by (1 + w); each block is norm -> attention/MLP -> norm before the residual add (four norms per
layer); the MLP is GeGLU with tanh GELU; the softmax scale is query_pre_attn_scalar^-1/2; sliding-window
(local) layers interleave with global ones, each kind with its own RoPE base; logits may be softcapped.
The attention and MLP themselves are the shared layers.
"""

from __future__ import annotations

import torch
from torch import nn

from needle.attention.base import AttentionBackend, AttentionMetadata
from needle.engine.model_config import ModelConfig
from needle.engine.models.layers import Attention, GatedMLP, RMSNorm, Rotary, lm_head


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer, unit_offset_norm=True)
        self.mlp = GatedMLP(cfg)
        dim, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(dim, eps, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(dim, eps, unit_offset=True)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps, unit_offset=True)
        self.post_feedforward_layernorm = RMSNorm(dim, eps, unit_offset=True)

    def forward(self, x, rope, backend, meta):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, backend, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Body(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Gemma3Body(cfg)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # global layers
        self.rotary_local = Rotary(cfg.head_dim, cfg.local_rope_theta or cfg.rope_theta)  # windowed layers
        self.lm_head = lm_head(cfg, self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, backend: AttentionBackend,
                meta: AttentionMetadata) -> torch.Tensor:
        """-> final hidden states [T, hidden] (norm applied); logits are taken only where needed."""
        x = self.model.embed_tokens(input_ids)
        # sqrt(hidden) rounded to the model dtype first, as Gemma was trained (55.4 -> 55.5 in bf16)
        x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        rope_global = self.rotary(meta.positions, x.dtype)
        rope_local = self.rotary_local(meta.positions, x.dtype)
        for layer in self.model.layers:
            local = layer.self_attn.window is not None
            x = layer(x, rope_local if local else rope_global, backend, meta)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
