"""Int4 end to end against onnxruntime-genai int4, wall clock of whole generations, by prompt set.

The engines, side by side in one run (interleaved, threads pinned by session options):
- skiptree `--quantize int4` (the default format) compiled without a drafter: plain decoding;
- skiptree `--quantize int4 --draft lookup+recycle --tree T` for each --trees T: free drafters,
  every run from the drafter's loaded state (warm recycling table, fresh gate);
- the speculative artifact decoding plainly (`speculative=False`): its one-row steps are padded to
  two rows, the numerics its verify steps share (bench/results/matmulnbits_rows.md);
- onnxruntime-genai int4 (its model builder, defaults);
- with `--backends onnxruntime,tvm`: the same plain and speculative artifacts lowered to TVM, whose
  int4 matmuls run skiptree's batch-invariant kernel (no padding: its speculative tokens should
  equal its plain artifact's on every prompt);
llama.cpp is not run: llama-cpp-python builds llama.cpp from source at install (~10 min here, and
only with non-native flags; ../shared/DESIGN.md has its numbers from such a build, below genai int4).
Prompt sets: bench/speculative.py's chat, code and copying (edit) requests, chat-formatted.
Speed = new tokens / wall seconds of the whole generation (prefill included), median over the
prompts of a set (each the median of --rounds); prefill reported apart. Exactness: per prompt,
whether the speculative tokens equal the plain int4 artifact's, and the padded plain decoding's.
Time to first token of a --long-prompt-token prompt is measured for skiptree's plain int4 artifact
and genai int4.
Writes bench/results/int4_<model>_<threads>t[_<backends>].{json,md}.

    .venv/bin/pip install --no-deps onnxruntime-genai==0.18.0   # the peer (pyproject's bench extra)
    .venv/bin/python bench/int4.py [--threads 1] [--max-new-tokens 96] [--prompts-per-set 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

import skiptree
from skiptree.compiler.compile import compile_model
from skiptree.compiler.options import CompileOptions
from skiptree.models.zoo import fetch
from skiptree.runtime.device import cpu_model
from skiptree.runtime.tree import parse_tree

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
from speculative import PROMPT_SETS  # noqa: E402

PLAIN = "skiptree int4"
PADDED = "skiptree int4, speculative artifact decoding plainly (one-row steps padded to two)"
TVM_PLAIN = "skiptree tvm int4"


class SkiptreePlain:
    def __init__(self, runtime, name: str = PLAIN):
        self.name, self.runtime = name, runtime

    def run(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], float, float]:
        start = time.perf_counter()
        result = self.runtime.generate(ids, max_new_tokens=max_new_tokens).result
        return result.token_ids, time.perf_counter() - start, result.prefill_seconds


class SkiptreeSpeculative:
    """The artifact's drafter on tree `tree`, from its loaded state every run (a drafter that kept
    its state would recall the last round's output)."""

    def __init__(self, runtime, tree: str, draft: str, base: str = PLAIN):
        self.name, self.runtime = f"{base} + {draft} {tree}", runtime
        self.shape, self.loaded = parse_tree(tree), copy.deepcopy(runtime.speculative.drafter)

    def run(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], float, float]:
        decoder = self.runtime.speculative.with_tree(self.shape, copy.deepcopy(self.loaded))
        start = time.perf_counter()
        result = decoder.generate(ids, max_new_tokens, eos_token_ids=self.runtime.eos_token_ids)
        return result.token_ids, time.perf_counter() - start, result.prefill_seconds


class GenaiWall:
    def __init__(self, engine: peers.GenaiEngine):
        self.name, self.og, self.model = engine.name, engine.og, engine.model

    def run(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], float, float]:
        start = time.perf_counter()
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        prefill = time.perf_counter() - start
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens, time.perf_counter() - start, prefill


def measure(engines: list, prompts: dict[str, list[list[int]]], max_new_tokens: int, rounds: int) -> dict:
    """engine -> set -> {"tps": [per prompt], "prefill_s": [...], "outputs": [...]}; engines interleaved."""
    runs = {e.name: {s: {"tps": [], "prefill_s": [], "outputs": []} for s in prompts} for e in engines}
    for set_name, prompt_ids in prompts.items():
        for ids in prompt_ids:
            samples: dict[str, list] = {e.name: [] for e in engines}
            for r in range(rounds + 1):  # round 0 warms up
                for engine in engines[r % len(engines) :] + engines[: r % len(engines)]:
                    tokens, wall, prefill = engine.run(ids, max_new_tokens)
                    if r:
                        samples[engine.name].append((len(tokens) / wall, prefill, tokens))
            for name, got in samples.items():
                entry = runs[name][set_name]
                entry["tps"].append(statistics.median(s[0] for s in got))
                entry["prefill_s"].append(statistics.median(s[1] for s in got))
                entry["outputs"].append(got[-1][2])
            print(set_name, {n: round(runs[n][set_name]["tps"][-1], 1) for n in runs}, flush=True)
    return runs


def time_to_first_token(engines: list, ids: list[int], rounds: int) -> dict[str, float]:
    """Median seconds to the first new token of a long prompt, per engine."""
    times: dict[str, list[float]] = {e.name: [] for e in engines}
    for _ in range(rounds):
        for engine in engines:
            start = time.perf_counter()
            engine.run(ids, 1)
            times[engine.name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def markdown(record: dict) -> str:
    sets, runs = record["sets"], record["runs"]
    genai = next((n for n in runs if n.startswith("onnxruntime-genai")), None)
    lines = [f"# Int4 end to end: {record['model']}, {record['threads']} thread(s), "
             f"{record['max_new_tokens']} new tokens", "",
             f"CPU: {record['cpu']}; {record['prompts_per_set']} prompts per set, median of "
             f"{record['rounds']} rounds each, engines interleaved. tok/s = new tokens / wall seconds "
             "of the whole generation (prefill included); x = vs onnxruntime-genai int4 in this run; "
             "exact = prompts whose tokens equal the plain int4 artifact's (and, in brackets, the padded "
             "plain decoding's). "
             f"Format: {record['precision']}.", "",
             "| engine | " + " | ".join(f"{s} tok/s | {s} vs genai | {s} exact" for s in sets)
             + " | prefill s |",
             "|---|" + "---|---|---|" * len(sets) + "---|"]  # fmt: skip
    for name, by_set in runs.items():
        cells = []
        for s in sets:
            tps = statistics.median(by_set[s]["tps"])
            versus = f"{tps / statistics.median(runs[genai][s]['tps']):.2f}x" if genai else "-"
            entry, count = by_set[s], len(by_set[s]["tps"])
            exact, padded = entry.get("exact"), entry.get("exact_padded")
            bracket = "" if padded is None else f" ({padded}/{count})"
            cells += [f"{tps:.1f}", versus, "-" if exact is None else f"{exact}/{count}{bracket}"]
        prefill = statistics.median(p for s in sets for p in by_set[s]["prefill_s"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {prefill:.3f} |")
    ttft = record["time_to_first_token"]
    lines += ["", f"Time to first token, {record['long_prompt_tokens']}-token prompt: "
              + ", ".join(f"{n} {s:.2f} s ({record['long_prompt_tokens'] / s:.0f} prompt tok/s)"
                          for n, s in ttft.items())]  # fmt: skip
    lines += ["", "Unavailable: " + "; ".join(f"{n}: {why}" for n, why in record["unavailable"].items())
              if record["unavailable"] else ""]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def backend_engines(folder: Path, backend: str, args: argparse.Namespace, trees: list[str]) -> list:
    """The plain int4 artifact, (ONNX: the speculative one decoding plainly, padded), the drafters."""
    artifacts = {"plain": (None, "chain:1"), "speculative": (args.draft, trees[0])}
    loaded = {}
    for kind, (draft, tree) in artifacts.items():
        suffix = "" if backend == "onnxruntime" else f"-{backend}"
        out = args.work / args.model / f"{args.quantize}-{kind}{suffix}".replace(":", "_")
        if not (out / "manifest.json").is_file():
            options = CompileOptions(max_seq_len=args.max_seq_len, quantize=args.quantize, draft=draft,
                                     tree=tree, backend=backend, threads=args.threads)  # fmt: skip
            compile_model(folder, out, options, log=print)
        loaded[kind] = skiptree.load(out, threads=args.threads, speculative=kind == "speculative")
    name = PLAIN if backend == "onnxruntime" else TVM_PLAIN
    plain = SkiptreePlain(loaded["plain"], name)
    drafters = [SkiptreeSpeculative(loaded["speculative"], t, args.draft, name) for t in trees]
    if backend != "onnxruntime":
        return [plain, *drafters]
    spec_plainly = skiptree.load(loaded["speculative"].folder, threads=args.threads, speculative=False)
    return [plain, SkiptreePlain(spec_plainly, PADDED), *drafters]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--prompts-per-set", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--draft", default="lookup+recycle")
    parser.add_argument("--trees", default="chain:2,chain:4")
    parser.add_argument("--long-prompt-tokens", type=int, default=1000)
    parser.add_argument("--ttft-rounds", type=int, default=3)
    parser.add_argument("--max-seq-len", type=int, default=1152)
    parser.add_argument("--work", type=Path, default=Path("bench/.work/int4"))
    parser.add_argument("--backends", default="onnxruntime", help="onnxruntime and/or tvm, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = fetch(args.model)
    trees = args.trees.split(",")
    engines = []
    for backend in args.backends.split(","):
        engines += backend_engines(folder, backend, args, trees)
    plain = engines[0]
    unavailable = {}
    for engine in peers.genai_engines(folder, args.threads, precisions=("int4",)):
        if isinstance(engine, peers.Unavailable):
            unavailable[engine.name] = engine.reason
        else:
            engines.append(GenaiWall(engine))
    unavailable["llama.cpp"] = "not run: llama-cpp-python builds from source (see the module doc)"
    prompts = {name: [plain.runtime.encode_prompt(p, chat=chat) for p in texts[: args.prompts_per_set]]
               for name, (chat, texts) in PROMPT_SETS.items()}  # fmt: skip
    runs = measure(engines, prompts, args.max_new_tokens, args.rounds)
    references = {f"{PLAIN} +": (("exact", PLAIN), ("exact_padded", PADDED)),
                  f"{TVM_PLAIN} +": (("exact", TVM_PLAIN),)}  # fmt: skip
    for name, by_set in runs.items():
        for prefix, pairs in references.items():
            if name.startswith(prefix):
                for s, entry in by_set.items():
                    for key, reference in pairs:
                        outputs = zip(entry["outputs"], runs[reference][s]["outputs"], strict=True)
                        entry[key] = sum(a == b for a, b in outputs)
    text = "\n\n".join(t for _, texts in PROMPT_SETS.values() for t in texts)
    long_ids = (plain.runtime.tokenizer.encode(text) * 20)[: args.long_prompt_tokens]
    peers_ttft = [e for e in engines
                  if e.name in (PLAIN, TVM_PLAIN) or e.name.startswith("onnxruntime-genai")]  # fmt: skip
    record = {"model": args.model, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
              "prompts_per_set": args.prompts_per_set, "rounds": args.rounds, "cpu": cpu_model(),
              "precision": plain.runtime.precision, "sets": list(prompts), "runs": runs,
              "unavailable": unavailable, "long_prompt_tokens": len(long_ids),
              "time_to_first_token": time_to_first_token(peers_ttft, long_ids, args.ttft_rounds)}  # fmt: skip
    backends = "" if args.backends == "onnxruntime" else "_" + args.backends.replace(",", "-")
    peers.save_results(f"int4_{args.model}_{args.threads}t{backends}", record, markdown(record))


if __name__ == "__main__":
    main()
