"""One exception hierarchy for everything skiptree refuses to do.

Every message is built by `problem(...)`: what is wrong, then what to do about it, on one line,
so the CLI can print it without a traceback and tests can pin it.
"""

from __future__ import annotations


def problem(what: str, fix: str) -> str:
    """The one format of every skiptree error message: `<what is wrong>; <how to fix it>`."""
    return f"{what.rstrip('. ')}; {fix.rstrip('. ')}."


class SkiptreeError(Exception):
    """Base of every error skiptree raises on purpose (bad input, missing files, refused options)."""

    def __init__(self, what: str, fix: str):
        super().__init__(problem(what, fix))
        self.what = what
        self.fix = fix


class ModelSourceError(SkiptreeError):
    """A model folder, GGUF file or zoo name that cannot be used as given."""


class UnsupportedArchitectureError(SkiptreeError):
    """An architecture with no definition in `skiptree.models`."""


class IntegrityError(SkiptreeError):
    """A file whose size or sha256 is not what it must be (truncated, corrupted, tampered)."""


class FetchError(SkiptreeError):
    """Downloading or assembling a model-zoo checkpoint failed."""


class GenerationError(SkiptreeError):
    """Invalid generation request: prompt too long for the context, bad sampling options."""
