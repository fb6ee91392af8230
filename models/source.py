"""One entry point for "which model": a zoo name, a Hugging Face folder, or a GGUF file.

Everywhere skiptree takes a model, `resolve_model_dir(spec)` turns it into a local HF folder
(config.json + safetensors + tokenizer files):

    "smollm2-135m"           zoo name -> fetched and converted on first use (see `zoo.fetch`)
    ./my-model/               HF folder -> used as is (must hold config.json)
    ./model.q4_k_m.gguf       GGUF file -> converted once into skiptree_home()/converted/<sha16>-<stem>/
"""

from __future__ import annotations

import functools
from pathlib import Path

from skiptree.errors import ModelSourceError
from skiptree.models.gguf_convert import ensure_converted, file_sha256
from skiptree.models.zoo import fetch, skiptree_home, supported_names, zoo_names

ACCEPTED = "a Hugging Face model folder, a .gguf file, or one of the zoo names: {names}"


def _accepted() -> str:
    return ACCEPTED.format(names=", ".join(supported_names()))


def resolve_model_dir(spec: str | Path, progress: bool = True) -> Path:
    """A local HF model folder for `spec` (zoo name, HF folder or .gguf file); see module doc."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _hf_folder(path)
    if path.is_file():
        return _converted_gguf(path, progress)
    if isinstance(spec, str) and spec in zoo_names():
        return fetch(spec, progress=progress)
    if isinstance(spec, Path) or _looks_like_path(str(spec)):
        raise ModelSourceError(f"no such file or folder: {spec}", f"pass {_accepted()}")
    raise ModelSourceError(
        f"{spec!r} is not a model folder, a .gguf file or a zoo name", f"pass {_accepted()}"
    )


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith((".", "~")) or text.endswith(".gguf")


def _hf_folder(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} has no config.json", f"pass {_accepted()}")
    return path


def _converted_gguf(path: Path, progress: bool) -> Path:
    if path.suffix.lower() != ".gguf":
        raise ModelSourceError(f"{path} is a file but not a .gguf file", f"pass {_accepted()}")
    stat = path.resolve().stat()
    digest = _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    dest = skiptree_home() / "converted" / f"{digest[:16]}-{path.stem}"
    return ensure_converted(path, dest, progress, sha256=digest)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, hashed once per process for a given (path, size, mtime)."""
    return file_sha256(Path(path))
