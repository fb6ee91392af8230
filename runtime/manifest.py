"""The artifact manifest: its schema, writing it, and checking an artifact before anything runs.

An artifact is a directory: `manifest.json`, the executables (`*.onnx` + external data), the
tokenizer files. The manifest lists the sha256 and size of every other file; `read_manifest`
refuses an artifact whose files are missing, extra-truncated or altered, with a one-line error.
JSON only (never pickle). stdlib only: the runtime reads it without torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from skiptree.errors import IntegrityError, ModelSourceError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_RECOMPILE = "recompile it with skiptree compile"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the artifact folder except the manifest."""
    entries = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST):
        entries[path.relative_to(folder).as_posix()] = {
            "sha256": file_sha256(path),
            "bytes": path.stat().st_size,
        }
    return entries


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file of the artifact into the manifest and write it (last, so a crash before
    this leaves a folder with no manifest, which is refused)."""
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": file_entries(folder)}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: Path, check_hashes: bool = True) -> dict[str, Any]:
    """The manifest of an artifact, after checking its version and every file's size and sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelSourceError(f"{folder} has no {MANIFEST}, so it is not a skiptree artifact",
                               f"pass a folder written by skiptree compile, or {_RECOMPILE}")  # fmt: skip
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path} is not valid JSON ({exc})", _RECOMPILE) from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelSourceError(
            f"artifact {folder} has format version {version}, this skiptree reads {FORMAT_VERSION}",
            f"{_RECOMPILE} from this version",
        )
    for name, entry in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise IntegrityError(f"artifact file {name} is missing from {folder}", _RECOMPILE)
        if file.stat().st_size != entry["bytes"]:
            raise IntegrityError(
                f"artifact file {name} has {file.stat().st_size} bytes, the manifest says {entry['bytes']}",
                f"the artifact is truncated or corrupted; {_RECOMPILE}",
            )
        if check_hashes and file_sha256(file) != entry["sha256"]:
            raise IntegrityError(
                f"artifact file {name} does not match its sha256 in the manifest",
                f"the artifact is corrupted or was modified; {_RECOMPILE}",
            )
    return manifest
