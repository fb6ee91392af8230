"""Which machine and backend this is: a fingerprint that artifacts and tuning sessions record.

Measurements (and tuned trees) are only valid on the hardware and backend they were made on,
so they are keyed by this fingerprint. numpy/stdlib only: the runtime uses it too.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(backend: str, backend_version: str, accelerator: str = "cpu") -> dict[str, Any]:
    """What the fingerprint is made of, kept readable in the manifest."""
    return {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "accelerator": accelerator,
        "backend": backend,
        "backend_version": backend_version,
    }


def device_fingerprint(description: dict[str, Any]) -> str:
    """A short stable hash of a `device_description`."""
    text = "|".join(f"{key}={description[key]}" for key in sorted(description))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
