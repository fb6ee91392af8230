"""What ONNX Runtime's memory settings cost: resident memory and decode speed per setting (issue 31).

For each artifact and each setting of `SessionConfig` (prepacking, the CPU memory arena), a child
process loads the artifact with plain (not speculative) decoding and greedily generates
--new-tokens tokens, --repeats times; it reports its resident memory after loading, its peak, and
the median decode tok/s. One child per setting, so no setting inherits another's memory.
Results: bench/results/session_memory.{json,md}, written after every artifact (replacing that
artifact's earlier entry, keeping the others').

    .venv/bin/python bench/session_memory.py [--artifacts DIR,...] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import psutil

from skiptree.runtime.device import cpu_model

sys.path.insert(0, str(Path(__file__).parent))
from compile_memory import GIB, artifact_bytes, kv_cache_bytes  # noqa: E402

SETTINGS = {  # name -> SessionConfig fields
    "default": {},
    "no prepacking": {"prepacking": False},
    "no arena": {"memory_arena": False},
    "neither": {"prepacking": False, "memory_arena": False},
}
PROMPT = "def quicksort(items):\n    "
WORK = Path("bench/.work/compile_memory")
DEFAULT_ARTIFACTS = (
    "smollm2-fp32",
    "smollm2-int4",
    "synthetic-1b-int4",
    "qwen1.5b-int4",
    "synthetic-8b-int4",
)


def child(artifact: Path, setting: str, threads: int, new_tokens: int, repeats: int) -> dict:
    """Runs in the child process: load, generate, measure."""
    from skiptree.runtime.artifact import Runtime
    from skiptree.runtime.onnx_step import SessionConfig

    runtime = Runtime(
        artifact, speculative=False, session=SessionConfig(threads=threads, **SETTINGS[setting])
    )
    loaded = psutil.Process().memory_info().rss
    speeds = []
    for _ in range(repeats):
        result = runtime.generate(PROMPT, max_new_tokens=new_tokens).result
        speeds.append(result.tokens_per_second)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "loaded_rss_bytes": loaded,
        "peak_rss_bytes": peak,
        "decode_tps": statistics.median(speeds),
        "decode_tps_all": speeds,
    }


def markdown(record: dict) -> str:
    lines = [
        f"# ONNX Runtime memory settings ({record['cpu']}, {record['threads']} thread(s))",
        "",
        f"Plain greedy decoding, {record['new_tokens']} tokens, median of {record['repeats']}; RSS in GB; "
        "target = 1.3 x weight bytes + KV cache.",
        "",
        "| artifact | weights GB | target | setting | RSS loaded | RSS peak | decode tok/s | vs default |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in record["artifacts"]:
        base = entry["settings"].get("default", {}).get("decode_tps")
        for name, run in entry["settings"].items():
            speed = run.get("decode_tps")
            ratio = f"{speed / base:.2f}x" if speed and base else "-"
            cells = [
                entry["artifact"],
                f"{entry['weight_bytes'] / GIB:.2f}",
                f"{entry['target_bytes'] / GIB:.2f}",
                name,
                f"{run.get('loaded_rss_bytes', 0) / GIB:.2f}",
                f"{run.get('peak_rss_bytes', 0) / GIB:.2f}",
                f"{speed:.1f}" if speed else run.get("error", "-"),
                ratio,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default=",".join(str(WORK / name) for name in DEFAULT_ARTIFACTS))
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"some of: {', '.join(SETTINGS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("ARTIFACT", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(
            json.dumps(child(Path(args.child[0]), args.child[1], args.threads, args.new_tokens, args.repeats))
        )
        return
    record = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "artifacts": [],
    }
    results = Path("bench/results")
    earlier = results / "session_memory.json"  # entries of other artifacts (same threads) are kept
    if earlier.is_file() and json.loads(earlier.read_text())["threads"] == args.threads:
        record["artifacts"] = json.loads(earlier.read_text())["artifacts"]
    for artifact in [Path(a) for a in args.artifacts.split(",")]:
        if not (artifact / "manifest.json").is_file():
            print(f"{artifact}: no artifact, skipped (bench/compile_memory.py writes them)", file=sys.stderr)
            continue
        total, weights = artifact_bytes(artifact)
        entry = {
            "artifact": artifact.name,
            "artifact_bytes": total,
            "weight_bytes": weights,
            "target_bytes": int(1.3 * weights + kv_cache_bytes(artifact)),
            "settings": {},
        }
        for setting in args.settings.split(","):
            command = [
                sys.executable,
                __file__,
                "--child",
                str(artifact),
                setting,
                "--threads",
                str(args.threads),
                "--new-tokens",
                str(args.new_tokens),
                "--repeats",
                str(args.repeats),
            ]
            run = subprocess.run(command, capture_output=True, text=True)
            entry["settings"][setting] = (
                json.loads(run.stdout.strip().splitlines()[-1])
                if run.returncode == 0
                else {"error": f"exit {run.returncode}: {run.stderr.strip()[-200:]}"}
            )
            print(artifact.name, setting, entry["settings"][setting], file=sys.stderr, flush=True)
        record["artifacts"] = [e for e in record["artifacts"] if e["artifact"] != entry["artifact"]] + [entry]
        (results / "session_memory.json").write_text(json.dumps(record, indent=1) + "\n")
        (results / "session_memory.md").write_text(markdown(record))


if __name__ == "__main__":
    main()
