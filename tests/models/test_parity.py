"""Our definitions give the same logits as transformers' own implementations on the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import write_tiny_model

from skiptree.models.loader import load_model
from skiptree.models.reference import ReferenceStepper

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=128)  # fmt: skip

CONFIGS = {
    "llama-gqa-untied": transformers.LlamaConfig(**TINY, num_key_value_heads=2),
    "llama-tied": transformers.LlamaConfig(**TINY, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": transformers.LlamaConfig(
        **TINY, num_key_value_heads=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16},
    ),
    "qwen2-bias": transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True),
    "gpt2": transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=128),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    reference = write_tiny_model(tmp_path, CONFIGS[name])
    ours = load_model(tmp_path)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits[0]
    stepper = ReferenceStepper(ours, max_seq_len=40)
    prefill = stepper.forward(ids[0, :12].tolist())
    decoded = [stepper.forward([t])[0] for t in ids[0, 12:].tolist()]
    got = torch.cat([prefill, torch.stack(decoded)])
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_float64_is_bit_close(tmp_path):
    reference = write_tiny_model(tmp_path, CONFIGS["qwen2-bias"]).double()
    ours = load_model(tmp_path, dtype=torch.float64)
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(ids).logits[0]
    got = ReferenceStepper(ours, max_seq_len=16).forward(ids[0].tolist())
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
