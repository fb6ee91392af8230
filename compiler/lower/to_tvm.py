"""Lower the IR's step graphs to Apache TVM: torch.export -> Relax -> `tvm.compile` -> shared libraries.

Each graph becomes one shared library (`verify.so`) run by Relax's VirtualMachine; the weights are
function arguments (`keep_params_as_input`), stored once in `weights.safetensors` and shared by every
graph of the artifact. Relax is functional: a graph returns its caches as new tensors, and the
runtime keeps those as the cache of the next call (see `skiptree.runtime.tvm_step`).

MetaSchedule tunes static shapes only, so each graph also gets static copies of its entry for the
token counts that decoding runs every step (`tokens_1` for a decode step, `tokens_N` for a tree of
N nodes): the token dim is bound to a constant (`bind_symbolic_vars`). Cache writes go in place
(`tvm_inplace`); the step's matmuls get our hand-written schedules (`tvm_schedules`); of the rest,
functions with a database record run the tuned schedule, the others dlight's CPU GEMV rule or TVM's
default loops (dlight's CPU reduction rule is not used: it made an RMSNorm of one token 135 us
instead of 0.5 us unscheduled).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from safetensors.numpy import save_file
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program
from tvm.s_tir import dlight, meta_schedule
from tvm.target import codegen

from skiptree.compiler.ir.graph import ModelIR, StepGraph
from skiptree.compiler.lower.tvm_inplace import write_caches_in_place
from skiptree.compiler.lower.tvm_int4 import Int4Choice, kernel_object, quantize_matmuls
from skiptree.compiler.lower.tvm_schedules import schedule_step_matmuls
from skiptree.runtime.manifest import GraphName
from skiptree.runtime.tvm_step import STATIC_PREFIX  # (its import sizes TVM's pool: pool_for_every_core)

WEIGHTS_FILE = "weights.safetensors"


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Silence TVM's C++ warnings (written to fd 2 while importing and compiling)."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def host_target(threads: int) -> tvm.target.Target:
    """LLVM for this machine's CPU (`mcpu` from LLVM's host detection: AVX-512 on znver4 here)."""
    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(),
                              "num-cores": max(1, threads)})  # fmt: skip


def target_json(target: tvm.target.Target) -> dict[str, Any]:
    return {"kind": target.kind.name, "mcpu": str(target.attrs.get("mcpu", "")),
            "num-cores": int(target.attrs.get("num-cores", 1))}  # fmt: skip


@dataclass
class ImportedGraph:
    """One step graph as a Relax module: entry `main` (dynamic token count) and static copies."""

    module: tvm.IRModule
    param_names: list[str]  # weight keys (content hashes), in the order the entries take them
    param_values: list[np.ndarray]
    static_tokens: list[int]
    int4_matmuls: int = 0  # matmuls of an entry rewritten to the int4 kernel


def _parameter_names(step: StepGraph) -> list[str]:
    signature = step.program.graph_signature
    return [spec.target for spec in signature.input_specs if spec.kind.name == "PARAMETER"]


def import_graph(step: StepGraph, static_tokens: tuple[int, ...] = (), int4: Int4Choice | None = None
                 ) -> ImportedGraph:  # fmt: skip
    """Import a step graph into Relax with its weights as arguments; add `tokens_N` static entries.

    Each static entry is its own import with the token dim bound to N: `FuseTransposeMatmul`
    (which turns `matmul(x, permute_dims(W))` into one TIR function reading W, or a layer's K cache,
    as stored, instead of a transposed copy made on every call) refuses constants shared between
    functions, and the fused functions of a static entry are static too, so MetaSchedule tunes them.
    Weight-only computations left after that are lifted out (`LiftTransformParams`) and run here,
    once: the artifact stores the weights as the entries take them. With `int4`, the chosen
    weights' matmuls run our int4 kernel first (`tvm_int4`), and their codes and scales are what is
    lifted and stored (`ImportedGraph.int4_matmuls` counts them).
    """
    with quiet_native_logs():
        logging.getLogger("torch").setLevel(logging.ERROR)
        main, params = _import_main(step)
        values = [tensor.numpy() for tensor in params]
        names = _parameter_names(step)
        state = step.program.state_dict
        if [tuple(state[name].shape) for name in names] != [value.shape for value in values]:
            raise RuntimeError(f"graph {step.name}: the Relax parameters are not the exported program's")
        functions, made = {"main": main}, []
        token_dim = _token_dim(main)
        for tokens in sorted({t for t in static_tokens if token_dim and 1 <= t <= token_dim[1]}):
            fresh = _import_main(step)[0]
            entry = f"{STATIC_PREFIX}{tokens}"
            functions[entry] = fresh.bind_symbolic_vars({_token_dim(fresh)[0]: tokens}).with_attr(
                "global_symbol", entry)  # fmt: skip
            made.append(tokens)
        module, quantized = tvm.IRModule(functions), 0
        if int4 is not None:
            module, quantized = quantize_matmuls(module, int4)
        module = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                           relax.transform.CanonicalizeBindings(),
                                           relax.transform.FuseTransposeMatmul()])(module)  # fmt: skip
        if not values:
            return ImportedGraph(module, [], [], made)
        module = relax.transform.LiftTransformParams(shared_transform=True)(module)
        values = run_transform(module, values)
        del module["transform_params"]
    return ImportedGraph(module, [weight_key(value) for value in values], values, made, quantized)


def _import_main(step: StepGraph) -> tuple[relax.Function, list]:
    module = from_exported_program(step.program, keep_params_as_input=True)
    module, params = relax.frontend.detach_params(module)
    return module["main"], params.get("main", [])


def _token_dim(function: relax.Function) -> tuple[str, int] | None:
    """(name, upper bound) of the function's one dynamic dim (the token count), if it has one."""
    bounds = function.attrs.get("tir_var_upper_bound") if function.attrs is not None else None
    if not bounds or len(bounds) != 1:
        return None
    name = next(iter(bounds.keys()))
    return str(name), int(bounds[name])


def weight_key(value: np.ndarray) -> str:
    """A weight's key in the artifact: its content hash (graphs that share a weight share its key)."""
    digest = hashlib.sha256(f"{value.dtype}{value.shape}".encode())
    digest.update(np.ascontiguousarray(value).data)
    return digest.hexdigest()[:24]


def run_transform(module: tvm.IRModule, values: list[np.ndarray]) -> list[np.ndarray]:
    """Run the module's lifted `transform_params` function on the weights (at compile time)."""
    target = tvm.target.Target({"kind": "llvm"})
    transform = module["transform_params"]
    called = {gv: module[gv] for gv in relax.analysis.all_global_vars(transform)}  # the TIR it calls
    module = tvm.IRModule({"transform_params": transform, **called})
    executable = tvm.compile(module, target)
    machine = relax.VirtualMachine(executable, tvm.cpu())
    outputs = machine["transform_params"]([tvm.runtime.tensor(value) for value in values])
    return [output.numpy() for output in outputs]


def legalize(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Relax ops -> fused TIR functions (what MetaSchedule tunes and the database is keyed by):
    cache writes in place, the step matmuls scheduled by our rules (`tvm_schedules`)."""
    with target, quiet_native_logs():
        module = write_caches_in_place(module)
        return tvm.transform.Sequential([relax.get_pipeline("zero"), schedule_step_matmuls])(module)


def static_module(module: tvm.IRModule) -> tvm.IRModule:
    """Only the static entries (and the TIR they call): what MetaSchedule can tune."""
    dead = [gv for gv in module.functions if gv.name_hint == "main"]
    pruned = tvm.IRModule({gv: func for gv, func in module.functions.items() if gv not in dead})
    entries = [gv.name_hint for gv in pruned.functions if gv.name_hint.startswith(STATIC_PREFIX)]
    return relax.transform.DeadCodeElimination(entries)(pruned)


def build(module: tvm.IRModule, target: tvm.target.Target, database_dir: Path | None = None) -> Any:
    """Legalised module -> executable: tuned schedules from the database, dlight's GEMV rule for the rest."""
    with target, quiet_native_logs():
        if database_dir is not None and (Path(database_dir) / "database_workload.json").is_file():
            database = meta_schedule.database.JSONDatabase(work_dir=str(database_dir))
            with database:
                module = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(module)
        module = dlight.ApplyDefaultSchedule(dlight.cpu.GEMV())(module)
        return tvm.compile(module, target)


def lower_to_tvm(ir: ModelIR, folder: Path, target: tvm.target.Target, static_tokens: tuple[int, ...] = (1,),
                 database_dir: Path | None = None, tune: Callable[[str, ImportedGraph], None] | None = None
                 ) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Build the IR's graphs into `folder` (`{graph}.so` + the shared `weights.safetensors`).

    Returns graph name -> {"file", "params" (weight keys), "static_tokens", "quantization"}. As for
    ONNX, the step graph is skipped when a verify graph serves as the step. `tune(name, imported)`,
    when given, runs before each graph is built (MetaSchedule into `database_dir`). Graphs that
    QuantizeWeights marked run their matmuls on the int4 kernel (`tvm_int4`), linked into their library,
    and have only the dynamic entry, so that every call runs the same code whatever its token count.
    """
    folder = Path(folder)
    weights: dict[str, np.ndarray] = {}
    graphs: dict[str, dict[str, Any]] = {}
    kernel: list[str] = []  # the int4 kernel's object file, compiled once, for the graphs that call it
    with tempfile.TemporaryDirectory() as scratch:
        for name, step in ir.graphs.items():
            if name == GraphName.STEP and GraphName.VERIFY in ir.graphs:
                continue
            spec = ir.weight_quantization.get(name)
            int4 = Int4Choice(spec.head, ir.config.vocab_size) if spec else None
            # batch invariance needs one code path for every token count: a static entry is compiled
            # (and tuned) for its own count, and its reductions are ordered differently from `main`'s
            imported = import_graph(step, () if int4 else static_tokens, int4)
            if tune is not None:
                tune(name, imported)
            weights.update(zip(imported.param_names, imported.param_values, strict=True))
            executable = build(legalize(imported.module, target), target, database_dir)
            if imported.int4_matmuls and not kernel:
                kernel.append(str(kernel_object(Path(scratch))))
            linked = kernel if imported.int4_matmuls else []
            executable.export_library(str(folder / f"{name}.so"), options=linked)
            quantization = {**spec.to_json(), "quantized_matmuls": imported.int4_matmuls,
                            "kernel": "skiptree int4", "batch_invariant": True} if spec else None  # fmt: skip
            graphs[name] = {"file": f"{name}.so", "params": imported.param_names,
                            "static_tokens": imported.static_tokens, "quantization": quantization}
    save_file({key: np.ascontiguousarray(v) for key, v in weights.items()}, str(folder / WEIGHTS_FILE))
    return graphs


def tvm_lowering(ir: ModelIR, folder: Path, options: Any, log: Callable[[str], None]
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """`lower_to_tvm` for `CompileOptions`; returns (graph entries, the manifest's backend entry).

    Static entries: one token (a decode step) and, with a draft, the tree's node count (a verify step).
    """
    # MetaSchedule tuning (xgboost, a worker pool) is loaded only when a compile tunes; it imports
    # this module's helpers, so a module-level import would also be a cycle.
    from skiptree.compiler.lower.tvm_tune import ScheduleTuning, tune_schedules

    target = host_target(options.threads or 1)
    static_tokens = options.tvm_static_tokens or (
        (1,) if options.draft is None else (1, options.tree.size + 1))
    tuning = ScheduleTuning(options.tvm_trials, options.tvm_trials_per_task, options.threads or 1,
                            options.tvm_tune_only)  # fmt: skip
    tuned: dict[str, Any] = {}

    def tune(name: str, imported: ImportedGraph) -> None:
        if options.tvm_trials and not imported.static_tokens:
            log(f"         {name}: no static entry to tune (int4 graphs run one batch-invariant entry)")
        elif options.tvm_trials and name in (GraphName.VERIFY, GraphName.STEP):  # run every step
            tuned[name] = tune_schedules(imported, target, options.tvm_database, tuning, log)

    graphs = lower_to_tvm(ir, folder, target, static_tokens, options.tvm_database, tune)
    backend = {"name": "tvm", "version": tvm.__version__, "target": target_json(target),
               "threads": options.threads, "weights": WEIGHTS_FILE,
               "database": str(options.tvm_database) if options.tvm_database else None,
               "tuning": tuned or None}  # fmt: skip
    return graphs, backend
