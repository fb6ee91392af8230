"""Peer engines for bench/decode_speed.py: transformers `generate` and onnxruntime-genai.

Every engine has `name` and `run(prompt_ids, max_new_tokens) -> (new token ids, decode tokens/s)`,
where tokens/s counts the tokens after the first one over the time from the first to the last
(prefill excluded), as `skiptree.runtime.generation.GenerationResult.tokens_per_second` does.
An engine that cannot be installed, built or loaded becomes an `Unavailable` with the reason.
"""

from __future__ import annotations

import collections
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from skiptree.models.zoo import skiptree_home


@dataclass
class Unavailable:
    name: str
    reason: str


def _tail(text: str, lines: int = 6) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _decode_speed(times: list[float]) -> float:
    steps = len(times) - 1
    return steps / (times[-1] - times[0]) if steps > 0 and times[-1] > times[0] else 0.0


class TransformersEngine:
    """`AutoModelForCausalLM.generate`, greedy; a streamer timestamps every new token."""

    def __init__(self, folder: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.name = f"transformers {metadata.version('transformers')} generate"
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def run(self, prompt_ids: list[int], max_new_tokens: int, **generate_options) -> tuple[list[int], float]:
        """Tokens and decode tokens/s; `generate_options` go to generate (e.g. assistant_early_exit=4)."""
        times: list[tuple[float, int]] = []

        class Stamp:  # put() gets the prompt first, then new tokens (several at once when assisted)
            def put(self, value):
                times.append((time.perf_counter(), value.numel()))

            def end(self):
                pass

        input_ids = self.torch.tensor([prompt_ids])
        with self.torch.inference_mode():
            out = self.model.generate(input_ids, attention_mask=self.torch.ones_like(input_ids),
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      streamer=Stamp(), **generate_options)  # fmt: skip
        new = times[1:]  # tokens after the first, over the time since the first
        tokens = sum(count for _, count in new[1:])
        elapsed = new[-1][0] - new[0][0] if len(new) > 1 else 0.0
        return out[0, len(prompt_ids) :].tolist(), tokens / elapsed if elapsed > 0 else 0.0


class GenaiEngine:
    """onnxruntime-genai `Generator`, greedy, intra-op threads set through a config overlay."""

    def __init__(self, name: str, model_dir: Path, threads: int):
        import onnxruntime_genai as og

        self.og, self.name, self.model_dir = og, name, model_dir
        config = og.Config(str(model_dir))
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new_tokens)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(prompt_ids)  # prefill
        tokens, times = [], []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            times.append(time.perf_counter())
        return tokens, _decode_speed(times)


def genai_version() -> str | None:
    try:
        return metadata.version("onnxruntime-genai")
    except metadata.PackageNotFoundError:
        return None


def build_genai(folder: Path, precision: str) -> Path:
    """The onnxruntime-genai model of HF `folder`, built once under $SKIPTREE_HOME/bench/."""
    source = folder / "skiptree_source.json"
    key = hashlib.sha256(source.read_bytes() if source.is_file() else str(folder).encode()).hexdigest()
    dest = (skiptree_home() / "bench" / f"onnxruntime-genai-{genai_version()}"
            / f"{folder.name}-{key[:12]}-{precision}-cpu")  # fmt: skip
    if (dest / "genai_config.json").is_file():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(partial),
           "-p", precision, "-e", "cpu", "-c", str(partial / "hf_cache")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(partial / "hf_cache", ignore_errors=True)
    if proc.returncode != 0 or not (partial / "genai_config.json").is_file():
        raise RuntimeError(
            f"model builder failed (exit {proc.returncode}): {_tail(proc.stderr + proc.stdout)}"
        )
    partial.rename(dest)
    return dest


def genai_engines(folder: Path, threads: int, precisions=("fp32", "int4")) -> list:
    version = genai_version()
    if version is None:
        return [Unavailable(f"onnxruntime-genai {p}", "onnxruntime-genai is not installed "
                            "(pip install onnxruntime-genai)") for p in precisions]  # fmt: skip
    engines: list = []
    for precision in precisions:
        name = f"onnxruntime-genai {version} {precision}"
        try:
            engines.append(GenaiEngine(name, build_genai(folder, precision), threads))
        except Exception as error:  # noqa: BLE001 - any failure is reported, not raised
            engines.append(Unavailable(name, f"{type(error).__name__}: {error}"))
    return engines


def transformers_engine(folder: Path, threads: int):
    try:
        return TransformersEngine(folder, threads)
    except Exception as error:  # noqa: BLE001
        return Unavailable("transformers generate", f"{type(error).__name__}: {error}")


def op_counts(onnx_path: Path) -> dict:
    """Node count and op types (domain-qualified for contrib ops) of an ONNX graph."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    counts = collections.Counter(
        f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        for node in model.graph.node
    )
    return {"nodes": sum(counts.values()), "op_types": dict(counts.most_common())}


_RSS_SCRIPT = """
import json, sys
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
kind, path, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
n, threads = int(sys.argv[4]), int(sys.argv[5])
if kind == "skiptree":
    import skiptree
    before = status()["VmRSS"]
    engine = skiptree.load(path, threads=threads)
    loaded = status()["VmRSS"]
    tokens = engine.generate(ids, max_new_tokens=n).token_ids
else:
    sys.path.insert(0, sys.argv[6])
    from peers import GenaiEngine
    before = status()["VmRSS"]
    engine = GenaiEngine(kind, path, threads)
    loaded = status()["VmRSS"]
    tokens = engine.run(ids, n)[0]
print(json.dumps({"rss_before_load_bytes": before, "rss_after_load_bytes": loaded,
                  "peak_rss_bytes": status()["VmHWM"], "new_tokens": len(tokens)}))
"""


def peak_rss(kind: str, path: Path, prompt_ids: list[int], max_new_tokens: int, threads: int) -> dict:
    """Load and generate once in a fresh process (kind 'skiptree' or a genai engine name); read VmHWM."""
    cmd = [sys.executable, "-c", _RSS_SCRIPT, kind, str(path), json.dumps(prompt_ids),
           str(max_new_tokens), str(threads), str(Path(__file__).parent)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": _tail(proc.stderr)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save_results(stem: str, record: dict, markdown: str) -> None:
    """bench/results/<stem>.json and .md, and the table on stdout."""
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (results / f"{stem}.md").write_text(markdown)
    print(markdown)
