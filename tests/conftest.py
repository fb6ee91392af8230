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


def write_word_tokenizer(folder, vocab_size: int = 97) -> None:
    """A real (tiny) tokenizer.json: word i is "t<i>", so ids and text map one to one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """(model folder, artifact folder) of a tiny Llama compiled for ONNX Runtime (session-wide)."""
    from skiptree.compiler.compile import compile_model
    from skiptree.compiler.options import CompileOptions

    root = tmp_path_factory.mktemp("tiny-artifact")
    folder = root / "model"
    write_tiny_model(folder, transformers.LlamaConfig(**TINY_LLAMA))
    write_word_tokenizer(folder)
    artifact = compile_model(folder, root / "artifact", CompileOptions(max_seq_len=48, verify=True),
                             log=lambda message: None)  # fmt: skip
    return folder, artifact


@pytest.fixture
def tiny_llama(tmp_path):
    """(folder, transformers model) of a tiny random Llama."""
    folder = tmp_path / "tiny-llama"
    return folder, write_tiny_model(folder, transformers.LlamaConfig(**TINY_LLAMA))
