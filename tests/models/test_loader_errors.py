"""Bad model folders get one clear error each, naming the problem and the fix."""

from __future__ import annotations

import json
import re

import pytest
import torch

from skiptree.errors import IntegrityError, ModelSourceError, UnsupportedArchitectureError
from skiptree.models.loader import load_model


def test_missing_config_json(tmp_path):
    with pytest.raises(ModelSourceError, match=re.escape(
        f"{tmp_path} has no config.json; pass a Hugging Face model folder (config.json + "
        "*.safetensors), a .gguf file, or a zoo name such as smollm2-135m."
    )):  # fmt: skip
        load_model(tmp_path)


def test_unknown_architecture_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba2"}))
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(
        "model_type 'mamba2' is not supported; skiptree supports gpt2, llama, qwen2."
    )):  # fmt: skip
        load_model(tmp_path)


def test_truncated_safetensors(tiny_llama):
    folder, _ = tiny_llama
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match=re.escape(f"{weights} is truncated or corrupted (")):
        load_model(folder)


def test_pickle_weights_are_never_loaded(tiny_llama):
    folder, model = tiny_llama
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match=r"no \*\.safetensors weights \(found pytorch_model.bin"):
        load_model(folder)


def test_config_that_does_not_match_the_weights(tiny_llama):
    folder, _ = tiny_llama
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match=r"tensor model.layers.0.mlp.(gate|up|down)_proj.weight "
                       r"has shape \(\d+, \d+\), config.json implies"):  # fmt: skip
        load_model(folder)


def test_missing_tensor_is_named(tiny_llama):
    from safetensors.torch import load_file, save_file

    folder, _ = tiny_llama
    state = load_file(folder / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match="lacks the tensor model.norm.weight that a llama model needs"):
        load_model(folder)
