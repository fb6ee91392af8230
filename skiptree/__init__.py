"""skiptree: compile causal LMs into faster, lossless speculative decoders.

The public face only; the work happens in `skiptree.models`, `skiptree.compiler`,
`skiptree.passes` and `skiptree.runtime`. Heavy imports (torch) happen lazily, inside the
functions that need them, so `import skiptree` and `skiptree.load` stay torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from skiptree.errors import (
    FetchError,
    GenerationError,
    IntegrityError,
    ModelSourceError,
    SkiptreeError,
    UnsupportedArchitectureError,
)

if TYPE_CHECKING:
    from skiptree.runtime.artifact import Runtime

__version__ = "0.1.0"


def compile(model: str | Path, out_dir: str | Path, **options: Any) -> Path:  # noqa: A001
    """Compile `model` (zoo name, HF folder or .gguf file) into an artifact at `out_dir`.

    `options` are the fields of `skiptree.compiler.options.CompileOptions` (backend,
    max_seq_len, optimization_level, threads, dump_ir, verify, check).
    """
    # torch-heavy: imported when compiling, so `import skiptree` and `skiptree.load` stay torch-free
    from skiptree.compiler.compile import compile_model
    from skiptree.compiler.options import CompileOptions

    return compile_model(model, Path(out_dir), CompileOptions(**options))


def load(path: str | Path, threads: int | None = None, speculative: bool = True) -> Runtime:
    """Open an artifact written by `compile`; its manifest and file hashes are checked first.

    An artifact compiled with a drafter decodes speculatively unless `speculative=False`.
    """
    from skiptree.runtime.artifact import load as load_artifact  # onnxruntime: only when loading

    return load_artifact(path, threads=threads, speculative=speculative)


__all__ = [
    "FetchError",
    "GenerationError",
    "IntegrityError",
    "ModelSourceError",
    "SkiptreeError",
    "UnsupportedArchitectureError",
    "__version__",
    "compile",
    "load",
]
