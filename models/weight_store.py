"""Weights by reference: a model whose parameters stay in the checkpoint until one is needed.

`load_model(folder, dtype, by_reference=True)` (models/loader.py) builds the model with placeholder
parameters (`torch.empty`: address space the kernel backs with memory only when written, and
nothing writes them) and records for each one a `WeightRef`: the safetensors file, the tensor's
byte range, and the transform our layout needs (GPT-2's Conv1D transpose, the cast to the compile
dtype). Tracing and export see only shapes; the ONNX lowering writes each weight from its reference
(`compiler/lower/to_onnx.py`), and eager work on a model too large to hold (`stream_weights`) reads
each module's weights for the duration of its call. A tensor is read with plain file reads, never
memory-mapped: mapped pages would count in the process's resident memory for as long as the mapping
lives.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from skiptree.errors import IntegrityError

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F64": torch.float64}  # fmt: skip
_REFETCH = "re-download the checkpoint (a zoo model: delete its cache folder and run skiptree fetch)"


@dataclass(frozen=True)
class WeightRef:
    """One parameter's source: `path`'s bytes [start, end) hold tensor `name` (`stored` dtype and
    shape); reading transposes it (`transpose`) and casts it to `dtype`."""

    path: Path
    name: str
    stored: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int
    transpose: bool
    dtype: torch.dtype

    def read(self) -> torch.Tensor:
        """The parameter's value, read from the file now (one tensor of memory, freed with it)."""
        # Read into a torch allocation (aligned as any tensor's: kernels may round differently on
        # other alignments, and a tensor over a bytearray would keep that alignment).
        tensor = torch.empty(self.shape, dtype=self.stored)
        view, done = memoryview(tensor.view(-1).view(torch.uint8).numpy()), 0
        if len(view) != self.end - self.start:
            raise IntegrityError(f"{self.path}: tensor {self.name}'s bytes do not fit its shape", _REFETCH)
        with open(self.path, "rb", buffering=0) as source:
            source.seek(self.start)
            while done < len(view):
                count = source.readinto(view[done:])
                if not count:
                    raise IntegrityError(f"{self.path} ends inside tensor {self.name}", _REFETCH)
                done += count
        tensor = tensor.t() if self.transpose else tensor
        return tensor.to(self.dtype).contiguous()


def safetensors_header(path: Path) -> tuple[int, dict[str, dict]]:
    """(where the data starts, tensor name -> {"dtype", "shape", "data_offsets"}) of a safetensors file."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def weight_ref(path: Path, name: str, transpose: bool, dtype: torch.dtype,
               headers: dict[Path, tuple[int, dict]]) -> WeightRef:  # fmt: skip
    """The reference to tensor `name` of `path` (`headers`: a cache of parsed headers)."""
    if path not in headers:
        headers[path] = safetensors_header(path)
    base, header = headers[path]
    entry = header[name]
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise IntegrityError(f"{path}: tensor {name} is {entry['dtype']}, not a float type", _REFETCH)
    start, end = entry["data_offsets"]
    return WeightRef(path, name, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                     base + start, base + end, transpose, dtype)  # fmt: skip


def placeholder(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A parameter's stand-in: allocated, never written, so never resident (and never read as a value)."""
    return torch.empty(shape, dtype=dtype)


def refs_by_storage(model: nn.Module) -> dict[int, WeightRef]:
    """A by-reference model's placeholders (by storage address) -> their references; {} otherwise."""
    refs: dict[str, WeightRef] = getattr(model, "weight_refs", {})
    return {param.untyped_storage().data_ptr(): refs[name]
            for name, param in model.named_parameters() if name in refs}  # fmt: skip


def stream_weights(model: nn.Module) -> nn.Module:
    """Let a by-reference model run eagerly: each module reads its own parameters when called and
    drops them when it returns, so the model never holds more than one module's weights."""
    refs: dict[str, WeightRef] = model.weight_refs
    aliases = {id(param): name for name, param in model.named_parameters() if name in refs}
    for module in model.modules():
        own = [(leaf, refs[aliases[id(param)]]) for leaf, param in module._parameters.items()
               if param is not None and id(param) in aliases]  # fmt: skip
        if own:
            module.register_forward_pre_hook(_read_before(own))
            module.register_forward_hook(_drop_after([(leaf, module._parameters[leaf]) for leaf, _ in own]))
    return model


def _read_before(own: list[tuple[str, WeightRef]]):
    def hook(module: nn.Module, args) -> None:
        for leaf, ref in own:
            module._parameters[leaf] = nn.Parameter(ref.read(), requires_grad=False)

    return hook


def _drop_after(placeholders: list[tuple[str, nn.Parameter]]):
    def hook(module: nn.Module, args, output) -> None:
        for leaf, param in placeholders:
            module._parameters[leaf] = param

    return hook
