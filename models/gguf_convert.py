"""Turn a GGUF file into a Hugging Face model folder, and publish such folders atomically.

`convert_gguf(gguf, out_dir)` writes, from the `gguf` package's reader alone (weights) and
transformers' GGUF tokenizer conversion (tokenizer only):

    config.json              HF config (model_type "llama" or "qwen2"), torch_dtype float32
    model.safetensors        every tensor dequantised to float32, HF parameter names
    gguf_grid.safetensors    the raw Q4_0 / Q4_1 / Q8_0 blocks of those matrices (models/gguf_grid.py)
    tokenizer.json, tokenizer_config.json (+ chat_template.jinja)
    generation_config.json   bos / eos (/ pad) ids
    skiptree_source.json     source file name, its sha256, converter version

`ensure_converted(gguf, dest)` is the one way a converted folder gets into a cache: it converts into
a hidden temporary sibling and renames it into place only once complete, with a marker written
last. A killed or interrupted conversion leaves at most a temporary folder that never looks valid
and is removed by the next call.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import struct
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm

from skiptree.errors import ModelSourceError, UnsupportedArchitectureError
from skiptree.models.gguf_grid import GRID_FILE, write_grid
from skiptree.runtime.manifest import file_sha256  # noqa: F401  (re-exported for zoo and source)

CONVERTER_VERSION = "2"  # 2: Q4_0 / Q4_1 / Q8_0 blocks kept in gguf_grid.safetensors
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
COMPLETE_MARKER = ".skiptree-complete"
SOURCE_RECORD = "skiptree_source.json"
_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_TMP_INFIX = ".tmp-"

# GGUF block tensor -> HF module path inside `model.layers.{i}.`
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def convert_gguf(
    gguf_path: Path, out_dir: Path, progress: bool = True, *, sha256: str | None = None
) -> Path:
    """Write a transformers-loadable float32 model folder for `gguf_path` into `out_dir`.

    `sha256` may pass the file's digest when the caller already has it. Not atomic by itself:
    use `ensure_converted` to publish into a cache.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open_reader(gguf_path)
    arch = _architecture(reader, gguf_path)
    config = hf_config(reader, arch)
    plan = _tensor_plan(reader, arch, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_safetensors(out_dir / "model.safetensors", plan, config, progress)
    grid = write_grid(out_dir / GRID_FILE, plan, lambda rows, name: _hf_row_order(rows, name, config))
    del reader, plan  # release the memory map before the tokenizer reads the file again
    _write_tokenizer(gguf_path, out_dir)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", _generation_config(config))
    record = {
        "source_file": gguf_path.name,
        "sha256": sha256 or file_sha256(gguf_path),
        "converter_version": CONVERTER_VERSION,
        "grid_tensors": grid,
    }
    _write_json(out_dir / SOURCE_RECORD, record)
    return out_dir


def _open_reader(gguf_path: Path) -> GGUFReader:
    if not gguf_path.is_file():
        raise ModelSourceError(f"no such file or folder: {gguf_path}", "pass an existing .gguf file")
    try:
        return GGUFReader(gguf_path)
    except (ValueError, OSError, struct.error) as err:  # gguf raises ValueError on bad magic
        raise ModelSourceError(
            f"{gguf_path} is not a readable GGUF file ({err})",
            "pass a complete, uncorrupted .gguf file",
        ) from err


def _architecture(reader: GGUFReader, path: Path) -> str:
    arch = _field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path.name} has GGUF architecture {arch!r}, which skiptree cannot convert",
            f"use a model of a supported architecture: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
    return arch


_REQUIRED = object()


def _field(reader: GGUFReader, key: str, path: Path | None = None, default=_REQUIRED):
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            where = path.name if path else "the GGUF file"
            raise ModelSourceError(
                f"{where} lacks the metadata key {key!r}", "pass a GGUF written by llama.cpp's converter"
            )
        return default
    return field.contents()


def hf_config(reader: GGUFReader, arch: str) -> dict:
    """The HF config.json dict for a GGUF of architecture `arch` (llama or qwen2)."""
    def key(name: str, default=_REQUIRED):
        return _field(reader, f"{arch}.{name}", default=default)

    heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
    head_dim = int(key("attention.key_length", None) or key("rope.dimension_count", None)
                   or hidden // heads)
    rope_dim = key("rope.dimension_count", None)
    scaling = key("rope.scaling.type", "none")
    if (rope_dim is not None and int(rope_dim) != head_dim) or scaling not in ("none", ""):
        raise UnsupportedArchitectureError(
            f"GGUF {arch} with partial rotary or rope scaling ({scaling!r}) is not supported",
            "use a checkpoint with plain full-width RoPE",
        )
    names = {t.name for t in reader.tensors}
    rope_theta = float(key("rope.freq_base", 10000.0))
    config = {
        "architectures": [_HF_CLASS[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": int(key("context_length")),
        "vocab_size": int(_tensor(reader, "token_embd.weight").shape[1]),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
    for name in ("bos", "eos", "padding"):
        token_id = _field(reader, f"tokenizer.ggml.{name}_token_id", default=None)
        if token_id is not None:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = int(token_id)
    return config


def _tensor(reader: GGUFReader, name: str) -> ReaderTensor:
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    raise ModelSourceError(f"the GGUF file has no tensor {name!r}", "pass a complete GGUF model file")


def hf_name(gguf_name: str) -> str | None:
    """HF parameter name for a GGUF tensor name, or None when the name is not a llama/qwen2 one."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _BLOCK_RE.match(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    return None


def _tensor_plan(reader: GGUFReader, arch: str, config: dict) -> list[tuple[str, ReaderTensor]]:
    """(HF name, GGUF tensor) for every tensor, refusing names we cannot place."""
    plan = []
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise UnsupportedArchitectureError(
                f"GGUF {arch} tensor {tensor.name!r} has no place in a {config['model_type']} model",
                f"use a plain {'/'.join(SUPPORTED_ARCHITECTURES)} checkpoint",
            )
        plan.append((name, tensor))
    _check_complete({name for name, _ in plan}, config)
    return plan


def _check_complete(names: set[str], config: dict) -> None:
    parts = ["input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
             "mlp.down_proj"] + [f"self_attn.{p}_proj" for p in "qkvo"]
    want = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(config["num_hidden_layers"]):
        want |= {f"model.layers.{i}.{p}.weight" for p in parts}
        if config["model_type"] == "qwen2":
            want |= {f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"}
    missing = sorted(want - names)
    if missing:
        raise ModelSourceError(
            f"the GGUF file lacks {len(missing)} tensors, e.g. {missing[0]}",
            "pass a complete GGUF model file",
        )


def _dequantized(tensor: ReaderTensor, name: str, config: dict) -> np.ndarray:
    """Float32 array in HF layout [out, in] (GGUF stores ne reversed), Q/K un-permuted for llama."""
    array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))
    return np.ascontiguousarray(_hf_row_order(array, name, config))


def _hf_row_order(array: np.ndarray, name: str, config: dict) -> np.ndarray:
    """Rows [out, ...] of a GGUF tensor in HF order: llama's Q/K un-permuted, others as they are."""
    if config["model_type"] == "llama":
        if ".self_attn.q_proj." in name:
            return unpermute_rotary(array, config["num_attention_heads"])
        if ".self_attn.k_proj." in name:
            return unpermute_rotary(array, config["num_key_value_heads"])
    return array


def unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of llama Q/K rows (weights or biases).

    llama.cpp (convert_hf_to_gguf.py, LlamaModel.permute) turns HF's rotate-half layout into the
    interleaved one: `w.reshape(n_head, 2, D/2, ...).swapaxes(1, 2)` per head of D rows. The inverse,
    as transformers does it: `w.reshape(n_head, D/2, 2, ...).swapaxes(1, 2)`.
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_safetensors(
    path: Path, plan: list[tuple[str, ReaderTensor]], config: dict, progress: bool
) -> None:
    """Stream float32 tensors into a .safetensors file: header first, then one tensor at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in plan:
        shape = [int(d) for d in reversed(tensor.shape)]
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        bar = tqdm(plan, desc="dequantising", unit="tensor", disable=not progress, file=sys.stderr)
        for name, tensor in bar:
            array = _dequantized(tensor, name, config)
            assert list(array.shape) == header[name]["shape"], name
            out.write(memoryview(array).cast("B"))  # no extra copy of the tensor
            del array


def _write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json exactly as transformers builds them from the GGUF."""
    from transformers import AutoTokenizer  # heavy: only a GGUF conversion needs it

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        config.pop(key, None)
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    config["add_bos_token"] = bool(getattr(tokenizer, "add_bos_token", False))
    _write_json(config_path, config)


def _generation_config(config: dict) -> dict:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if k in config}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Atomic publication of folders and files
# ---------------------------------------------------------------------------------------------


def is_complete(folder: Path) -> bool:
    """True when `folder` was published by `atomic_folder` with the current converter version."""
    marker = Path(folder) / COMPLETE_MARKER
    try:
        return json.loads(marker.read_text()).get("converter_version") == CONVERTER_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def temp_sibling(dest: Path) -> Path:
    """A hidden name next to `dest` that records this process id, e.g. `.name.tmp-123-ab12`."""
    return dest.parent / f".{dest.name}{_TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def clean_stale_temps(dest: Path) -> None:
    """Remove temporary siblings of `dest` left by processes that no longer run."""
    prefix = f".{dest.name}{_TMP_INFIX}"
    for path in dest.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):].split("-")[0]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            _remove(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_folder(dest: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `dest`; on normal exit mark it complete and rename it
    to `dest` (replacing an incomplete `dest`, or any `dest` when `replace`). On any exception,
    Ctrl-C included, remove it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dest)
    tmp = temp_sibling(dest)
    tmp.mkdir()
    try:
        yield tmp
        _write_json(tmp / COMPLETE_MARKER, {"converter_version": CONVERTER_VERSION})
        _publish(tmp, dest, replace)
    except BaseException:
        _remove(tmp)
        raise


def _publish(tmp: Path, dest: Path, replace: bool = False) -> None:
    if dest.exists() and (replace or not is_complete(dest)):
        old = temp_sibling(dest)
        os.replace(dest, old)  # out of the way first, so `dest` never holds a half-deleted folder
        _remove(old)
    try:
        os.rename(tmp, dest)
    except OSError:
        if not is_complete(dest):  # someone else published a complete one meanwhile: keep theirs
            raise
        _remove(tmp)


def ensure_converted(
    gguf_path: Path, dest: Path, progress: bool = True, *, sha256: str | None = None
) -> Path:
    """`dest` as a complete converted folder of `gguf_path`, converting (atomically) if needed."""
    dest = Path(dest)
    if is_complete(dest):
        return dest
    with atomic_folder(dest) as tmp:
        convert_gguf(Path(gguf_path), tmp, progress, sha256=sha256)
    return dest
