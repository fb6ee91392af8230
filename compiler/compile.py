"""`compile_model`: model source -> artifact directory, in named phases with progress.

resolve source -> load weights -> trace -> passes -> lower -> check against eager torch ->
tokenizer -> manifest. The artifact is built in a temporary sibling folder and renamed into
place only when complete (the manifest, with every file's sha256, is written last).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

import skiptree
from skiptree.compiler.drafters.build import build_drafter
from skiptree.compiler.drafters.corpus import write_corpus
from skiptree.compiler.drafters.exit_calibration import calibrate_early_exit
from skiptree.compiler.drafters.recycle_warm import write_warm_table
from skiptree.compiler.drafters.verify_cost import measure_verify_cost
from skiptree.compiler.drafters.vocab import frequent_tokens
from skiptree.compiler.ir.graph import ModelIR
from skiptree.compiler.ir.pass_manager import PassManager
from skiptree.compiler.ir.trace import trace_model
from skiptree.compiler.lower.to_onnx import lower_to_onnx
from skiptree.compiler.options import CompileOptions
from skiptree.compiler.pipeline import build_pipeline
from skiptree.compiler.quality import PASSAGE, perplexity
from skiptree.compiler.specs import CompileOptionError
from skiptree.compiler.tune.measure import CALIBRATION_PROMPTS
from skiptree.models.base import CausalLM
from skiptree.models.gguf_convert import atomic_folder
from skiptree.models.gguf_grid import read_grid
from skiptree.models.loader import load_model, weight_files
from skiptree.models.reference import ReferenceStepper
from skiptree.models.source import resolve_model_dir
from skiptree.models.weight_store import stream_weights
from skiptree.runtime.artifact import open_backend, step_model_of
from skiptree.runtime.device import device_description, device_fingerprint
from skiptree.runtime.generator import read_eos_token_ids
from skiptree.runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    BackendEntry,
    CheckEntry,
    DecodeMode,
    DeviceEntry,
    DraftVocabEntry,
    EarlyExitEntry,
    GraphEntry,
    GraphName,
    Manifest,
    ModelEntry,
    PassEntry,
    TokenizerEntry,
    file_sha256,
    write_manifest,
)
from skiptree.runtime.onnx_step import SessionConfig
from skiptree.runtime.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")  # fmt: skip
CHECK_TOKENS = 8
EAGER_IN_MEMORY_BYTES = 2 << 30


def weights_sha256(folder: Path) -> str:
    """One sha256 over the model's weight files (each file's sha256, in name order)."""
    digest = hashlib.sha256()
    for path in weight_files(folder):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


LoweredFiles = tuple[dict[str, dict[str, Any]], dict[str, Any]]  # graph name -> files; backend entry


def lower_onnxruntime(ir: ModelIR, building: Path, options: CompileOptions, phase: Callable[[str], None]
                      ) -> LoweredFiles:  # fmt: skip
    phase("lowering to ONNX (torch.onnx dynamo export; about a minute for a 135M model)")
    backend = {"name": "onnxruntime", "version": onnxruntime.__version__,
               "optimization_level": options.optimization_level, "threads": options.threads}  # fmt: skip
    return lower_to_onnx(ir, building), backend


def lower_tvm(ir: ModelIR, building: Path, options: CompileOptions, phase: Callable[[str], None]
              ) -> LoweredFiles:  # fmt: skip
    from skiptree.compiler.lower.to_tvm import tvm_lowering  # imports tvm: only for TVM artifacts

    phase("lowering to TVM (torch.export -> Relax -> tvm.compile; about a minute for a 135M model)")
    return tvm_lowering(ir, building, options, phase)


LOWERINGS: dict[str, Callable[[ModelIR, Path, CompileOptions, Callable[[str], None]], LoweredFiles]] = {
    "onnxruntime": lower_onnxruntime,
    "tvm": lower_tvm,
}  # options.BACKENDS, each with its lowering


def lower(ir: ModelIR, building: Path, options: CompileOptions, phase: Callable[[str], None]
          ) -> tuple[dict[GraphName, GraphEntry], BackendEntry]:  # fmt: skip
    """Lower the IR's graphs for the chosen backend; returns the manifest's graphs and backend entries."""
    files, backend = LOWERINGS[options.backend](ir, building, options, phase)
    max_tree = options.verify_tokens  # verify's prefill chunk, also without a drafter
    graphs = {GraphName(name): GraphEntry.from_json({
        **entry, "signature": ir.graphs[name].signature_json(),
        "max_tree": max_tree if name == GraphName.VERIFY else None,
        "max_batch": options.max_batch if name == GraphName.VERIFY and options.max_batch > 1 else None},
        f"graphs.{name}")
        for name, entry in files.items()}  # fmt: skip
    return graphs, BackendEntry.from_json(backend, "backend")


def check_against_eager(ir: ModelIR, model: CausalLM, folder: Path, graphs: dict[GraphName, GraphEntry],
                        backend: BackendEntry, mode: DecodeMode, passage_ids: list[int] | None = None
                        ) -> CheckEntry:  # fmt: skip
    """Prefill + decode a few tokens on the lowered graphs (as decode mode `mode` runs them; early
    exit never exiting), each token its argmax, then the whole sequence in one eager torch forward
    (`model`, with the IR's weights: one pass over weights that may be read from disk); compare the
    logits of every decoded position. With `passage_ids` (a quantised artifact; at most max_seq_len
    tokens), also both perplexities on it. The lowered graphs are closed before eager torch runs:
    the check never holds the artifact and eager weights at once."""
    opened = open_backend(folder, backend, graphs, SessionConfig(threads=0))
    lowered = step_model_of(opened, graphs, mode, ir.config.num_layers)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, ir.config.vocab_size, CHECK_TOKENS)]
    steps = min(CHECK_TOKENS, ir.max_seq_len - CHECK_TOKENS)
    got, tokens = [lowered.prefill(prompt)], list(prompt)
    for _ in range(steps):
        tokens.append(int(np.argmax(got[-1])))
        got.append(lowered.decode(tokens[-1]))
    got_arr = np.stack(got)
    with_passage = bool(passage_ids) and len(passage_ids) >= 2 and mode != DecodeMode.EARLY_EXIT
    if with_passage:
        lowered.cache.length = 0
        ours = perplexity(lowered.forward(passage_ids, ("logits",))[0], passage_ids)
    del opened, lowered  # the sessions, and the artifact's weights with them
    gc.collect()
    stepper = ReferenceStepper(model, max_seq_len=ir.max_seq_len)
    expected_arr = stepper.forward(tokens)[len(prompt) - 1 :].float().numpy()
    ppl = {}
    if with_passage:
        stepper.length = 0
        reference = stepper.forward(passage_ids).float().numpy()
        ppl = {"float_perplexity": perplexity(reference, passage_ids), "perplexity": ours}
    return CheckEntry(
        steps=len(got),
        max_abs_logit_error=float(np.abs(expected_arr - got_arr).max()),
        argmax_agreement=float((expected_arr.argmax(-1) == got_arr.argmax(-1)).mean()),
        **ppl,
    )


def eager_model(folder: Path, dtype: torch.dtype, size: int, log: Callable[[str], None]) -> CausalLM:
    """The model for eager work (calibrations) with `size` bytes of weights: held in memory up to
    EAGER_IN_MEMORY_BYTES, else by reference, each module's weights read while it runs (slower, bounded)."""
    if size <= EAGER_IN_MEMORY_BYTES:
        return load_model(folder, dtype)
    log(f"         eager torch reads its {size / (1 << 30):.1f} GB of weights module by module (not held)")
    return stream_weights(load_model(folder, dtype, by_reference=True))


def calibration_prompts(options: CompileOptions, tokenizer: Tokenizer) -> list[list[int]]:
    """The calibration prompts as token ids, through the chat template when the model has one."""
    texts = options.calibration_prompts or CALIBRATION_PROMPTS
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}])
            if tokenizer.chat_template else tokenizer.encode(text) for text in texts]  # fmt: skip


def _prepare_output(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise CompileOptionError(
            f"{out_dir} exists and is not a skiptree artifact", "choose an empty or new -o folder"
        )


def free_drafter_state(options: CompileOptions, model, tokenizer, building: Path, phase, log
                       ) -> dict[str, Any]:  # fmt: skip
    """What free drafters carry in the artifact (DrafterEntry fields): a warm recycling table, a
    corpus datastore."""
    state: dict[str, Any] = {}
    draft = options.free_draft
    for source in draft.sources if draft else ():
        if source == "recycle":
            phase("warming the Token Recycling table on the calibration prompts (eager torch)")
            prompts = calibration_prompts(options, tokenizer)
            state["recycle"] = write_warm_table(model, prompts, building, options.max_seq_len)
            log(f"         {state['recycle'].rows_filled} token rows filled")
        if source == "corpus":
            phase(f"building the corpus lookup datastore from {draft.corpus}")
            state["corpus"] = write_corpus(draft.corpus, tokenizer, building, log)
    return state


def compile_model(
    source: str | Path,
    out_dir: Path,
    options: CompileOptions | None = None,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
) -> Path:
    """Compile a model (zoo name, HF folder or GGUF file) into an artifact at `out_dir`."""
    out_dir = Path(out_dir)
    options = options or CompileOptions()
    _prepare_output(out_dir)
    start = time.perf_counter()

    def phase(name: str) -> None:  # with the process's peak resident memory so far (Linux: KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
        log(f"[{time.perf_counter() - start:6.1f} s, peak {peak:5.2f} GB] {name}")

    phase(f"resolving {source}")
    folder = resolve_model_dir(source)
    size = options.draft_vocab or (options.early_exit.vocab if options.early_exit else 0)
    # By reference (models/weight_store.py) unless TVM's importer or a shrunk head reads weight values.
    by_reference = options.backend == "onnxruntime" and not size
    phase(f"loading weights from {folder}{' by reference' if by_reference else ''}")
    dtype = getattr(torch, options.dtype)
    model = load_model(folder, dtype, by_reference=by_reference)
    weight_bytes = sum(param.numel() * param.element_size() for param in model.parameters())
    eager = functools.cache(lambda: eager_model(folder, dtype, weight_bytes, log) if by_reference else model)
    options = options.validate(model.config.max_position_embeddings)
    tokenizer = Tokenizer.from_folder(folder)
    phase(f"tracing the step graph (max_seq_len {options.max_seq_len})")
    ir = trace_model(model, options.max_seq_len)
    if options.quantize or options.draft_quantize:  # a GGUF source's grid is kept where it maps
        ir.weight_grid = read_grid(folder)
    draft_vocab, coverage = (), None
    if size:
        phase(f"counting the target's {size} most frequent output tokens for the draft / exit heads")
        prompts = calibration_prompts(options, tokenizer)
        draft_vocab, coverage = frequent_tokens(model, prompts, size)
        log(f"         they cover {coverage:.3f} of the target's tokens on the calibration prompts")
    pipeline = build_pipeline(options, draft_vocab)
    phase(f"running {len(pipeline)} passes{' with the verifier' if options.verify else ''}")
    ir = PassManager(pipeline, verify=options.verify, dump_dir=options.dump_ir, log=log).run(ir)

    mode = (DecodeMode.EARLY_EXIT if options.early_exit
            else DecodeMode.SPECULATIVE if options.draft else DecodeMode.PLAIN)  # fmt: skip
    with atomic_folder(out_dir, replace=True) as building:  # an older artifact is replaced
        graphs, backend = lower(ir, building, options, phase)
        check = None
        if options.check:
            phase("checking the lowered graph against eager torch")
            passage = tokenizer.encode(PASSAGE)[: ir.max_seq_len] if options.quantize else None  # what fits
            # One eager pass: by reference, each module's weights are read as it runs (not held).
            reference = stream_weights(load_model(folder, dtype, True)) if by_reference else model
            check = check_against_eager(ir, reference, building, graphs, backend, mode, passage)
            log(f"         max |logit error| {check.max_abs_logit_error:.2e}, "
                f"argmax agreement {check.argmax_agreement:.2f} over {check.steps} steps")
            if check.perplexity is not None:
                log(f"         perplexity {check.perplexity:.2f} ({options.quantize}) against "
                    f"{check.float_perplexity:.2f} (the float model) on a {len(passage)}-token passage")
        speculative = None
        if options.draft:
            phase(f"building the drafter ({options.draft}, tree {options.tree.spec})")
            speculative = build_drafter(options, tokenizer, ir.config, building, log, draft_vocab)
            speculative = replace(speculative, **free_drafter_state(options, eager(), tokenizer, building,
                                                                    phase, log))  # fmt: skip
            if options.free_draft and backend.name == "onnxruntime":
                phase("measuring the verify cost T(n) on this machine (the free drafters' per-step gate)")
                cost = measure_verify_cost(building, graphs, backend, speculative.max_tree, ir.config,
                                           options.threads)  # fmt: skip
                speculative = replace(speculative, verify_cost=cost)
                ratios = zip(cost.nodes, cost.ratio, strict=True)
                log(f"         plain step {cost.plain_ms:.1f} ms; T(n)/T(0) "
                    + ", ".join(f"{n}: {r:.2f}" for n, r in ratios))
            if draft_vocab:
                vocab = DraftVocabEntry(size=len(draft_vocab), calibration_coverage=float(coverage or 0.0))
                speculative = replace(speculative, draft_vocab=vocab)
        early_exit = None
        if options.early_exit:
            phase(f"calibrating early exit ({options.early_exit}) on the full model's own continuations")
            spec = options.early_exit.resolved(ir.config.num_layers)
            prompts = calibration_prompts(options, tokenizer)
            calibrated = calibrate_early_exit(eager(), prompts, spec, draft_vocab, log)
            early_exit = EarlyExitEntry.from_json(
                {**calibrated, "exit_head_tokens": len(draft_vocab) or ir.config.vocab_size}, "early_exit")
            log(f"         threshold {early_exit.threshold:.4f}: agreement {early_exit.agreement:.3f}, "
                f"mean layers {early_exit.mean_layers:.1f} of {ir.config.num_layers} "
                f"on {early_exit.calibration_positions} positions")
        phase("writing tokenizer and manifest")
        (building / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, building / "tokenizer" / name)
        device = device_description(backend.name, backend.version)
        write_manifest(building, Manifest(
            format_version=FORMAT_VERSION,
            skiptree_version=skiptree.__version__,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            decode_mode=mode,
            model=ModelEntry(source=str(source), model_type=ir.config.model_type,
                             weights_sha256=weights_sha256(folder), config=ir.config.to_json()),
            backend=backend,
            device=DeviceEntry.from_json({**device, "fingerprint": device_fingerprint(device)}, "device"),
            max_seq_len=options.max_seq_len,
            graphs=graphs,
            tokenizer=TokenizerEntry(folder="tokenizer",
                                     eos_token_ids=tuple(read_eos_token_ids(folder, tokenizer))),
            pipeline=tuple(PassEntry(r.name, r.options, r.modified) for r in ir.passes_run),
            check=check,
            speculative=speculative,
            early_exit=early_exit,
            dtype=options.dtype,
            torch_version=torch.__version__,
        ))  # fmt: skip
    phase(f"artifact written to {out_dir}")
    return out_dir
