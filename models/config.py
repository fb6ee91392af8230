"""`ModelConfig`: one normalised description of a decoder-only LM, read from an HF `config.json`.

Hugging Face spells the same fact many ways (`n_embd` / `hidden_size`, `rope_theta` /
`rope_parameters.rope_theta`, `eos_token_id` as int or list); everything downstream reads only
this dataclass, so those spellings are resolved here once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skiptree.errors import ModelSourceError, UnsupportedArchitectureError


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base `theta`, and `scaling` ("default", "linear" or "llama3")."""

    theta: float = 10000.0
    scaling: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Everything a model definition needs, independent of how the checkpoint spelled it."""

    family: str  # "llama" or "gpt2": which definition in skiptree.models builds it
    model_type: str  # the HF model_type it came from ("llama", "qwen2", "gpt2", ...)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["rope"] = dict(self.rope.__dict__)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data


def read_config_json(folder: Path) -> dict[str, Any]:
    """The raw `config.json` of an HF model folder, with clear errors when it is missing or bad."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelSourceError(
            f"{folder} has no config.json",
            "pass a Hugging Face model folder (config.json + *.safetensors), a .gguf file, "
            "or a zoo name such as smollm2-135m",
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSourceError(
            f"{path} is not valid JSON ({exc})", "restore the file from the original checkpoint"
        ) from exc


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope(raw: dict[str, Any]) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    legacy = raw.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedArchitectureError(
            f"rope scaling '{kind}' is not supported",
            "use a checkpoint with default, linear or llama3 rotary scaling",
        )
    return RopeConfig(
        theta=theta,
        scaling=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


def llama_config(raw: dict[str, Any]) -> ModelConfig:
    """Llama, SmolLM2 (llama), Qwen2: RMSNorm, rotary positions, grouped-query attention, SwiGLU."""
    if raw.get("use_sliding_window"):
        raise UnsupportedArchitectureError(
            "sliding-window attention is not supported", "use a checkpoint with full attention"
        )
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    return ModelConfig(
        family="llama",
        model_type=raw["model_type"],
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        intermediate_size=int(raw["intermediate_size"]),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases and no attention_bias key.
        attention_bias=bool(raw.get("attention_bias", raw["model_type"] == "qwen2")),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        hidden_act=raw.get("hidden_act", "silu"),
        rope=_rope(raw),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
    )


def gpt2_config(raw: dict[str, Any]) -> ModelConfig:
    """GPT-2: LayerNorm, learned absolute positions, fused QKV, GELU MLP, tied head."""
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if raw.get(flag):
            raise UnsupportedArchitectureError(
                f"GPT-2 option {flag}=true is not supported", f"use a checkpoint with {flag}=false"
            )
    hidden = int(raw.get("n_embd", raw.get("hidden_size", 768)))
    heads = int(raw.get("n_head", raw.get("num_attention_heads", 12)))
    return ModelConfig(
        family="gpt2",
        model_type="gpt2",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw.get("n_layer", raw.get("num_hidden_layers", 12))),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(raw.get("n_inner") or 4 * hidden),
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        max_position_embeddings=int(raw.get("n_positions", raw.get("max_position_embeddings", 1024))),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        hidden_act=raw.get("activation_function", "gelu_new"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
    )
