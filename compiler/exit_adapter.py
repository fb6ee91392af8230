"""The exit adapter (Kangaroo): a small trained block between a prefix exit and the output head.

A prefix exit after E layers shares the target's K/V (SkipLayers) but its hidden state is far from
the last layer's (SmolLM2: 3-12% top-1 agreement untrained). The adapter maps it closer:
    adapter(h) = h + down(silu(gate(n)) * up(n)),  n = RMSNorm(h)
`down` starts at zero, so an untrained adapter is exactly the plain exit. Weights are stored as
safetensors with their training record (data, steps, seed, metrics) in the metadata; no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from skiptree.errors import SkiptreeError
from skiptree.models.llama import RMSNorm


class ExitAdapter(nn.Module):
    def __init__(self, hidden: int, inner: int, eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNorm(hidden, eps)
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        return x + self.down(nn.functional.silu(self.gate(n)) * self.up(n))


def save_adapter(adapter: ExitAdapter, path: Path, record: dict[str, Any]) -> None:
    """Weights + training record, written to a temporary file and renamed (a kill loses nothing)."""
    tmp = Path(path).with_suffix(".tmp")
    tensors = {name: value.detach().contiguous() for name, value in adapter.state_dict().items()}
    save_file(tensors, str(tmp), metadata={"record": json.dumps(record)})
    tmp.replace(path)


def load_adapter(path: Path) -> tuple[ExitAdapter, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        fix = "train one with skiptree tune --train-draft exit-adapter --session DIR"
        raise SkiptreeError(f"exit adapter {path} does not exist", fix)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        record = json.loads((handle.metadata() or {}).get("record", "{}"))
    tensors = load_file(str(path))
    hidden, inner = tensors["down.weight"].shape
    adapter = ExitAdapter(hidden, inner, record.get("norm_eps", 1e-5))
    adapter.load_state_dict(tensors)
    return adapter.eval(), record
