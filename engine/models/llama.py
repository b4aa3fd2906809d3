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
    norm_feeds = (("input_layernorm", "self_attn.qkv_proj"), ("post_attention_layernorm", "mlp.gate_up_proj"))

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = GatedMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.fused = None  # int4 on the CPU: the whole decode step in C++ (engine/cpu_layer.py)

    def forward(self, x, rope, backend, meta):
        if self.fused is not None and self.fused.serves(x, rope):
            return self.fused(x, rope, backend, meta)
        attn = self.self_attn(self.input_layernorm(x), rope, backend, meta)
        x, h = self.post_attention_layernorm.add(x, attn)
        return x + self.mlp(h)


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
        for layer in self.model.layers:
            x = layer(x, rope, backend, meta)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
