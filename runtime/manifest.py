"""The artifact manifest: writing it, and checking an artifact before anything runs.

An artifact is a directory: `manifest.json`, the executables (`*.onnx` + external data), the
tokenizer files. The manifest lists the sha256 and size of every other file; `read_manifest`
refuses an artifact whose files are missing, extra-truncated or altered, or whose manifest is of
another format, with a one-line error, and returns the typed `Manifest` (the schema, the graph
names and the decode modes: `runtime/manifest_schema.py`). JSON only (never pickle). stdlib
only: the runtime reads it without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from skiptree.errors import IntegrityError, ModelSourceError
from skiptree.runtime.manifest_schema import (
    FORMAT_VERSION,
    BackendEntry,
    CheckEntry,
    CorpusEntry,
    DecodeMode,
    DeviceEntry,
    DrafterEntry,
    DraftModelEntry,
    DraftVocabEntry,
    EarlyExitEntry,
    FeatureHeadEntry,
    FileEntry,
    GraphEntry,
    GraphName,
    Manifest,
    ModelEntry,
    PassEntry,
    RecycleEntry,
    SchemaError,
    SelfDraftEntry,
    TokenizerEntry,
    TreeEntry,
    TreeProvenance,
    VerifyCostEntry,
)

__all__ = [
    "FORMAT_VERSION", "MANIFEST", "BackendEntry", "CheckEntry", "CorpusEntry", "DecodeMode", "DeviceEntry",
    "DraftModelEntry", "DraftVocabEntry", "DrafterEntry", "EarlyExitEntry", "FeatureHeadEntry", "FileEntry",
    "GraphEntry", "GraphName", "Manifest", "ModelEntry", "PassEntry", "RecycleEntry", "SchemaError",
    "SelfDraftEntry", "TokenizerEntry", "TreeEntry", "TreeProvenance", "VerifyCostEntry", "file_entries",
    "file_sha256", "read_manifest", "write_manifest",
]  # fmt: skip

MANIFEST = "manifest.json"
_RECOMPILE = "recompile it with skiptree compile"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file in the artifact folder except the manifest."""
    entries = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST):
        entries[path.relative_to(folder).as_posix()] = FileEntry(file_sha256(path), path.stat().st_size)
    return entries


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Hash every file of the artifact into the manifest and write it (last, so a crash before
    this leaves a folder with no manifest, which is refused)."""
    manifest = dataclasses.replace(manifest, format_version=FORMAT_VERSION, files=file_entries(folder))
    data = json.loads(json.dumps(manifest.to_json()))
    written = Manifest.from_json(data)
    if written.to_json() != data:  # what is written is what the runtime reads back
        raise SchemaError("the manifest does not read back as written")
    (Path(folder) / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")
    return written


def read_manifest(folder: Path, check_hashes: bool = True) -> Manifest:
    """The manifest of an artifact, after checking its format and every file's size and sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelSourceError(f"{folder} has no {MANIFEST}, so it is not a skiptree artifact",
                               f"pass a folder written by skiptree compile, or {_RECOMPILE}")  # fmt: skip
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path} is not valid JSON ({exc})", _RECOMPILE) from exc
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        stated = "no format version" if version is None else f"format version {version}"
        raise ModelSourceError(f"artifact {folder} has {stated}, this skiptree reads {FORMAT_VERSION}",
                               f"{_RECOMPILE} from this version")  # fmt: skip
    try:
        manifest = Manifest.from_json(data)
    except SchemaError as exc:
        raise ModelSourceError(f"artifact {folder} has a manifest this skiptree cannot read ({exc})",
                               f"{_RECOMPILE} from this version") from None  # fmt: skip
    for name, entry in manifest.files.items():
        file = folder / name
        if not file.is_file():
            raise IntegrityError(f"artifact file {name} is missing from {folder}", _RECOMPILE)
        if file.stat().st_size != entry.bytes:
            raise IntegrityError(
                f"artifact file {name} has {file.stat().st_size} bytes, the manifest says {entry.bytes}",
                f"the artifact is truncated or corrupted; {_RECOMPILE}",
            )
        if check_hashes and file_sha256(file) != entry.sha256:
            raise IntegrityError(
                f"artifact file {name} does not match its sha256 in the manifest",
                f"the artifact is corrupted or was modified; {_RECOMPILE}",
            )
    return manifest
