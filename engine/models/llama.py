"""The Llama family: Llama 2/3/3.1, SmolLM, Mistral, Qwen2/2.5 (qkv bias) and Qwen3 (q/k norm).

They differ only in flags the shared layers read from ModelConfig (bias, q/k norm, sliding windows);
one pre-norm decoder layer serves them all.
"""

from __future__ import annotations

import torch
from torch import nn

from needle.attention.base import AttentionBackend, AttentionMetadata
from needle.engine.model_config import ModelConfig
from needle.engine.models.layers import Attention, GatedMLP, RMSNorm, Rotary, lm_head


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = GatedMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.fused = None  # int4 on the CPU: the whole decode step in C++ (engine/cpu_layer.py)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope, backend,
                meta) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (this layer's MLP output, the residual stream before it): the caller adds the two inside
        the next norm, one fused kernel instead of a separate add. residual None: x is the whole stream
        (the embedding, or a fused CPU layer's output, which includes its residual)."""
        if self.fused is not None and self.fused.serves(x, rope):
            return self.fused(x if residual is None else x + residual, rope, backend, meta), None
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            residual, h = self.input_layernorm.add(x, residual)
        attn = self.self_attn(h, rope, backend, meta)
        residual, h = self.post_attention_layernorm.add(attn, residual)
        return self.mlp(h), residual


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = lm_head(cfg, self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, backend: AttentionBackend,
                meta: AttentionMetadata) -> torch.Tensor:
        """-> final hidden states [T, hidden] (norm applied); logits are taken only where needed."""
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary(meta.positions, x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, rope, backend, meta)
        return self.model.norm(x) if residual is None else self.model.norm.add(x, residual)[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
