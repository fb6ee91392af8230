"""Lower the IR's step graphs to ONNX files that ONNX Runtime runs.

`torch.onnx.export(ExportedProgram, dynamo=True)` translates each graph; the onnxscript optimizer
folds constants; weights go to one external-data file per graph (`step.onnx.data`), so models
past protobuf's 2 GB limit work the same way. Each cache write is one ScatterND whose output the
runtime binds to its input buffer (see `skiptree.runtime.onnx_step`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from skiptree.compiler.ir.graph import ModelIR, StepGraph
from skiptree.compiler.lower.external_data import SpillFile, save_streaming
from skiptree.compiler.lower.onnx_contrib import (
    TRANSLATIONS,
    drop_unused_contrib_outputs,
    pack_attention_projections,
)
from skiptree.compiler.lower.onnx_weights import optimize, reference_weights, save_with_weights
from skiptree.compiler.lower.quantize import quantize_onnx_file
from skiptree.models.weight_store import WeightRef, refs_by_storage
from skiptree.runtime.manifest import GraphName


def _rename_dynamic_dims(model: onnx.ModelProto, step: StepGraph) -> None:
    """Export names the token dim after its symbol (e.g. `s18`); give I/O our names back."""
    specs = {spec.name: spec for spec in [*step.inputs, *step.outputs]}
    for value in [*model.graph.input, *model.graph.output]:
        spec = specs[value.name]
        for dim, size in zip(value.type.tensor_type.shape.dim, spec.shape, strict=True):
            if isinstance(size, str):
                dim.dim_param = size


def export_onnx(step: StepGraph, path: Path, refs: dict[int, WeightRef] | None = None, compact: bool = True
                ) -> Path:  # fmt: skip
    """Write one step graph as `path` (+ `path.data` holding the weights). `refs`: a by-reference
    model's placeholders (`refs_by_storage`), whose weights are read from their checkpoint as written.
    `compact=False` (a graph quantised next, which rewrites the data anyway): packed q|k|v go to a
    second file, `path.packed.data`, and the separate q, k, v stay in `path.data`, unread (no copy
    of every weight on disk)."""
    path = Path(path).resolve()  # the rewrites below run in its folder
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # exporter chatter (torchvision ops, pytree notices)
        for name in ("torch.onnx", "onnx_ir", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
        program = torch.onnx.export(
            step.program,
            input_names=[spec.name for spec in step.inputs],
            output_names=[spec.name for spec in step.outputs],
            dynamo=True,
            custom_translation_table=TRANSLATIONS,  # fused ops -> ORT contrib ops
            optimize=False,  # onnx_weights.optimize: the same passes, with large weights never in memory
            verbose=False,
        )
        reference_weights(program.model, refs or {})
        optimize(program.model)
        save_with_weights(program.model, path, progress=True)
    del program  # (its lazy weights hold no memory; its graph does)
    model = onnx.load(str(path), load_external_data=False)  # the weights stay where they are
    _rename_dynamic_dims(model, step)
    drop_unused_contrib_outputs(model)
    if not any(node.op_type == "GroupQueryAttention" for node in model.graph.node):
        onnx.save(model, str(path))
        return path
    packed = Path(f"{path.name}.spill" if compact else f"{path.name}.packed.data")
    with contextlib.chdir(path.parent), SpillFile(packed, keep=not compact) as spill:
        pack_attention_projections(model, spill)  # q|k|v read (external references resolve here), spilled
        if compact:
            save_streaming(model, path)
        else:
            onnx.save(model, str(path))
    return path


def lower_to_onnx(ir: ModelIR, folder: Path) -> dict[str, dict]:
    """Export the IR's graphs into `folder`; returns graph name -> {"file", "quantization"}.

    With a verify graph the step graph is not exported: a chain tree is a causal step, so the
    verify graph serves both, and the artifact (and memory) holds the weights once. Graphs that
    QuantizeWeights marked get their constant-weight MatMuls quantised (`compiler/lower/quantize.py`).
    """
    files = {}
    refs = refs_by_storage(ir.model)
    for name, step in ir.graphs.items():
        if name == GraphName.STEP and GraphName.VERIFY in ir.graphs:
            continue
        spec = ir.weight_quantization.get(name)
        path = export_onnx(step, Path(folder) / f"{name}.onnx", refs, compact=spec is None)
        quantization = quantize_onnx_file(path, spec, ir.config.vocab_size, ir.weight_grid) if spec else None
        files[name] = {"file": path.name, "quantization": quantization}
    return files
