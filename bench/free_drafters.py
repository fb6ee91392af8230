"""Free drafters (prompt lookup, Token Recycling, corpus lookup, merged) vs our AR artifact, in one run.

One artifact per model is compiled with `--draft lookup+recycle+corpus:CORPUS` (the graphs do not
depend on the drafter: every engine below shares them). Engines, 1 thread, greedy, the same prompt
ids: our AR (the artifact decoding plainly), each free drafter alone, the merged drafter (sources
ranked by measured acceptance), all behind the per-step gate (the merged one also without it), and
onnxruntime-genai plain and with its n-gram speculation (its own model of the same checkpoint; fp32).
Each drafter keeps its state across the set's prompts as a server would (the recycling table starts
from the artifact's warm table). The corpus is the Python standard library's top-level modules (the
code a code assistant is asked about), or with `--corpus answers:N` the target's own greedy
answers to N requests made from the standard library's docstrings (how this model writes; none
of them is a benchmark prompt). Prompt sets: chat, code, copying of bench/speculative.py.
Per (set, engine): median tokens/s, median per-prompt speed-up over our AR, tokens per target step,
tokens contributed by each source, identical to AR or not.
Writes bench/results/free_drafters_<model>.json and .md.

    .venv/bin/python bench/free_drafters.py --model smollm2-135m
    .venv/bin/python bench/free_drafters.py --model qwen2.5-coder-1.5b --sets code,copying \
        --engines prompt-lookup,prompt-lookup+recycle,prompt-lookup+recycle+corpus
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

import skiptree
from skiptree.models.source import skiptree_home
from skiptree.models.zoo import fetch
from skiptree.runtime.corpus import CorpusDrafter
from skiptree.runtime.device import cpu_model
from skiptree.runtime.drafters import PromptLookupDrafter
from skiptree.runtime.merged_draft import MergedDrafter
from skiptree.runtime.recycling import RecyclingDrafter
from skiptree.runtime.tree import parse_tree

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
from decode_speed import versions  # noqa: E402
from speculative import AR, PROMPT_SETS, ArEngine, measure, summarise  # noqa: E402

CORPUS_BYTES = 8 << 20
STDLIB = "the Python standard library"


def stdlib_corpus() -> Path:
    """The standard library's top-level modules (sorted, up to CORPUS_BYTES), copied once."""
    dest = skiptree_home() / "bench" / f"corpus-stdlib-{platform.python_version()}"
    if not dest.is_dir():
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        total = 0
        for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            total += file.stat().st_size
            if total > CORPUS_BYTES:
                break
            shutil.copy2(file, partial / file.name)
        partial.rename(dest)
    return dest


def answers_corpus(model: str, folder: Path, texts: list[str], new_tokens: int = 128, chunk: int = 256
                   ) -> Path:  # fmt: skip
    """The target's own greedy answers (eager torch, batched) to `texts`, requests made from the
    standard library's docstrings (compiler/train/self_distill.py; none is a benchmark prompt), one text
    file each, made once: a corpus of how this model writes, for `--corpus answers:N`. Resumable:
    answers are written `chunk` requests at a time into a .partial folder, and a rerun makes only
    the missing ones (batched greedy equals one-by-one greedy, so chunking changes no answer)."""
    from skiptree.compiler.train.self_distill import distill
    from skiptree.models.loader import load_model
    from skiptree.runtime.generator import read_eos_token_ids
    from skiptree.runtime.tokenizer import Tokenizer

    dest = skiptree_home() / "bench" / f"corpus-answers-{model}-{len(texts)}x{new_tokens}"
    if dest.is_dir():
        return dest
    tokenizer = Tokenizer.from_folder(folder)
    partial = dest.with_name(dest.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    files = [partial / f"answer_{i:04d}.txt" for i in range(len(texts))]
    missing = [i for i, file in enumerate(files) if not file.is_file()]
    if len(missing) < len(texts):
        made = len(texts) - len(missing)
        print(f"answers corpus: resuming, {made} of {len(texts)} answers made", flush=True)
    start, target, eos = time.perf_counter(), None, read_eos_token_ids(folder, tokenizer)
    torch.set_num_threads(2)  # made once, not timed against anything
    for first in range(0, len(missing), chunk):
        part = missing[first : first + chunk]
        target = target or load_model(folder)
        requests = [tokenizer.apply_chat_template([{"role": "user", "content": texts[i]}]) for i in part]
        answers = distill(target, requests, new_tokens, eos=eos)
        for i, (prompt_length, sequence) in zip(part, answers, strict=True):
            text = tokenizer.decode(sequence[prompt_length:])
            files[i].with_suffix(".tmp").write_text(text)
            files[i].with_suffix(".tmp").rename(files[i])  # a file present is a whole answer
        print(f"answers corpus: {min(first + chunk, len(missing))} of {len(missing)} made", flush=True)
    torch.set_num_threads(1)
    for stray in partial.glob("*.tmp"):  # an answer cut short by an interrupted run
        stray.unlink()
    partial.rename(dest)
    seconds = time.perf_counter() - start
    print(f"answers corpus: {len(missing)} answers in {seconds:.0f} s -> {dest}", flush=True)
    return dest


class FreeEngine:
    """One free drafter over a tree, on the artifact's shared graphs."""

    def __init__(self, runtime, drafter, tree: str, note: str = ""):
        self.name, self.runtime = f"skiptree {drafter.name} {tree}{note}", runtime
        self.decoder = runtime.speculative.with_tree(parse_tree(tree), drafter)

    def run(self, ids: list[int], max_new_tokens: int) -> dict:
        out = self.decoder.generate(ids, max_new_tokens, eos_token_ids=self.runtime.eos_token_ids)
        steps = [(step.drafted, step.accepted, step.emitted) for step in out.steps]
        return {"tokens": out.token_ids, "tps": out.tokens_per_second, "per_step": out.mean_accepted,
                "sources": out.tokens_by_source, "steps": steps}  # fmt: skip


def modelled_speedups(results: list[dict], cost) -> dict:
    """Speed-ups over plain decoding the measured verify cost T(n) predicts from the steps a run
    took (tokens emitted / sum of T(nodes verified) / T(0), pooled over the set's prompts; no
    wall clock, so no machine noise, and no Python time): `modelled` for the run as it went, and
    `ceiling`, an oracle gate that verifies exactly the path the target accepted out of each
    draft (a no-gate run gives the ceiling of the drafts themselves)."""
    steps = [step for result in results for step in result["steps"]]
    emitted = sum(step[2] for step in steps)
    run = sum(cost(drafted) if drafted else 1.0 for drafted, _, _ in steps)
    oracle = sum(cost(accepted) if accepted else 1.0 for _, accepted, _ in steps)
    return {"modelled_speedup": round(emitted / run, 3), "ceiling_speedup": round(emitted / oracle, 3)}


class GenaiEngine(peers.GenaiEngine):
    """onnxruntime-genai, plain or with its n-gram (prompt lookup) speculation; decode tokens/s =
    (new tokens - 1) / time after the prefill (`append_tokens`)."""

    def __init__(self, model_dir: Path, threads: int, name: str, speculative: dict | None = None):
        super().__init__(name, model_dir, threads)
        self.speculative = speculative

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> dict:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new_tokens)
        if self.speculative:
            params.set_speculative_options(**self.speculative)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(prompt_ids)
        start, calls = time.perf_counter(), 0
        while not generator.is_done():
            generator.generate_next_token()
            calls += 1
        seconds = time.perf_counter() - start
        tokens = [int(t) for t in generator.get_sequence(0)][len(prompt_ids) :]
        speed = (len(tokens) - 1) / seconds
        if not self.speculative:
            return {"tokens": tokens, "tps": speed, "per_step": len(tokens) / max(calls, 1)}
        stats = {key: value for key, value in generator.get_speculative_stats().items()
                 if isinstance(value, int | float)}  # its own counters; tokens/step not comparable
        return {"tokens": tokens, "tps": speed, "per_step": float("nan"), "genai_stats": stats}


ENGINE_KEYS = ("prompt-lookup", "prompt-lookup-1", "recycle", "corpus", "prompt-lookup+recycle",
               "prompt-lookup-1+recycle", "prompt-lookup+recycle+corpus", "prompt-lookup-1+recycle+corpus",
               "no-gate", "no-agreement", "genai")


def engines_for(runtime, trees: dict[str, str], keys: list[str]) -> list:
    """Fresh drafters (their own state) sharing the artifact's warm table and corpus index, for the
    chosen engine keys (`prompt-lookup-1`: prompt lookup down to one-token matches; it takes the
    tree of the same key with `prompt-lookup`)."""
    sources = runtime.speculative.drafter.by_name
    vocab = runtime.manifest.model.config["vocab_size"]

    def fresh(name: str):
        if name.startswith("prompt-lookup"):
            return PromptLookupDrafter(min_ngram=1 if name == "prompt-lookup-1" else 2)
        if name == "recycle":
            return RecyclingDrafter(vocab, state=sources["recycle"].state())  # copied in
        return CorpusDrafter(sources["corpus"].index)

    cost = runtime.speculative.drafter.cost  # the verify cost measured at compile time: the gate
    all_three = ("prompt-lookup", "recycle", "corpus")
    engines = []
    for entry in keys:
        key, _, own_tree = entry.partition("@")  # KEY@TREE: this engine on another tree
        if key == "genai":
            continue  # built by genai_engines
        tree = own_tree or trees["prompt-lookup+recycle+corpus" if key.startswith("no-") else
                                 key.replace("prompt-lookup-1", "prompt-lookup")]  # fmt: skip
        if key == "no-gate":
            engines.append(FreeEngine(runtime, MergedDrafter([fresh(name) for name in all_three]), tree,
                                      " (no gate)"))  # fmt: skip
        elif key == "no-agreement":  # the gate as before agreement: a token as likely as its best proposal
            alone = MergedDrafter([fresh(name) for name in all_three], cost, agreement=False)
            engines.append(FreeEngine(runtime, alone, tree, " (no agreement)"))
        else:
            merged = MergedDrafter([fresh(name) for name in key.split("+")], cost)
            note = " (min n-gram 1)" if "prompt-lookup-1" in key else ""
            engines.append(FreeEngine(runtime, merged, tree, note))
    return engines


def genai_engines(folder: Path, threads: int) -> list:
    if peers.genai_version() is None:
        return []
    model_dir = peers.build_genai(folder, "fp32")
    name = f"onnxruntime-genai {peers.genai_version()} fp32"
    plain = GenaiEngine(model_dir, threads, name)
    ngram = copy.copy(plain)  # one model in memory
    ngram.name, ngram.speculative = f"{name} n-gram 3, 4 drafts", {"ngram_size": 3, "max_draft_tokens": 4}
    return [plain, ngram]


def summarise_runs(runs: dict, cost) -> dict:
    """sets[set][engine] = summary of one measurement (`measure`'s result)."""
    sets: dict = {}
    for set_name, by_engine in runs.items():
        sets[set_name] = {}
        for name, results in by_engine.items():
            sets[set_name][name] = summary = summarise(results, by_engine[AR])
            if "genai_stats" in results[0]:  # its tokens/step is not ours to compute
                summary["tokens_per_target_step"] = None
                summary["genai_stats_per_prompt"] = [result["genai_stats"] for result in results]
            if "sources" in results[0]:
                totals: dict[str, int] = {}
                for result in results:
                    for source, count in result["sources"].items():
                        totals[source] = totals.get(source, 0) + count
                summary["tokens_by_source"] = totals
            if "steps" in results[0] and cost is not None:
                summary.update(modelled_speedups(results, cost))
    return sets


def combine_repeats(repeats: list[dict]) -> dict:
    """The first repeat's summaries with the speed-up taken as the median over repeats (each a
    median over prompts) and its range; tokens and tokens/step do not depend on the repeat."""
    sets = repeats[0]
    for set_name, engines in sets.items():
        for name, summary in engines.items():
            speedups = [repeat[set_name][name]["speedup_vs_ar_median"] for repeat in repeats]
            summary["speedup_vs_ar_per_repeat"] = speedups
            summary["speedup_vs_ar_median"] = round(statistics.median(speedups), 3)
            same = [repeat[set_name][name]["same_tokens_as_ar"] for repeat in repeats]
            summary["same_tokens_as_ar"] = all(same)
    return sets


def write_markdown(record: dict) -> str:
    lines = [f"# Free drafters: {record['model']}, {record['threads']} thread, greedy, "
             f"{record['max_new_tokens']} new tokens (EOS may stop), S={record['max_seq_len']}", "",
             f"CPU: {record['cpu']}. Engines interleaved; tokens/s = decode tokens/s (prefill excluded), "
             "median over the set's prompts; speed-up = median over prompts of engine / our AR tokens/s; "
             "tokens/step = tokens emitted per target step; by source = tokens each draft source "
             "contributed (target = the target's own: bonus tokens and plain steps). "
             f"Corpus: {record['corpus']['documents']} files of {record.get('corpus_kind', STDLIB)}, "
             f"{record['corpus']['tokens']:,} tokens, built in {record['corpus']['build_seconds']} s. "
             f"{record.get('repeats', 1)} repeat(s) with fresh drafters: speed-up = median over them "
             "(range in brackets). Modelled = tokens emitted / sum of the measured T(n)/T(0) of the steps "
             "taken (no clock, no Python time); ceiling = the same when exactly the accepted path of each "
             "draft is verified (an oracle gate; of the no-gate row: what the drafts allow).", ""]
    for set_name, engines in record["sets"].items():
        n = len(record["prompts"][set_name])
        lines += [f"## {set_name} ({n} prompts)", "",
                  "| engine | tokens/s | speed-up vs our AR | modelled | ceiling | tokens/step | by source "
                  "| same tokens as AR |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in engines.items():
            by_source = ", ".join(f"{k} {v}" for k, v in r.get("tokens_by_source", {}).items())
            per_step = r["tokens_per_target_step"]
            per_step = "n/a" if per_step is None else f"{per_step:.2f}"
            spread = r.get("speedup_vs_ar_per_repeat", [])
            spread = f" ({min(spread):.2f}-{max(spread):.2f})" if len(spread) > 1 else ""
            keys = ("modelled_speedup", "ceiling_speedup")
            modelled = [f"{r[key]:.2f}x" if key in r else "" for key in keys]
            speedup = f"{r['speedup_vs_ar_median']:.2f}x{spread}"
            lines.append(f"| {name} | {r['tokens_per_second_median']:.1f} | {speedup} "
                         f"| {' | '.join(modelled)} | {per_step} | {by_source} | "
                         f"{'yes' if r['same_tokens_as_ar'] else 'NO'} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--prompts-per-set", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs per prompt; above 1 a drafter's state remembers the prompt's last round")
    parser.add_argument("--repeats", type=int, default=1,
                        help="whole measurements with fresh drafters; speed-ups: median over them, and range")
    parser.add_argument("--trees", default="{}", help="JSON: drafter -> tree (overrides defaults)")
    parser.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai (slow to build)")
    parser.add_argument("--artifact", type=Path, default=None, help="reuse (or keep) this compiled artifact")
    parser.add_argument("--sets", default=",".join(PROMPT_SETS), help="comma-separated prompt sets")
    parser.add_argument("--corpus", default="stdlib",
                        help="stdlib (its top-level modules) or answers:N (the target's own answers to N "
                             "docstring requests, generated once)")  # fmt: skip
    parser.add_argument("--answer-tokens", type=int, default=128, help="new tokens per answer of answers:N")
    parser.add_argument("--suffix", default="", help="appended to the results' file name")
    parser.add_argument("--engines", default=",".join(k for k in ENGINE_KEYS if "prompt-lookup-1" not in k),
                        help=f"comma-separated, from {','.join(ENGINE_KEYS)} (our AR always runs); "
                             "KEY@TREE runs one on another tree")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    keys, set_names = args.engines.split(","), args.sets.split(",")
    unknown = [k for k in keys if k.partition("@")[0] not in ENGINE_KEYS]
    unknown += [s for s in set_names if s not in PROMPT_SETS]
    if unknown:
        parser.error(f"unknown engine or set {unknown}; engines: {ENGINE_KEYS}, sets: {list(PROMPT_SETS)}")
    trees = {"prompt-lookup": "chain:4", "recycle": "k-ary:2x2", "corpus": "chain:4",
             "prompt-lookup+recycle": "k-ary:2x3", "prompt-lookup+recycle+corpus": "k-ary:2x3",
             **json.loads(args.trees)}  # fmt: skip
    folder = fetch(args.model)
    if args.corpus == "stdlib":
        corpus, tag, corpus_kind = stdlib_corpus(), "", STDLIB
    else:
        from skiptree.compiler.train.self_distill import docstring_prompts

        texts = docstring_prompts(int(args.corpus.removeprefix("answers:")), seed=1)  # ~700 exist
        corpus = answers_corpus(args.model, folder, texts, args.answer_tokens)
        tag = f"_answers{len(texts)}" + ("" if args.answer_tokens == 128 else f"x{args.answer_tokens}")
        corpus_kind = "the target's own greedy answers to requests from stdlib docstrings (one a file)"
    artifact = args.artifact or skiptree_home() / "bench" / f"free-drafters-{args.model}{tag}"
    start = time.perf_counter()
    if not (artifact / "manifest.json").is_file():
        draft = f"lookup+recycle+corpus:{corpus}"
        skiptree.compile(folder, artifact, max_seq_len=args.max_seq_len, draft=draft, tree="chain:1",
                         threads=1)  # the threads the verify cost T(n) is measured with
    compile_seconds = time.perf_counter() - start
    runtime = skiptree.load(artifact, threads=1)
    prompt_ids = {name: [runtime.encode_prompt(p, chat=chat) for p in prompts[: args.prompts_per_set]]
                  for name, (chat, prompts) in PROMPT_SETS.items() if name in set_names}  # fmt: skip
    genai = genai_engines(folder, 1) if "genai" in keys and not args.no_genai else []
    cost = runtime.speculative.drafter.cost
    repeats = []
    for repeat in range(args.repeats):  # fresh drafters each time: no state carried between repeats
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        engines = [ArEngine(runtime), *engines_for(runtime, trees, keys), *genai]
        repeats.append(summarise_runs(measure(engines, prompt_ids, args.max_new_tokens, args.rounds), cost))
    sets = combine_repeats(repeats)
    record = {"model": f"{args.model} (fp32)", "threads": 1, "max_new_tokens": args.max_new_tokens,
              "max_seq_len": args.max_seq_len, "rounds": args.rounds, "repeats": args.repeats,
              "cpu": cpu_model(),
              "machine": platform.machine(), "versions": versions(), "trees": trees,
              "compile_seconds": round(compile_seconds, 1), "sets": sets,
              "corpus": runtime.manifest.speculative.corpus.to_json(), "corpus_kind": corpus_kind,
              "prompts": {s: PROMPT_SETS[s][1][: args.prompts_per_set] for s in prompt_ids}}
    subset = "" if set(set_names) == set(PROMPT_SETS) else "_" + "-".join(set_names)  # keep the full run's
    name = f"free_drafters_{args.model}{tag}{subset}{args.suffix}"
    peers.save_results(name, record, write_markdown(record))


if __name__ == "__main__":
    main()
