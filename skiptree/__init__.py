"""skiptree: compile causal LMs into faster, lossless speculative decoders.

The public face only; the work happens in `skiptree.models`, `skiptree.compiler`,
`skiptree.passes` and `skiptree.runtime`. Heavy imports (torch) happen lazily so that
`import skiptree` stays cheap and torch-free.
"""

from __future__ import annotations

from skiptree.errors import (
    FetchError,
    GenerationError,
    IntegrityError,
    ModelSourceError,
    SkiptreeError,
    UnsupportedArchitectureError,
)

__version__ = "0.1.0"

__all__ = [
    "FetchError",
    "GenerationError",
    "IntegrityError",
    "ModelSourceError",
    "SkiptreeError",
    "UnsupportedArchitectureError",
    "__version__",
]
