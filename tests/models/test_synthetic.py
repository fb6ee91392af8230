"""Synthetic sources: real configurations, seeded weights written tensor by tensor and read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from skiptree.errors import ModelSourceError
from skiptree.models import synthetic
from skiptree.models.source import check_model_source, resolve_model_dir
from skiptree.models.synthetic import (
    CONFIGS,
    SyntheticSpec,
    parameter_shapes,
    parse_synthetic,
    synthetic_config,
    write_safetensors,
)


def test_specs_parse_and_bad_ones_are_refused():
    assert parse_synthetic("synthetic:llama-3-8b") == SyntheticSpec("llama-3-8b", 0)
    assert parse_synthetic("synthetic:qwen2.5-7b:seed=7") == SyntheticSpec("qwen2.5-7b", 7)
    check_model_source("synthetic:llama-2-7b")  # accepted without generating anything
    for spec, message in [("synthetic:gpt-5", "no synthetic configuration 'gpt-5'"),
                          ("synthetic:llama-3-8b:seed=x", "cannot read 'seed=x'")]:  # fmt: skip
        with pytest.raises(ModelSourceError, match=message):
            check_model_source(spec)


@pytest.mark.parametrize("name, billions", [("llama-3-8b", 8.03), ("llama-2-7b", 6.74), ("qwen2.5-7b", 7.62),
                                            ("llama-3.2-1b", 1.24)])  # fmt: skip
def test_configurations_have_their_published_sizes(name, billions):
    shapes = parameter_shapes(CONFIGS[name])  # on the meta device: no memory
    assert sum(int(np.prod(s)) for s in shapes.values()) / 1e9 == pytest.approx(billions, abs=0.01)
    config = synthetic_config(SyntheticSpec(name), 49152)  # with the tokenizer's vocabulary, recorded
    assert config["vocab_size"] == 49152
    assert config["skiptree_synthetic"]["vocab_size"] == CONFIGS[name]["vocab_size"]


def test_weights_are_written_in_chunks_and_read_back_as_generated(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_BYTES", 4 * 64 * 5)  # 5 rows of 64 a chunk: tensors span chunks
    shapes = {"model.embed_tokens.weight": (23, 64), "model.layers.0.input_layernorm.weight": (64,),
              "model.layers.0.self_attn.q_proj.bias": (64,), "lm_head.weight": (23, 64)}  # fmt: skip
    write_safetensors(tmp_path / "model.safetensors", shapes, seed=3, progress=False)
    again = tmp_path / "again.safetensors"
    write_safetensors(again, shapes, seed=3, progress=False)
    assert (tmp_path / "model.safetensors").read_bytes() == again.read_bytes()  # deterministic
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    assert {name: tuple(t.shape) for name, t in tensors.items()} == shapes
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert (tensors["model.layers.0.input_layernorm.weight"] == 1).all()
    assert (tensors["model.layers.0.self_attn.q_proj.bias"] == 0).all()
    embed = tensors["model.embed_tokens.weight"].float()
    assert 0.01 < embed.std().item() < 0.03
    assert not torch.equal(embed, tensors["lm_head.weight"].float())  # each tensor its own stream
    assert not torch.equal(embed[:5], embed[5:10])  # each chunk its own seed


@pytest.mark.slow
def test_a_synthetic_model_resolves_loads_and_compiles(tmp_path, monkeypatch):
    """A small configuration through the real path: SmolLM2's tokenizer, load, compile, generate."""
    import skiptree
    from skiptree.compiler.compile import compile_model
    from skiptree.compiler.options import CompileOptions
    from skiptree.models.loader import load_model
    from skiptree.models.zoo import fetch, skiptree_home

    monkeypatch.setitem(CONFIGS, "tiny-llama", dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=False))
    home = skiptree_home()  # the tokenizer's zoo model from the usual cache; the synthetic folder in tmp
    monkeypatch.setattr(synthetic, "fetch", lambda name, progress=True: fetch(name, home, progress=False))
    monkeypatch.setenv("SKIPTREE_HOME", str(tmp_path / "home"))
    folder = resolve_model_dir("synthetic:tiny-llama:seed=1", progress=False)
    assert folder == tmp_path / "home" / "synthetic" / "tiny-llama-seed1"
    assert resolve_model_dir("synthetic:tiny-llama:seed=1", progress=False) == folder  # written once
    model = load_model(folder)
    assert model.config.vocab_size == 49152  # SmolLM2's tokenizer
    artifact = skiptree.load(compile_model(folder, tmp_path / "art", CompileOptions(max_seq_len=64),
                                           log=lambda message: None))  # fmt: skip
    assert len(artifact.generate("def fib(n):", max_new_tokens=8, eos_token_id=[]).token_ids) == 8
