"""GPT-2: learned absolute positions, LayerNorm, fused QKV projection, GELU (tanh) MLP, tied head."""

from __future__ import annotations

import torch
from torch import nn

from skiptree.models.base import CausalLM, WeightSpec, attend
from skiptree.models.config import ModelConfig

_ACTIVATIONS = {
    "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu": nn.functional.gelu,
    "relu": nn.functional.relu,
}


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.o = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def qkv_heads(self, x) -> tuple[torch.Tensor, ...]:
        batch, steps, _ = x.shape
        return tuple(
            t.view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)
            for t in self.qkv(x).chunk(3, dim=-1)
        )  # each [B, H, T, D]

    def forward(self, x, attn_bias, k_cache, v_cache, write_slots) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        return self.o(attend(q, k, v, k_cache, v_cache, write_slots, attn_bias))


class GPT2Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"GPT-2 activation {cfg.hidden_act} is not one of {list(_ACTIVATIONS)}")
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.activation = _ACTIVATIONS[cfg.hidden_act]

    def kv(self, x, context) -> tuple[torch.Tensor, torch.Tensor]:
        _, k, v = self.attn.qkv_heads(self.attn_norm(x))
        return k, v

    def forward(self, x, context, attn_bias, k_cache, v_cache, write_slots) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), attn_bias, k_cache, v_cache, write_slots)
        return x + self.proj(self.activation(self.fc(self.mlp_norm(x))))


class GPT2(CausalLM):
    """GPT-2 decoder; see `skiptree.models.base` for the step contract."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embed = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(GPT2Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight

    def embed_step(self, input_ids, positions):
        return self.embed(input_ids) + self.position_embed(positions), ()

    def hf_weights(self) -> dict[str, WeightSpec]:
        specs = {
            "embed.weight": WeightSpec("transformer.wte.weight"),
            "position_embed.weight": WeightSpec("transformer.wpe.weight"),
            "norm.weight": WeightSpec("transformer.ln_f.weight"),
            "norm.bias": WeightSpec("transformer.ln_f.bias"),
        }
        if not self.config.tie_word_embeddings:
            specs["head.weight"] = WeightSpec("lm_head.weight")
        # Conv1D modules store [in, out]; ours are nn.Linear [out, in].
        ours_to_hf = {
            "attn_norm": ("ln_1", False), "mlp_norm": ("ln_2", False),
            "attn.qkv": ("attn.c_attn", True), "attn.o": ("attn.c_proj", True),
            "fc": ("mlp.c_fc", True), "proj": ("mlp.c_proj", True),
        }  # fmt: skip
        for name, _ in self.named_parameters():
            if name.startswith("layers."):
                _, index, rest = name.split(".", 2)
                module, leaf = rest.rsplit(".", 1)
                hf_module, conv1d = ours_to_hf[module]
                specs[name] = WeightSpec(
                    f"transformer.h.{index}.{hf_module}.{leaf}", transpose=conv1d and leaf == "weight"
                )
        return specs
