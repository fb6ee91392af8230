"""One entry point for "which model": a zoo name, a Hugging Face folder, or a GGUF file.

Everywhere skiptree takes a model, `resolve_model_dir(spec)` turns it into a local HF folder
(config.json + safetensors + tokenizer files):

    "smollm2-135m"           zoo name -> fetched and converted on first use (see `zoo.fetch`)
    ./my-model/               HF folder -> used as is (must hold config.json)
    ./model.q4_k_m.gguf       GGUF file -> converted once into skiptree_home()/converted/<sha16>-<stem>/
    "synthetic:llama-3-8b"    a real configuration with seeded random weights (`synthetic.py`),
                              written once into skiptree_home()/synthetic/<name>-seed<S>/
"""

from __future__ import annotations

import functools
from pathlib import Path

from skiptree.errors import ModelSourceError
from skiptree.models.gguf_convert import ensure_converted, file_sha256
from skiptree.models.synthetic import is_synthetic, parse_synthetic, synthetic_folder
from skiptree.models.zoo import fetch, skiptree_home, supported_names, zoo_names

ACCEPTED = ("a Hugging Face model folder, a .gguf file, synthetic:NAME (random weights), or one of the "
            "zoo names: {names}")


def _accepted() -> str:
    return ACCEPTED.format(names=", ".join(supported_names()))


def check_model_source(spec: str | Path, option: str = "model") -> None:
    """Refuse a `spec` that names no model, without fetching or converting anything (cheap: run it
    before any work). `option` names where the spec came from in the message."""
    if is_synthetic(spec):
        parse_synthetic(str(spec))  # refuses an unknown name or option
        return
    path = Path(spec).expanduser()
    where = "" if option == "model" else f"{option} "
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{where}{path} has no config.json", f"pass {_accepted()}")
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(f"{where}{path} is a file but not a .gguf file", f"pass {_accepted()}")
    elif isinstance(spec, str) and spec in zoo_names():
        return
    elif isinstance(spec, Path) or _looks_like_path(str(spec)):
        raise ModelSourceError(f"{where}no such file or folder: {spec}", f"pass {_accepted()}")
    else:
        raise ModelSourceError(f"{where}{str(spec)!r} is not a model folder, a .gguf file or a zoo name",
                               f"pass {_accepted()}")  # fmt: skip


def resolve_model_dir(spec: str | Path, progress: bool = True) -> Path:
    """A local HF model folder for `spec` (zoo name, HF folder or .gguf file); see module doc."""
    check_model_source(spec)
    if is_synthetic(spec):
        return synthetic_folder(parse_synthetic(str(spec)), skiptree_home(), progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return _converted_gguf(path, progress)
    return fetch(str(spec), progress=progress)


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith((".", "~")) or text.endswith(".gguf")


def _converted_gguf(path: Path, progress: bool) -> Path:
    stat = path.resolve().stat()
    digest = _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    dest = skiptree_home() / "converted" / f"{digest[:16]}-{path.stem}"
    return ensure_converted(path, dest, progress, sha256=digest)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, hashed once per process for a given (path, size, mtime)."""
    return file_sha256(Path(path))
