"""Load a compiled artifact: check its manifest and hashes, then run it. numpy + onnxruntime only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skiptree.errors import ModelSourceError
from skiptree.runtime.generator import TextGenerator
from skiptree.runtime.manifest import read_manifest
from skiptree.runtime.onnx_step import OnnxStepModel, SessionConfig
from skiptree.runtime.tokenizer import Tokenizer


class Runtime(TextGenerator):
    """A loaded artifact: `generate(...)` with transformers' option names; see `TextGenerator`."""

    def __init__(self, folder: Path, threads: int | None = None, check_hashes: bool = True):
        self.folder = Path(folder)
        self.manifest: dict[str, Any] = read_manifest(self.folder, check_hashes=check_hashes)
        backend = self.manifest["backend"]
        if backend["name"] != "onnxruntime":
            raise ModelSourceError(f"artifact backend '{backend['name']}' is not supported here",
                                   "recompile with --backend onnxruntime")  # fmt: skip
        step = self.manifest["graphs"]["step"]
        session = SessionConfig(
            threads=backend.get("threads", 0) if threads is None else threads,
            optimization_level=backend.get("optimization_level", "extended"),
        )
        self.step_model = OnnxStepModel(self.folder / step["file"], step["signature"], session)
        self.tokenizer = Tokenizer.from_folder(self.folder / self.manifest["tokenizer"]["folder"])
        self.eos_token_ids = list(self.manifest["tokenizer"]["eos_token_ids"])

    @property
    def description(self) -> str:
        backend = self.manifest["backend"]
        return f"{backend['name']} {backend['version']} artifact, {self.manifest['model']['source']}"


def is_artifact(path: Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def load(path: str | Path, threads: int | None = None) -> Runtime:
    """Open an artifact directory written by `skiptree compile`."""
    return Runtime(Path(path), threads=threads)
