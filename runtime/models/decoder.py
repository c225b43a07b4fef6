"""One decoder-only transformer covering Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

Parameter names follow the HF checkpoints, except that q/k/v and gate/up are fused: `packed` maps the
checkpoint names onto the fused parameters and their shard index.
"""
import torch
from torch import nn

from kvserve.kernels import ops
from kvserve.runtime.context import get_context
from kvserve.runtime.models.layers import Attention, Embedding, Linear, RMSNorm, Rotary


class DecoderAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.head_dim = d = cfg["head_dim"]
        self.q_size, self.kv_size = heads * d, kv_heads * d
        bias = cfg["qkv_bias"]
        self.qkv_proj = Linear(hidden, [heads * d, kv_heads * d, kv_heads * d], bias=bias)
        self.o_proj = Linear(heads * d, hidden, bias=cfg.get("attention_bias", False))
        self.qk_norm = cfg["qk_norm"]
        if self.qk_norm:
            self.q_norm = RMSNorm(d, cfg["rms_norm_eps"])
            self.k_norm = RMSNorm(d, cfg["rms_norm_eps"])
        self.attn = Attention(heads, kv_heads, d)

    def attend(self, rotary: Rotary, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """qkv projection output -> attention output [T, heads * head_dim] (new K/V stored on the way)."""
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else (None, None, 0.0)
        return self.attn(qkv, *norms, rotary, positions, get_context()).view(qkv.shape[0], -1)

    def forward(self, rotary: Rotary, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attend(rotary, positions, self.qkv_proj(x)))


class MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        bias = cfg.get("mlp_bias", False)
        self.gate_up_proj = Linear(hidden, [inter, inter], bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.self_attn = DecoderAttention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

    def forward(self, rotary, positions, x, residual):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rotary, positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def forward_row(self, rotary, positions, h):
        """One token, no LoRA: the same layer with the norms, SiLU and residual adds folded into the
        projections (kernels/gemv.py), carrying only the residual stream h."""
        attn, mlp = self.self_attn, self.mlp
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        a = attn.attend(rotary, positions, ops.linear(h, attn.qkv_proj.weight, attn.qkv_proj.bias,
                                                      norm=(ln1.weight, ln1.eps)))
        h = ops.linear(a, attn.o_proj.weight, attn.o_proj.bias, residual=h)
        gate_up = ops.linear(h, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, norm=(ln2.weight, ln2.eps))
        return ops.linear(gate_up, mlp.down_proj.weight, mlp.down_proj.bias, silu=True, residual=h)


class Model(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embed_tokens = Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class DecoderForCausalLM(nn.Module):
    packed = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: dict, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.model = Model(cfg)
        self.rotary = Rotary(cfg["head_dim"], max_positions, cfg["rope_theta"], cfg["rope_scaling"])
        self.tie = cfg["tie_word_embeddings"]
        self.lm_head = None if self.tie else Linear(cfg["hidden_size"], cfg["vocab_size"])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states after the final norm, one row per scheduled token."""
        x = self.model.embed_tokens(input_ids)
        if x.shape[0] == 1 and self.model.layers[0].self_attn.qkv_proj.lora_a is None:
            for layer in self.model.layers:
                x = layer.forward_row(self.rotary, positions, x)
            return self.model.norm(x)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(self.rotary, positions, x, residual)
        x, _ = self.model.norm(x, residual)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.tie else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight)
