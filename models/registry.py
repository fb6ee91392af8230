"""Which definition builds which architecture: HF `model_type` and GGUF architecture -> family.

Anything not listed is refused with an error that lists what is supported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from skiptree.errors import UnsupportedArchitectureError
from skiptree.models.base import CausalLM
from skiptree.models.config import ModelConfig, gpt2_config, llama_config
from skiptree.models.gpt2 import GPT2
from skiptree.models.llama import Llama


@dataclass(frozen=True)
class Architecture:
    """One supported HF model_type: how to read its config and which module builds it."""

    model_type: str
    read_config: Callable[[dict[str, Any]], ModelConfig]
    build: Callable[[ModelConfig], CausalLM]


ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        Architecture("llama", llama_config, Llama),
        Architecture("qwen2", llama_config, Llama),
        Architecture("gpt2", gpt2_config, GPT2),
    )
}

# GGUF `general.architecture` -> HF model_type (the GGUF converter writes HF folders).
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2"}


def architecture_for(model_type: str | None) -> Architecture:
    """The registered architecture for an HF model_type, or a clear refusal listing the supported."""
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type '{model_type}' is not supported",
            f"skiptree supports {', '.join(sorted(ARCHITECTURES))}",
        )
    return ARCHITECTURES[model_type]


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Normalise a raw HF config.json dict into a `ModelConfig`."""
    arch = architecture_for(raw.get("model_type"))
    try:
        return arch.read_config(raw)
    except KeyError as exc:
        raise UnsupportedArchitectureError(
            f"config.json of a {arch.model_type} model lacks the key {exc}",
            "use the config.json that came with the checkpoint",
        ) from exc


def build_model(config: ModelConfig) -> CausalLM:
    """An uninitialised model (random weights) of the config's architecture."""
    return architecture_for(config.model_type).build(config)
