"""The quantisation grid of a GGUF checkpoint, kept beside its float32 conversion.

A converted GGUF folder holds every tensor dequantised to float32 (`model.safetensors`). Weights
that were Q4_0, Q4_1 or Q8_0 also keep their raw ggml blocks in `gguf_grid.safetensors` (uint8
rows [out, in / 32 * block bytes], rows in HF order: llama's Q/K un-permuted like the floats), so
`--quantize` can lower them to MatMulNBits on the very same grid instead of re-quantising a
dequantised copy (`skiptree.compiler.lower.quantize_grid`). Block layouts (32 weights along `in`):

    Q4_0  fp16 d | 16 bytes of 4-bit q           w = d * (q - 8)
    Q4_1  fp16 d | fp16 m | 16 bytes of 4-bit q  w = d * q + m
    Q8_0  fp16 d | 32 int8 q                     w = d * q

4-bit codes: byte i holds element i (low nibble) and element i + 16 (high nibble).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, ReaderTensor
from safetensors import safe_open
from safetensors.numpy import save_file

GRID_FILE = "gguf_grid.safetensors"
BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass(frozen=True)
class GridTensor:
    """One weight's ggml blocks: `kind` Q4_0 | Q4_1 | Q8_0, `blocks` uint8 [out, in / 32, bytes]."""

    kind: str
    blocks: np.ndarray

    @property
    def bits(self) -> int:
        return 8 if self.kind == "Q8_0" else 4

    @property
    def scales(self) -> np.ndarray:
        """d per block, float32 [out, in / 32]."""
        return self.blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)

    @property
    def minimums(self) -> np.ndarray:
        """Q4_1's m per block, float32 [out, in / 32]."""
        return self.blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)

    def codes(self) -> np.ndarray:
        """Unsigned codes in element order [out, in / 32, 32]: 0..15 (4-bit), q + 128 (Q8_0)."""
        if self.kind == "Q8_0":
            return (self.blocks[..., 2:34].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        packed = self.blocks[..., 4:20] if self.kind == "Q4_1" else self.blocks[..., 2:18]
        return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)

    def dequantized(self) -> np.ndarray:
        """float32 [out, in], as the converter wrote it (d and m are float16 widened)."""
        codes, d = self.codes().astype(np.float32), self.scales[..., None]
        if self.kind == "Q8_0":
            weights = d * (codes - 128)
        elif self.kind == "Q4_0":
            weights = d * (codes - 8)
        else:
            weights = d * codes + self.minimums[..., None]
        return weights.reshape(weights.shape[0], -1)


def grid_kind(tensor: ReaderTensor) -> str | None:
    kind = GGMLQuantizationType(tensor.tensor_type).name
    return kind if kind in BLOCK_BYTES and len(tensor.shape) == 2 else None


def write_grid(path: Path, plan: list[tuple[str, ReaderTensor]],
               reorder_rows: Callable[[np.ndarray, str], np.ndarray]) -> int:  # fmt: skip
    """Save the raw blocks of the plan's Q4_0 / Q4_1 / Q8_0 matrices; returns how many. `reorder_rows`
    applies the converter's row order (llama Q/K) to an [out, ...] array."""
    arrays, kinds = {}, {}
    for name, tensor in plan:
        kind = grid_kind(tensor)
        if kind is None:
            continue
        rows = int(tensor.shape[1])  # GGUF lists ne reversed: [in, out]
        raw = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1, BLOCK_BYTES[kind])
        arrays[name], kinds[name] = np.ascontiguousarray(reorder_rows(raw, name)), kind
    if arrays:
        save_file(arrays, str(path), metadata={"kinds": json.dumps(kinds)})
    return len(arrays)


def read_grid(folder: Path) -> dict[str, GridTensor]:
    """HF weight name -> its grid, for a converted GGUF folder ({} for any other folder)."""
    path = Path(folder) / GRID_FILE
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="numpy") as handle:
        kinds = json.loads(handle.metadata()["kinds"])
        return {name: GridTensor(kind, handle.get_tensor(name)) for name, kind in kinds.items()}
