"""Shared fixtures: tiny random checkpoints written by transformers itself (safetensors)."""

from __future__ import annotations

import pytest
import torch
import transformers

TINY_LLAMA = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2)  # fmt: skip


def write_tiny_model(folder, config, seed: int = 0, dtype=torch.float32):
    """Save a random model (perturbed norms and biases) and return transformers' instance of it."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
            else:
                param.mul_(8.0)  # sharper logits: fewer near-ties in greedy comparisons
    model.save_pretrained(folder)
    return model.to(dtype)


@pytest.fixture
def tiny_llama(tmp_path):
    """(folder, transformers model) of a tiny random Llama."""
    folder = tmp_path / "tiny-llama"
    return folder, write_tiny_model(folder, transformers.LlamaConfig(**TINY_LLAMA))
