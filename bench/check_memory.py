"""Peak memory of compile's check alone, on an artifact already compiled (issue 31).

The check (`compile_model`'s last phase, `check_against_eager`) runs the artifact in ONNX Runtime,
closes it, then runs eager torch over the same weights read module by module. This script runs
just that phase the way compile does (the source traced by reference for the IR, the reference
model streamed), so its peak RSS can be measured without compiling again: run it under
`/usr/bin/time -v`, e.g. for the artifact `bench/compile_memory.py` wrote for the 8B model:

    /usr/bin/time -v .venv/bin/python bench/check_memory.py synthetic:llama-3-8b \
        bench/.work/compile_memory/synthetic-8b-int4
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from skiptree.compiler.compile import check_against_eager
from skiptree.compiler.ir.trace import trace_model
from skiptree.compiler.quality import PASSAGE
from skiptree.models.loader import load_model
from skiptree.models.source import resolve_model_dir
from skiptree.models.weight_store import stream_weights
from skiptree.runtime.manifest import read_manifest
from skiptree.runtime.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the model source the artifact was compiled from")
    parser.add_argument("artifact", type=Path)
    args = parser.parse_args()
    folder = resolve_model_dir(args.source)
    manifest = read_manifest(args.artifact, check_hashes=False)
    start = time.perf_counter()
    ir = trace_model(load_model(folder, by_reference=True), manifest.max_seq_len)
    passage = Tokenizer.from_folder(folder).encode(PASSAGE)[: ir.max_seq_len]
    quantized = any(graph.quantization for graph in manifest.graphs.values())
    reference = stream_weights(load_model(folder, by_reference=True))
    check = check_against_eager(ir, reference, args.artifact, manifest.graphs, manifest.backend,
                                manifest.decode_mode, passage if quantized else None)  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(f"{time.perf_counter() - start:.0f} s, peak {peak:.2f} GB: {check}", file=sys.stderr)


if __name__ == "__main__":
    main()
