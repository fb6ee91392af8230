"""The exit adapter (Kangaroo): a small trained block between a prefix exit and the output head.

A prefix exit after E layers shares the target's K/V (SkipLayers) but its hidden state is far from
the last layer's (its top-1 agreement with the full model is low untrained: the session report of
`skiptree tune --train-draft exit-adapter` records it). The adapter maps it closer:
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


def save_trained(module: nn.Module, path: Path, record: dict[str, Any]) -> None:
    """A trained draft block's weights + training record, written to a temporary file and renamed
    (a kill loses nothing). Used for exit adapters and feature heads alike."""
    tmp = Path(path).with_suffix(".tmp")
    tensors = {name: value.detach().contiguous() for name, value in module.state_dict().items()}
    save_file(tensors, str(tmp), metadata={"record": json.dumps(record)})
    tmp.replace(path)


def load_trained(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, training record) of a trained draft block (`kind`: "exit-adapter", "feature-head")."""
    path = Path(path)
    if not path.is_file():
        fix = f"train one with skiptree tune MODEL --train-draft {kind} --session DIR"
        raise SkiptreeError(f"{kind} weights {path} do not exist", fix)
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            record = json.loads((handle.metadata() or {}).get("record", "{}"))
        return load_file(str(path)), record
    except Exception as error:  # a truncated or foreign file: say which and what to do
        raise SkiptreeError(f"{kind} weights {path} cannot be read ({error})",
                            f"delete it and train again with --train-draft {kind}") from None  # fmt: skip


def load_adapter(path: Path) -> tuple[ExitAdapter, dict[str, Any]]:
    tensors, record = load_trained(path, "exit-adapter")
    hidden, inner = tensors["down.weight"].shape
    adapter = ExitAdapter(hidden, inner, record.get("norm_eps", 1e-5))
    adapter.load_state_dict(tensors)
    return adapter.eval(), record
