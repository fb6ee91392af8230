"""The weights of an exported ONNX program, written one tensor at a time (issue 31).

`torch.onnx.export` wraps each parameter as an initializer holding the torch tensor. For a model
loaded by reference (`skiptree.models.weight_store`) those tensors are placeholders: here each
becomes an `onnx_ir.LazyTensor` that reads its checkpoint tensor when, and only when, the saver
asks for its bytes. The optimizer's one folding of large weights (a `Transpose` read by nothing
else, e.g. `MatMul(x, Transpose(W))` of a linear layer) is done here instead, lazily too: the
transposed tensor is computed while it is written. `ir.save` then writes the data file tensor by
tensor, so memory holds at most one weight (and its transpose) at any time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnxscript import optimizer
from tqdm import tqdm

from skiptree.models.weight_store import WeightRef

LARGE = 8192  # elements: the optimizer folds nothing larger (onnxscript's input size limit) except transposes
ALIGN = 4096  # each large tensor starts on a page: ORT can memory-map it


def reference_weights(model: ir.Model, refs: dict[int, WeightRef]) -> int:
    """Turn every initializer whose torch tensor is a placeholder into a lazy read of its reference.
    Returns how many."""
    count = 0
    for value in model.graph.initializers.values():
        raw = getattr(value.const_value, "raw", None)
        ref = refs.get(raw.untyped_storage().data_ptr()) if hasattr(raw, "untyped_storage") else None
        if ref is None:
            continue
        whole = raw.data_ptr() == raw.untyped_storage().data_ptr() and raw.is_contiguous()
        if not whole or tuple(raw.shape) != (ref.shape[::-1] if ref.transpose else ref.shape):
            raise RuntimeError(f"initializer {value.name} is part of weight {ref.name}, loaded by reference:"
                               " a pass that copies weight values needs the model in memory")  # fmt: skip
        tensor = value.const_value
        value.const_value = ir.LazyTensor(_reader(ref), tensor.dtype, tensor.shape, name=value.name)
        count += 1
    return count


def _reader(ref: WeightRef):
    return lambda: ir.Tensor(ref.read().numpy())


def _transposer(source: ir.TensorProtocol, axes: tuple[int, ...] | None):
    return lambda: ir.Tensor(np.ascontiguousarray(np.transpose(source.numpy(), axes)))


def _large_transpose(node: ir.Node) -> bool:
    weight = node.inputs[0] if node.op_type == "Transpose" and node.domain == "" else None
    return (weight is not None and weight.is_initializer() and weight.const_value is not None
            and weight.const_value.size > LARGE and len(weight.uses()) == 1)  # fmt: skip


def optimize(model: ir.Model) -> int:
    """onnxscript's optimizer (what `torch.onnx.export(optimize=True)` runs), with large weights'
    transposes folded lazily (see module doc). Returns how many were folded."""
    optimizer.optimize_ir(model, should_fold=lambda node: False if _large_transpose(node) else None)
    folded = 0
    graph = model.graph
    for node in [node for node in graph if _large_transpose(node)]:
        weight = node.inputs[0]
        perm = node.attributes.get("perm")
        axes = tuple(perm.as_ints()) if perm is not None else None
        source = weight.const_value
        stored = ir.Value(name=f"{weight.name}_transposed", type=weight.type,
                          shape=ir.Shape([weight.shape[i] for i in axes] if axes
                                         else list(weight.shape)[::-1]))  # fmt: skip
        stored.const_value = ir.LazyTensor(_transposer(source, axes), source.dtype, stored.shape,
                                           name=stored.name)  # fmt: skip
        graph.register_initializer(stored)
        node.outputs[0].replace_all_uses_with(stored)
        graph.remove(node, safe=True)
        graph.initializers.pop(weight.name)
        folded += 1
    return folded


def save_with_weights(model: ir.Model, path: Path, progress: bool = False) -> Path:
    """Write `model` to `path` and its initializers to `path.data`, one tensor at a time (a progress
    bar counts the bytes with `progress`, for graphs past 256 MB). Returns the data file."""
    data = Path(path).with_name(Path(path).name + ".data")
    tensors = [value.const_value for value in model.graph.initializers.values()
               if value.const_value is not None and value.const_value.nbytes > 256]  # fmt: skip
    total = sum(tensor.nbytes for tensor in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress or total < (256 << 20),
              desc=f"writing {Path(path).name} weights", leave=False) as bar:  # fmt: skip
        logging.getLogger("onnx_ir").setLevel(logging.ERROR)
        ir.save(model, str(path), external_data=data.name, alignment=ALIGN, align_threshold=ALIGN,
                callback=lambda tensor, info: bar.update(tensor.nbytes))  # fmt: skip
    return data
