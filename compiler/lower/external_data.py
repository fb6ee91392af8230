"""ONNX weights written tensor by tensor, never all in memory (issue 31: weights by reference).

`onnx.load(..., load_external_data=True)` followed by `onnx.save(...)` holds every weight of a
graph at once, which is what a rewrite of a few weights (packing q|k|v, quantising the matmuls)
used to cost. Instead a graph is loaded without its weights and rewritten with the working
directory in its folder (`contextlib.chdir`: onnx's readers and ORT's quantizer resolve external
references against it, and read each tensor when, and only when, they need it); the rewrite adds
its new tensors in memory, and `save_streaming` writes the graph with every tensor moved to a new
data file one at a time: in-memory tensors are written and dropped, external ones copied from
their file in chunks.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

INLINE_BYTES = 1024  # smaller tensors stay in the graph (as onnx.save's size_threshold)
ALIGN = 4096  # each external tensor starts on a page: ORT can memory-map it
COPY_CHUNK = 64 << 20
TYPED_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _external(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _copy_external(tensor: TensorProto, base: Path, out) -> int:
    """Copy an external tensor's bytes from its file (relative to `base`) to `out`; returns the count."""
    fields = _external(tensor)
    offset, length = int(fields.get("offset", 0)), fields.get("length")
    with open(Path(base) / fields["location"], "rb") as source:
        source.seek(offset)
        remaining = int(length) if length is not None else os.fstat(source.fileno()).st_size - offset
        total = 0
        while remaining > 0:
            chunk = source.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise OSError(f"{fields['location']} ends before tensor {tensor.name}'s {length} bytes")
            out.write(chunk)
            remaining -= len(chunk)
            total += len(chunk)
    return total


def _point_to(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("external_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


class SpillFile:
    """Tensors a rewrite makes (packed q|k|v, quantised codes), moved out of memory as they are made:
    appended to `path` (beside the graph: the working directory of the rewrite, see module doc)
    and replaced by references to it, which `save_streaming` then copies. Removed on exit unless `keep`."""

    def __init__(self, path: Path, keep: bool = False):
        self.path, self.keep = Path(path), keep

    def __enter__(self) -> SpillFile:
        self.out = open(self.path, "wb")
        return self

    def __exit__(self, *exc) -> None:
        self.out.close()
        if not self.keep:
            self.path.unlink(missing_ok=True)

    def move(self, tensor: TensorProto) -> None:
        """Write an in-memory tensor's bytes to the file and point the tensor at them."""
        if tensor.data_location == TensorProto.EXTERNAL or tensor.ByteSize() < INLINE_BYTES:
            return
        raw = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
        offset = self.out.tell()
        self.out.write(raw)
        self.out.flush()  # readers open the file by name
        for field in TYPED_FIELDS:
            tensor.ClearField(field)
        _point_to(tensor, self.path.name, offset, len(raw))

    def move_new(self, graph: onnx.GraphProto, start: int) -> None:
        """Move the initializers `graph` gained after its first `start` ones."""
        for tensor in graph.initializer[start:]:
            self.move(tensor)


def save_streaming(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` to `path` and its weights to `path.data`, one tensor at a time (see module doc);
    returns the data file. The previous `path.data` may be one of the sources: it is replaced last."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    building = data.with_name(data.name + ".writing")
    with open(building, "wb") as out:
        for tensor in model.graph.initializer:
            external = tensor.data_location == TensorProto.EXTERNAL
            if not external and tensor.ByteSize() < INLINE_BYTES:
                continue
            out.write(b"\0" * (-out.tell() % ALIGN))
            offset = out.tell()
            if external:
                length = _copy_external(tensor, path.parent, out)
            else:
                raw = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
                out.write(raw)
                length = len(raw)
                for field in TYPED_FIELDS:
                    tensor.ClearField(field)
            _point_to(tensor, data.name, offset, length)
    onnx.save(model, str(path))
    building.replace(data)
    for stale in path.parent.glob(f"{path.name}.*.data"):  # other data files of this graph: all copied
        stale.unlink()
    return data

