"""Weight-only quantisation, side by side in one run: skiptree fp32 / int8 / int4, plain and
speculative, against onnxruntime-genai fp32 / int4, on SmolLM2-135M, pinned threads.

Every skiptree artifact is a speculative one (--draft, default the gated prompt lookup + Token
Recycling merge, over --tree); its plain decoding is the same artifact loaded with
`speculative=False`. Engines run interleaved (bench/decode_speed.py's `measure`), median decode
tokens/s over the prompts. Quality: (1) agreement with skiptree fp32's greedy output (tokens
before the first difference, and exact matches), (2) perplexity of each skiptree precision on a
held-out passage (teacher-forced, the artifact's own logits). llama.cpp is not run:
llama-cpp-python builds llama.cpp from source at install, which does not fit this run.
Writes bench/results/quantized.{json,md} (a --precisions subset: quantized_<names>.{json,md};
--plain-only, artifacts without a drafter, formats only: quantized_formats_<threads>t.{json,md}).
Artifacts are kept under --work and reused; delete one to recompile it with the current skiptree.

    .venv/bin/pip install --no-deps onnxruntime-genai==0.18.0   # the peer (pyproject's bench extra)
    .venv/bin/python bench/quantized.py [--threads 1] [--max-new-tokens 64] [--draft lookup+recycle]
    .venv/bin/python bench/quantized.py --precisions fp32,int4-requant-b128
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

import skiptree
from skiptree.compiler.compile import compile_model
from skiptree.compiler.options import CompileOptions
from skiptree.compiler.quality import PASSAGE, perplexity
from skiptree.models.zoo import fetch
from skiptree.runtime.device import cpu_model
from skiptree.runtime.tree import parse_tree

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
from decode_speed import PROMPTS, SkiptreeEngine, decode_arguments, first_difference, measure  # noqa: E402

PRECISIONS = {  # name -> --quantize. The default model is a Q4_1 GGUF (Q8_0 embedding = tied head):
    "fp32": None,  # its dequantised weights
    "int4-grid": "int4:grid=yes",  # block 32: the GGUF's own grid on the symmetric kernel, int8 activations
    "int4-grid-zp": "int4:grid=yes,sym=no",  # the same grid with zero points (MLAS's asymmetric kernel)
    "int4-grid-f32act": "int4:grid=yes,accuracy=0",  # the same grid, float32 activations: the GGUF model
    "int4-requant-b32": "int4",  # the default: the dequantised weights re-quantised, symmetric
    "int4-requant-b32-zp": "int4:sym=no",
    "int4-requant-b128": "int4:block=128",
    "int4-requant-b128-zp": "int4:block=128,sym=no",
    "int8-requant-b64": "int8:block=64",
}
SPECULATIVE = ("fp32", "int4-grid", "int4-requant-b128")  # also run with the drafter, and on a chain
CHAIN = "chain:4"  # int8 activations are exact on chains only (README: int8 activations)
PLAIN_ARTIFACTS = ("int4-grid", "int4-requant-b128")  # also compiled without a drafter
PLAIN = "(plain artifact)"


def build(folder: Path, work: Path, draft: str, tree: str, max_seq_len: int,
          names: list[str], plain_only: bool = False) -> dict[str, tuple[Path, float | None]]:  # fmt: skip
    """One speculative artifact per precision in `names` (compiled once into `work`, per drafter and
    tree; `plain_only`: one artifact without a drafter per precision instead); (folder, compile s
    or None when it was compiled by an earlier run)."""
    built: dict[str, tuple[Path, float | None]] = {}
    speculative = work / f"{draft}-{tree}".replace(":", "_")
    if plain_only:
        jobs = [(name, PRECISIONS[name], None, work / "plain" / name) for name in names]
    else:
        jobs = [(name, PRECISIONS[name], draft, speculative / name) for name in names]
    jobs += [(f"{name} {PLAIN}", PRECISIONS[name], None, work / "plain" / name)
             for name in PLAIN_ARTIFACTS if name in names and not plain_only]  # fmt: skip
    for name, quantize, drafter, out in jobs:
        built[name] = (out, None)
        if not (out / "manifest.json").is_file():
            start = time.perf_counter()
            options = CompileOptions(max_seq_len=max_seq_len, draft=drafter, tree=tree,
                                     quantize=quantize)  # fmt: skip
            compile_model(folder, out, options, log=lambda message: None)
            built[name] = (out, time.perf_counter() - start)
    return built


class FreshDraftEngine:
    """The artifact's drafter over its own tree or another, starting every run from the state it was
    loaded with (the warm recycling table, a fresh gate). Why: each prompt runs `rounds` times, and
    a drafter that kept its state would draft a repeat from its memory of the last round (recycling's
    pair cache holds nearly the whole previous output), which is not what a new request meets."""

    def __init__(self, name: str, runtime, tree: str | None = None):
        self.name, self.runtime = name, runtime
        self.shape = parse_tree(tree) if tree else runtime.speculative.shape
        self.loaded = copy.deepcopy(runtime.speculative.drafter)

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        decoder = self.runtime.speculative.with_tree(self.shape, copy.deepcopy(self.loaded))
        out = decoder.generate(prompt_ids, max_new_tokens, eos_token_ids=self.runtime.eos_token_ids)
        return out.token_ids, out.tokens_per_second


def passage_perplexity(runtime) -> float:
    """The compile-time check's perplexity (compiler/quality.py's passage, teacher-forced)."""
    ids = runtime.tokenizer.encode(PASSAGE)
    runtime.step_model.cache.length = 0
    return perplexity(runtime.step_model.forward(ids, ("logits",))[0], ids)


def markdown(record: dict) -> str:
    lines = [f"# Weight-only quantisation: {record['model']}, {record['threads']} thread(s), "
             f"{record['max_new_tokens']} new tokens, S={record['max_seq_len']}", "",
             f"CPU: {record['cpu']}; {len(PROMPTS)} prompts, median of {record['rounds']} rounds each, "
             "engines interleaved; decode tokens/s (prefill excluded). Speculative = drafter "
             f"{record['draft']} (gated), tree {record['tree']}, every run from the drafter's loaded state "
             "(warm recycling table, fresh gate). Agreement: new tokens equal to "
             "skiptree fp32 greedy before the first difference (mean over prompts), and prompts with all "
             "tokens equal.", "",
             "| engine | tokens/s | vs skiptree fp32 | vs genai int4 | agreement with fp32 | same output "
             "| same as its own plain decoding |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    engines = record["engines"]
    base = engines["skiptree fp32"].get("tokens_per_second")
    genai = next((e.get("tokens_per_second") for n, e in engines.items() if n.startswith("onnxruntime-genai")
                  and n.endswith("int4")), None)  # fmt: skip
    for name, entry in engines.items():
        if "error" in entry:
            lines.append(f"| {name} | unavailable: {entry['error']} | | | | | |")
            continue
        speed = entry["tokens_per_second"]
        versus = f"{speed / genai:.2f}x" if genai else "-"
        lines.append(f"| {name} | {speed:.1f} | {speed / base:.2f}x | {versus} | "
                     f"{entry['agreement']:.2f} | {entry['same_outputs']}/{len(PROMPTS)} | "
                     f"{entry['same_as_own_plain']}/{len(PROMPTS)} |")  # fmt: skip
    lines += ["", "Perplexity on a held-out passage (teacher-forced, each artifact's own logits):", ""]
    lines += [f"- {name}: {value:.2f}" for name, value in record["perplexity"].items()]
    lines += ["", "Precisions as the artifacts state them:", ""]
    lines += [f"- {name}: {a['precision']}" for name, a in record["artifacts"].items()]
    compiled = {n: "an earlier run" if a["compile_seconds"] is None else f"{a['compile_seconds']:.0f} s"
                for n, a in record["artifacts"].items()}  # fmt: skip
    lines += ["", "Artifacts: " + "; ".join(f"{n} {a['weights_mb']:.0f} MB of graph files, compiled in "
                                            f"{compiled[n]}" for n, a in record["artifacts"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = decode_arguments()
    parser.add_argument("--draft", default="lookup+recycle")
    parser.add_argument("--tree", default="k-ary:2x3")
    parser.add_argument("--work", type=Path, default=Path("bench/.work/quantized"))
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="comma-separated, fp32 first (the agreement reference); a subset writes "
                        "bench/results/quantized_<names>.*")  # fmt: skip
    parser.add_argument("--plain-only", action="store_true", help="artifacts without a drafter: formats only")
    args = parser.parse_args()
    names = args.precisions.split(",")
    if names[0] != "fp32" or any(name not in PRECISIONS for name in names):
        parser.error(f"--precisions: fp32 first, then any of {list(PRECISIONS)[1:]}; got {names}")
    torch.set_num_threads(args.threads)
    folder = fetch("smollm2-135m")
    built = build(folder, args.work, args.draft, args.tree, args.max_seq_len, names, args.plain_only)
    engines, runtimes = [], {}
    for name, (artifact, _) in built.items():
        runtimes[name] = skiptree.load(artifact, threads=args.threads, speculative=False)
        engines.append(SkiptreeEngine(f"skiptree {name}", runtimes[name]))
        if name in SPECULATIVE and not args.plain_only:
            speculative = skiptree.load(artifact, threads=args.threads)
            engines.append(FreshDraftEngine(f"skiptree {name} speculative", speculative))
            engines.append(FreshDraftEngine(f"skiptree {name} speculative {CHAIN}", speculative, CHAIN))
    engines += peers.genai_engines(folder, args.threads)
    prompt_ids = [runtimes["fp32"].encode_prompt(p) for p in PROMPTS]
    runnable = [e for e in engines if not isinstance(e, peers.Unavailable)]
    results = measure(runnable, prompt_ids, args.max_new_tokens, args.rounds)
    reference = results["skiptree fp32"]["outputs"]
    record_engines = {}
    for engine in engines:
        if isinstance(engine, peers.Unavailable):
            record_engines[engine.name] = {"error": engine.reason}
            continue
        entry = results[engine.name]
        if "error" in entry:
            record_engines[engine.name] = entry
            continue
        plain = results.get(engine.name.split(" speculative")[0], entry)["outputs"]  # its own plain decoding
        firsts = first_difference(entry["outputs"], reference)
        agreed = [args.max_new_tokens if f is None else f for f in firsts]
        record_engines[engine.name] = {
            "tokens_per_second": statistics.median(entry["per_prompt"]), "per_prompt": entry["per_prompt"],
            "agreement": statistics.mean(agreed) / args.max_new_tokens,
            "same_outputs": sum(f is None for f in firsts),
            "same_as_own_plain": sum(a == b for a, b in zip(entry["outputs"], plain, strict=True)),
            "first_difference": firsts}  # fmt: skip
    artifacts = {name: {"compile_seconds": seconds and round(seconds, 1),
                        "precision": runtimes[name].precision,
                        "weights_mb": sum(p.stat().st_size for p in artifact.glob("*.onnx*")) / 1e6}
                 for name, (artifact, seconds) in built.items()}  # fmt: skip
    record = {"model": "smollm2-135m", "threads": args.threads, "max_new_tokens": args.max_new_tokens,
              "max_seq_len": args.max_seq_len, "rounds": args.rounds, "draft": args.draft, "tree": args.tree,
              "cpu": cpu_model(),
              "genai": peers.genai_version(), "engines": record_engines, "artifacts": artifacts,
              "perplexity": {name: round(passage_perplexity(rt), 3) for name, rt in runtimes.items()},
              "prompt_ids": prompt_ids}  # fmt: skip
    stem = "quantized" if names == list(PRECISIONS) else "_".join(["quantized", *names[1:]])
    stem = f"quantized_formats_{args.threads}t" if args.plain_only else stem
    peers.save_results(stem, record, markdown(record))


if __name__ == "__main__":
    main()
