"""Load benchmark of `skiptree serve`: concurrent streaming clients against OpenAI-compatible servers.

    .venv/bin/python bench/serve.py [--threads 1 2] [--clients 1 2 4 8] [--sets code chat]

Servers, each started on a free loopback port with the same threads, one at a time:
  - skiptree: `skiptree serve ART` (continuous batching, speculation with one budget per step),
  - skiptree-plain: the same artifact with `--no-speculation` (continuous batching, plain steps),
  - llama.cpp: `python -m llama_cpp.server` (llama-cpp-python; the same model as GGUF Q4_1, one
    request at a time), when installed.
ART is SmolLM2-135M-Instruct compiled with `--quantize int4 --draft lookup+recycle --max-batch 8`.
For each server, prompt set and concurrency c, c client threads stream chat completions (temperature
0, `max_tokens` fixed) from a queue of max(4, 2c) requests (the set's prompts in turn) through the real
`openai` client. Reported: total completion tokens / wall time of the whole run, time to first token
(send -> first content chunk) and inter-token latency (gaps between content chunks) at p50 / p95, and
tokens per request. `skiptree generate` (the same artifact, one request at a time, whole generations)
is the single-request reference, and the same on an artifact compiled without --max-batch (its
verify graph uses ORT's fused GroupQueryAttention, which takes no batch of trees). Results are
written after every run: bench/results/serve.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import save_results  # noqa: E402
from speculative import PROMPT_SETS  # noqa: E402

import skiptree  # noqa: E402
from skiptree.runtime.device import cpu_model  # noqa: E402

WORK = Path(__file__).resolve().parent / ".work" / "serve"
GGUF = Path.home() / ".cache" / "skiptree" / "gguf" / "smollm2-135m-instruct-q4_1.gguf"
SETS = {"code": "code", "chat": "chat", "edit": "copying"}


def compile_artifact(max_batch: int) -> Path:
    """The served artifact (max_batch > 1: its verify graph takes a batch, attention unfused), or with
    max_batch 1 the same artifact for one request per call (fused attention), for reference."""
    art = WORK / f"smollm2-int4-chain4-batch{max_batch}"
    if not (art / "manifest.json").is_file():
        command = [sys.executable, "-m", "skiptree", "compile", "smollm2-135m", "-o", str(art), "--quantize",
                   "int4", "--draft", "lookup+recycle", "--tree", "chain:4", "--max-seq-len", "512",
                   "--max-batch", str(max_batch)]  # fmt: skip
        subprocess.run(command, check=True)
    return art


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int, health: str) -> subprocess.Popen:
    log = open(WORK / f"server-{port}.log", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited: see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{health}", timeout=1):
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"{command[:4]} did not start")


def server_command(engine: str, art: Path, threads: int, port: int) -> tuple[list[str], str, str]:
    """(command, health path, model name) of a server."""
    if engine.startswith("skiptree"):
        extra = ["--no-speculation"] if engine == "skiptree-plain" else []
        command = [sys.executable, "-m", "skiptree", "serve", str(art), "--port", str(port), "--threads",
                   str(threads), "--model-id", "smollm2", *extra]  # fmt: skip
        return command, "/health", "smollm2"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF), "--model_alias", "smollm2",
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "512",
               "--host", "127.0.0.1", "--port", str(port),
               "--interrupt_requests", "False"]  # fmt: skip  (queue requests: by default a new one cancels)
    return command, "/v1/models", "smollm2"


def one_request(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    stamps, text, tokens = [], "", None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            text += chunk.choices[0].delta.content
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    done = time.perf_counter()
    if tokens is None:  # llama-cpp-python's server sends no usage when streaming: one chunk per token
        tokens = len(stamps)
    return {"prompt": prompt, "ttft": (stamps[0] - sent) if stamps else None, "gaps": list(np.diff(stamps)),
            "tokens": tokens, "text": text, "seconds": done - sent}  # fmt: skip


def load(port: int, model: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    work: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(max(4, 2 * clients)):
        work.put(prompts[i % len(prompts)])
    results: list[dict] = []
    failures: list[str] = []

    def client_loop() -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                               timeout=600)  # fmt: skip
        while True:
            try:
                prompt = work.get_nowait()
            except queue.Empty:
                return
            try:
                results.append(one_request(client, model, prompt, max_tokens))
            except openai.OpenAIError as error:  # counted, not fatal: a peer may refuse concurrency
                failures.append(f"{type(error).__name__}: {error}"[:200])

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    start_time = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start_time
    tokens = sum(r["tokens"] or 0 for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    pct = lambda values, q: float(np.percentile(values, q)) if values else None  # noqa: E731
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
            "itl_p50_s": pct(gaps, 50), "itl_p95_s": pct(gaps, 95),
            "texts": {r["prompt"]: r["text"] for r in results}, "failed": failures}  # fmt: skip


def same_texts(run: dict, runs: list[dict]) -> bool | None:
    """Whether every prompt's text equals the plain server's for that prompt (None: not measured)."""
    texts = {}
    for other in runs:
        if other["server"] == "skiptree-plain" and (other["set"], other["threads"]) == (
            run["set"],
            run["threads"],
        ):
            texts.update(other["texts"])
    common = [prompt for prompt in run["texts"] if prompt in texts]
    return all(run["texts"][p] == texts[p] for p in common) if common else None


def generate_reference(art: Path, prompts: list[str], threads: int, max_tokens: int) -> dict:
    """`skiptree generate`'s throughput on the same artifact: whole generations, one at a time."""
    runtime = skiptree.load(art, threads=threads)
    runtime.generate(prompts[0], max_new_tokens=8, chat=True)  # warm-up
    tokens, start = 0, time.perf_counter()
    for prompt in prompts[:4]:
        tokens += len(runtime.generate(prompt, max_new_tokens=max_tokens, chat=True).token_ids)
    return {"tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - start)}


def markdown(record: dict) -> str:
    lines = ["# skiptree serve under load (bench/serve.py)", "",
             f"{record['cpu']}; SmolLM2-135M-Instruct int4 (skiptree: `--quantize int4 --draft "
             "lookup+recycle --tree chain:4 --max-batch 8`; llama.cpp: GGUF Q4_1); chat "
             f"completions, temperature 0, {record['max_tokens']} tokens a request, max(4, 2c) requests "
             "per run; loopback.", "",
             "| threads | set | server | clients | tokens/s | vs 1 client plain | TTFT p50 / p95 ms | "
             "ITL p50 / p95 ms | same text as plain |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in record["runs"]:
        base = next((r for r in record["runs"] if r["threads"] == run["threads"] and r["set"] == run["set"]
                     and r["server"] == "skiptree-plain" and r["clients"] == 1), None)  # fmt: skip
        ratio = f"{run['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        ms = lambda v: "" if v is None else f"{v * 1e3:.0f}"  # noqa: E731
        same = {True: "yes", False: "**no**", None: ""}[run.get("same_text_as_plain")]
        lines.append(f"| {run['threads']} | {run['set']} | {run['server']} | {run['clients']} | "
                     f"{run['tokens_per_s']:.1f} | {ratio} | {ms(run['ttft_p50_s'])} / "
                     f"{ms(run['ttft_p95_s'])} | {ms(run['itl_p50_s'])} / {ms(run['itl_p95_s'])} | "
                     f"{same} |")  # fmt: skip
    lines += ["", "`skiptree generate` on the same artifact (one request at a time, whole generations):", ""]
    for key, ref in record["generate"].items():
        lines.append(f"- {key}: {ref['tokens_per_s']:.1f} tokens/s")
    if record.get("unavailable"):
        lines += ["", *(f"- {name}: {why}" for name, why in record["unavailable"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--sets", nargs="+", default=["code", "chat"], choices=sorted(SETS))
    parser.add_argument("--servers", nargs="+", default=["skiptree-plain", "skiptree", "llama.cpp"])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stem", default="serve", help="results file name: bench/results/STEM.{json,md}")
    parser.add_argument("--merge", action="store_true",
                        help="add to STEM.json's runs (replacing these servers'), no generate references")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    art = compile_artifact(max(args.clients))
    single = compile_artifact(1)
    record = {"cpu": cpu_model(), "machine": platform.machine(), "max_tokens": args.max_tokens, "runs": [],
              "generate": {}, "unavailable": {}}  # fmt: skip
    stored = Path(__file__).resolve().parent / "results" / f"{args.stem}.json"
    if args.merge and stored.is_file():
        record = json.loads(stored.read_text())
        record["runs"] = [run for run in record["runs"] if run["server"] not in args.servers]
    try:
        import llama_cpp  # noqa: F401  (the peer: optional, bench extra)
    except ImportError:
        record["unavailable"]["llama.cpp"] = "llama-cpp-python is not installed (see the module doc)"
    servers = [s for s in args.servers if s not in record["unavailable"]]
    for threads in args.threads:
        for set_name in args.sets if not args.merge else ():
            prompts = PROMPT_SETS[SETS[set_name]][1]
            for label, artifact in (("--max-batch 8", art), ("--max-batch 1, fused attention", single)):
                reference = generate_reference(artifact, prompts, threads, args.max_tokens)
                record["generate"][f"{threads} threads, {set_name}, {label}"] = reference
        for server in servers:
            port = free_port()
            command, health, model = server_command(server, art, threads, port)
            process = start(command, port, health)
            try:
                for set_name in args.sets:
                    prompts = PROMPT_SETS[SETS[set_name]][1]
                    for clients in args.clients:
                        run = load(port, model, prompts, clients, args.max_tokens)
                        run.update(threads=threads, set=set_name, server=server)
                        if server == "skiptree":  # lossless through HTTP: the same text as plain steps
                            run["same_text_as_plain"] = same_texts(run, record["runs"])
                        record["runs"].append(run)
                        print(f"{threads}t {set_name} {server} c={clients}: {run['tokens_per_s']:.1f} tok/s, "
                              f"ITL p95 {run['itl_p95_s'] * 1e3:.0f} ms", flush=True)  # fmt: skip
                        save_results(args.stem, record, markdown(record))
            finally:
                process.terminate()
                process.wait(timeout=120)
    save_results(args.stem, record, markdown(record))


if __name__ == "__main__":
    main()
