"""Synthetic model sources: `synthetic:NAME[:seed=S]`, real configurations with seeded random weights.

For memory, compile-time and step-time tests at the sizes people run (7-8B) without their
checkpoints: the configuration is the published one (`CONFIGS`), the weights are random, the
outputs meaningless. The tokenizer is a zoo model's (`TOKENIZER`), and the vocabulary is set to
that tokenizer's, trimmed or grown (the config records the original as `skiptree_synthetic.vocab_size`).

The folder (`skiptree_home()/synthetic/NAME-seedS`) is an ordinary HF folder written once,
atomically: `config.json`, the tokenizer's files and `model.safetensors` in bfloat16, written tensor
by tensor (the header is computed from the shapes first) and each tensor in row chunks of
`CHUNK_BYTES`, so generating an 8B model never holds more than a chunk. Every chunk has its own
seed (the model seed, the tensor's name and the chunk's index), so it can be regenerated alone.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm

from skiptree.errors import ModelSourceError
from skiptree.models.gguf_convert import atomic_folder, is_complete
from skiptree.models.zoo import fetch

PREFIX = "synthetic:"
CHUNK_BYTES = 64 << 20
STD = 0.02  # initializer_range of these configurations
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
TOKENIZER = {"llama": "smollm2-135m", "qwen2": "qwen2.5-coder-1.5b"}  # model_type -> zoo tokenizer

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip
CONFIGS: dict[str, dict] = {  # the published config.json fields that shape the model
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=True, head_dim=64),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False),
}  # fmt: skip


@dataclass(frozen=True)
class SyntheticSpec:
    name: str
    seed: int = 0

    @property
    def folder_name(self) -> str:
        return f"{self.name}-seed{self.seed}"


def is_synthetic(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_synthetic(spec: str) -> SyntheticSpec:
    """`synthetic:NAME[:seed=S]` -> SyntheticSpec; a one-line error names what is wrong."""
    name, _, rest = spec.removeprefix(PREFIX).partition(":")
    if name not in CONFIGS:
        raise ModelSourceError(f"{spec!r}: no synthetic configuration {name!r}",
                               f"use synthetic:NAME with NAME one of {', '.join(CONFIGS)}")  # fmt: skip
    if not rest:
        return SyntheticSpec(name)
    key, _, value = rest.partition("=")
    if key != "seed" or not value.isdigit():
        raise ModelSourceError(f"{spec!r}: cannot read {rest!r}",
                               "write synthetic:NAME or synthetic:NAME:seed=N")  # fmt: skip
    return SyntheticSpec(name, int(value))


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, from transformers' own class built on the meta device (no memory)."""
    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied weights appear once


def tensor_chunks(name: str, shape: tuple[int, ...], seed: int):
    """The tensor's bfloat16 bytes, in chunks of whole rows: norms 1, biases 0, the rest N(0, STD)."""
    rows = shape[0]
    row_size = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    if len(shape) == 1:
        value = 1.0 if "norm" in name else 0.0
        yield torch.full(shape, value, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
        return
    per_chunk = max(1, CHUNK_BYTES // (4 * row_size))
    for index, start in enumerate(range(0, rows, per_chunk)):
        count = min(per_chunk, rows - start)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), index])
        values = torch.from_numpy(rng.standard_normal((count, row_size), dtype=np.float32) * STD)
        yield values.to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int, progress: bool) -> None:
    """A bfloat16 safetensors file written tensor by tensor (format: 8-byte little-endian header
    length, the JSON header of dtypes, shapes and byte offsets, then the data)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data aligned to 8 bytes
    bar = tqdm(total=offset, unit="B", unit_scale=True, desc="writing synthetic weights",
               disable=not progress)  # fmt: skip
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shapes.items():
            for chunk in tensor_chunks(name, shape, seed):
                out.write(chunk)
                bar.update(len(chunk))
    bar.close()


def synthetic_config(spec: SyntheticSpec, vocab_size: int) -> dict:
    config = dict(CONFIGS[spec.name])
    original = config["vocab_size"]
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config["model_type"]]
    config.update(vocab_size=vocab_size, architectures=[architecture], torch_dtype="bfloat16",
                  skiptree_synthetic={"name": spec.name, "seed": spec.seed, "vocab_size": original,
                                      "tokenizer": TOKENIZER[config["model_type"]]})  # fmt: skip
    return config


def synthetic_folder(spec: SyntheticSpec, home: Path, progress: bool = True) -> Path:
    """The synthetic model's HF folder under `home`, written (atomically) on first use."""
    dest = Path(home) / "synthetic" / spec.folder_name
    if is_complete(dest):
        return dest
    config = dict(CONFIGS[spec.name])
    tokenizer_dir = fetch(TOKENIZER[config["model_type"]], progress=progress)
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    ids = [*tokenizer["model"]["vocab"].values(), *(t["id"] for t in tokenizer.get("added_tokens", []))]
    config = synthetic_config(spec, max(ids) + 1)
    with atomic_folder(dest) as building:
        (building / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, building / name)
        write_safetensors(building / "model.safetensors", parameter_shapes(config), spec.seed, progress)
    return dest
