"""Load a model definition with weights from a Hugging Face folder (config.json + *.safetensors).

Only safetensors are read (never pickle). Missing, truncated or mis-shaped weights are refused
with an error that names the file or tensor and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from skiptree.errors import IntegrityError, ModelSourceError
from skiptree.models.base import CausalLM
from skiptree.models.config import ModelConfig, read_config_json
from skiptree.models.registry import build_model, config_from_hf
from skiptree.models.weight_store import WeightRef, placeholder, weight_ref

_REFETCH = "re-download the checkpoint (a zoo model: delete its cache folder and run skiptree fetch)"


def load_config(folder: Path) -> ModelConfig:
    """The normalised config of an HF model folder."""
    return config_from_hf(read_config_json(Path(folder)))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shard index's files, else every *.safetensors."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / name for name in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelSourceError(f"{folder} lacks weight shards {missing}", _REFETCH)
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        hint = f" (found {pickled[0]}: pickle files are never loaded)" if pickled else ""
        raise ModelSourceError(
            f"{folder} has no *.safetensors weights{hint}",
            "save the model with save_pretrained(safe_serialization=True) or pass a .gguf file",
        )
    return files


def _open_all(files: list[Path]) -> dict[str, Path]:
    """Tensor name -> file, reading every header (a truncated file fails here, before any load)."""
    where: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    where[name] = path
        except Exception as exc:  # safetensors raises its own error type for bad headers/sizes
            raise IntegrityError(f"{path} is truncated or corrupted ({exc})", _REFETCH) from exc
    return where


def load_model(folder: Path, dtype: torch.dtype = torch.float32, by_reference: bool = False) -> CausalLM:
    """Build the folder's architecture and fill it with its safetensors weights, in eval mode.
    `by_reference`: placeholders that read nothing, each parameter's source in `model.weight_refs`
    (`skiptree.models.weight_store`: for lowering and eager work on models too large to hold)."""
    folder = Path(folder)
    config = load_config(folder)
    files = weight_files(folder)
    where = _open_all(files)
    with torch.device("meta"):
        model = build_model(config)
    state: dict[str, torch.Tensor] = {}
    refs: dict[str, WeightRef] = {}
    headers: dict[Path, tuple[int, dict]] = {}
    expected = dict(model.named_parameters())
    handles = {} if by_reference else {path: safe_open(str(path), framework="pt") for path in files}
    for ours, spec in model.hf_weights().items():
        source = spec.hf_name if spec.hf_name in where else spec.hf_name.removeprefix("transformer.")
        if source not in where:
            raise ModelSourceError(
                f"{folder} lacks the tensor {spec.hf_name} that a {config.model_type} model needs",
                "check that config.json belongs to these weights",
            )
        if by_reference:
            refs[ours] = weight_ref(where[source], source, spec.transpose, dtype, headers)
            shape = refs[ours].shape[::-1] if spec.transpose else refs[ours].shape
        else:
            try:
                tensor = handles[where[source]].get_tensor(source)
            except Exception as exc:
                raise IntegrityError(f"{where[source]} is truncated or corrupted ({exc})", _REFETCH) from exc
            tensor = tensor.t() if spec.transpose else tensor
            shape = tuple(tensor.shape)
        if tuple(shape) != tuple(expected[ours].shape):
            raise ModelSourceError(
                f"tensor {source} has shape {tuple(shape)}, config.json implies "
                f"{tuple(expected[ours].shape)}",
                "check that config.json belongs to these weights",
            )
        state[ours] = placeholder(tuple(shape), dtype) if by_reference else tensor.to(dtype).contiguous()
    model.load_state_dict(state, strict=False, assign=True)
    model.finish_loading()
    model.weight_refs = refs
    return model.eval()
