"""Memory and time of `skiptree compile` and `skiptree generate`, per model and precision (issue 31).

Each case runs the real CLI in a child process under `/usr/bin/time -v` (peak resident memory of
the process, wall time), with a watchdog that kills the process tree when its summed resident
memory passes --limit-gb (a compile that would exhaust the machine is recorded as such, not run to
the end). Per case: compile peak RSS and wall time against the target (1.5 GB + 3 x the largest
tensor's float32 size), artifact bytes, `generate` peak RSS against 1.3 x the weight bytes + the KV
cache, decode tok/s and the bandwidth bound (weight bytes read per token / a measured read
bandwidth: a 1 GiB GEMV). A synthetic source's folder is written first, apart (its
time is reported, not counted as compile). Results are written after every case to
bench/results/compile_memory.{json,md}, so a cut run keeps what finished.

    .venv/bin/python bench/compile_memory.py [--cases smollm2-fp32,smollm2-int4,...] [--limit-gb 20]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from safetensors import safe_open

from skiptree.models.loader import weight_files
from skiptree.models.source import resolve_model_dir
from skiptree.runtime.device import cpu_model
from skiptree.runtime.onnx_step import is_cache

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

SKIPTREE = str(Path(sys.executable).with_name("skiptree"))
CASES = {  # name -> (model source, compile options)
    "smollm2-fp32": ("smollm2-135m", []),
    "smollm2-int4": ("smollm2-135m", ["--quantize", "int4"]),
    "qwen1.5b-int4": ("qwen2.5-coder-1.5b", ["--quantize", "int4"]),
    "synthetic-1b-int4": ("synthetic:llama-3.2-1b", ["--quantize", "int4"]),
    "synthetic-8b-int4": ("synthetic:llama-3-8b", ["--quantize", "int4"]),
}
PROMPT = "def quicksort(items):\n    "
GIB = 1 << 30


def largest_tensor_bytes(folder: Path) -> tuple[str, int]:
    """(name, float32 bytes) of the source's largest tensor, from the safetensors headers only."""
    best = ("", 0)
    for path in weight_files(folder):
        with safe_open(str(path), framework="np") as handle:
            for name in handle.keys():
                size = 4 * int(np.prod(handle.get_slice(name).get_shape(), dtype=np.int64))
                best = max(best, (name, size), key=lambda item: item[1])
    return best


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(command: list[str], limit_bytes: int, timeout_s: float) -> dict:
    """Run under /usr/bin/time -v; returns peak RSS (time's, and the watchdog's tree sum), wall
    seconds, stdout, and why it stopped ("ok", "exit N", "memory limit", "timeout")."""
    child = subprocess.Popen(["/usr/bin/time", "-v", *command], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    start, peak, stopped = time.perf_counter(), 0, []

    def watch() -> None:
        nonlocal peak
        process = psutil.Process(child.pid)
        while child.poll() is None:
            peak = max(peak, tree_rss(process))
            if peak > limit_bytes or time.perf_counter() - start > timeout_s:
                stopped.append("memory limit" if peak > limit_bytes else "timeout")
                for member in process.children(recursive=True):
                    member.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = child.communicate()
    watcher.join()
    wall = time.perf_counter() - start
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    status = stopped[0] if stopped else ("ok" if child.returncode == 0 else f"exit {child.returncode}")
    own = err.split("\tCommand being timed:")[0]  # what the command wrote, before time's report
    tail = "" if status == "ok" else own.strip().splitlines()[-12:]
    phases = [line for line in err.splitlines() if re.match(r"\[ *[\d.]+ s, peak", line)]  # compile's log
    return {"peak_rss_bytes": int(found.group(1)) * 1024 if found else None, "watchdog_peak_bytes": peak,
            "wall_s": round(wall, 2), "status": status, "stdout": out, "error_tail": tail,
            "phases": phases}  # fmt: skip


def read_bandwidth(size_bytes: int = 1 << 30) -> float:
    """Bytes per second of a float32 matrix-vector product over 1 GiB (numpy's BLAS GEMV, its own
    threads): a decode step's access pattern, the weights streamed once. Best of 3."""
    matrix = np.ones((size_bytes // 4 // 4096, 4096), np.float32)
    vector = np.ones(4096, np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        matrix @ vector
        best = min(best, time.perf_counter() - start)
    return size_bytes / best


def artifact_bytes(folder: Path) -> tuple[int, int]:
    """(all files, weight files: *.data, *.safetensors of the graphs) of an artifact."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".data", ".safetensors") and "corpus" not in p.name]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_size for p in weights)


def kv_cache_bytes(folder: Path) -> int:
    manifest = json.loads((folder / "manifest.json").read_text())
    graph = manifest["graphs"].get("verify") or manifest["graphs"]["step"]
    caches = [spec for spec in graph["signature"]["inputs"] if is_cache(spec["name"])]
    return sum(4 * int(np.prod([d for d in spec["shape"] if isinstance(d, int)])) for spec in caches)


def run_case(name: str, args: argparse.Namespace, bandwidth: float) -> dict:
    source, options = CASES[name]
    record: dict = {"case": name, "source": source, "options": options}
    start = time.perf_counter()
    folder = resolve_model_dir(source)  # a synthetic folder is written here, outside the measurement
    record["source_ready_s"] = round(time.perf_counter() - start, 1)
    record["largest_tensor"], largest = largest_tensor_bytes(folder)
    record["compile_target_bytes"] = int(1.5 * GIB + 3 * largest)
    out = args.work / name
    compile_cmd = [SKIPTREE, "compile", str(folder), "-o", str(out), "--max-seq-len", str(args.max_seq_len),
                   "--threads", str(args.threads), *options]  # fmt: skip
    record["compile"] = run_measured(compile_cmd, int(args.limit_gb * GIB), args.timeout_s)
    record["compile"].pop("stdout")
    # The check loads the artifact (as generate does): the peak before it is the lowering's own.
    before = [line for line in record["compile"]["phases"] if "checking the lowered graph" in line]
    found = re.search(r"peak +([\d.]+) GB", before[0]) if before else None
    record["compile"]["peak_before_check_bytes"] = int(float(found.group(1)) * GIB) if found else None
    if record["compile"]["status"] != "ok":
        return record
    record["artifact_bytes"], record["weight_bytes"] = artifact_bytes(out)
    record["kv_cache_bytes"] = kv_cache_bytes(out)
    generate_cmd = [SKIPTREE, "generate", str(out), "--prompt", PROMPT, "--max-new-tokens",
                    str(args.new_tokens), "--threads", str(args.threads), "--json"]  # fmt: skip
    run = run_measured(generate_cmd, int(args.limit_gb * GIB), args.timeout_s)
    output = json.loads(run.pop("stdout").strip().splitlines()[-1]) if run["status"] == "ok" else {}
    record["generate"] = {**run, "tokens_per_second": output.get("tokens_per_second")}
    record["generate_target_bytes"] = int(1.3 * record["weight_bytes"] + record["kv_cache_bytes"])
    record["bandwidth_bound_tps"] = bandwidth / record["weight_bytes"]
    return record


def markdown(record: dict) -> str:
    lines = [f"# Compile and generate memory ({record['cpu']}, {record['threads']} thread(s))", "",
             "Peak RSS from `/usr/bin/time -v` (the watchdog's process-tree sum where it stopped a run). "
             f"Read bandwidth {record['bandwidth_gb_s']:.1f} GB/s (a 1 GiB float32 GEMV, numpy's BLAS); "
             "bound = that / weight bytes per token.", "",
             "| case | compile peak GB (target) | before the check | compile s | artifact GB | "
             "generate peak GB (target) | decode tok/s (bound) | status |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for case in record["cases"]:
        compile_run = case["compile"]
        peak = compile_run["peak_rss_bytes"] or compile_run["watchdog_peak_bytes"]
        before = compile_run.get("peak_before_check_bytes")
        cells = [case["case"], f"{peak / GIB:.2f} ({case['compile_target_bytes'] / GIB:.2f})",
                 f"{before / GIB:.2f}" if before else "-", f"{compile_run['wall_s']:.0f}"]  # fmt: skip
        generate = case.get("generate")
        if generate:
            tps = generate["tokens_per_second"]
            cells += [f"{case['artifact_bytes'] / GIB:.2f}",
                      f"{generate['peak_rss_bytes'] / GIB:.2f} ({case['generate_target_bytes'] / GIB:.2f})",
                      f"{tps:.1f} ({case['bandwidth_bound_tps']:.1f})" if tps else "-"]  # fmt: skip
        else:
            cells += ["-", "-", "-"]
        cells.append(compile_run["status"] if not generate else generate["status"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--limit-gb", type=float, default=20.0)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--work", type=Path, default=Path("bench/.work/compile_memory"))
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    bandwidth = read_bandwidth()
    record = {"cpu": cpu_model(), "threads": args.threads, "bandwidth_gb_s": bandwidth / 1e9,
              "max_seq_len": args.max_seq_len, "limit_gb": args.limit_gb, "cases": []}  # fmt: skip
    for name in args.cases.split(","):
        print(f"{name} ...", flush=True)
        record["cases"].append(run_case(name, args, bandwidth))
        print(json.dumps(record["cases"][-1], default=str)[:600], flush=True)
        peers.save_results(f"compile_memory{args.suffix}", record, markdown(record))


if __name__ == "__main__":
    main()
