"""Load a compiled artifact: check its manifest and hashes, then run it. numpy + onnxruntime only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file

from skiptree.errors import ModelSourceError
from skiptree.runtime.corpus import CorpusDrafter, CorpusIndex
from skiptree.runtime.draft_gate import VerifyCost
from skiptree.runtime.drafters import CandidateSource, Drafter, DraftModelDrafter, PromptLookupDrafter
from skiptree.runtime.early_exit import NEVER, EarlyExitStepModel
from skiptree.runtime.feature_draft import FeatureDrafter
from skiptree.runtime.generation import GenerationResult
from skiptree.runtime.generator import TextGenerator
from skiptree.runtime.manifest import read_manifest
from skiptree.runtime.merged_draft import TABLE_SOURCES, MergedDrafter
from skiptree.runtime.onnx_step import (
    GraphStepModel,
    KVCache,
    OnnxGraph,
    OnnxStepModel,
    SessionConfig,
    VerifyStepModel,  # fmt: skip
)
from skiptree.runtime.recycling import RecyclingDrafter
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.self_draft import SelfDrafter, SplitStepModel
from skiptree.runtime.speculative import SpeculativeDecoder
from skiptree.runtime.tokenizer import Tokenizer
from skiptree.runtime.tree import TreeShape


class Runtime(TextGenerator):
    """A loaded artifact: `generate(...)` with transformers' option names; see `TextGenerator`.

    An artifact compiled with a drafter decodes speculatively (`speculative=False` turns it off).
    """

    def __init__(self, folder: Path, threads: int | None = None, check_hashes: bool = True,
                 speculative: bool = True):  # fmt: skip
        self.folder = Path(folder)
        self.manifest: dict[str, Any] = read_manifest(self.folder, check_hashes=check_hashes)
        backend = self.manifest["backend"]
        self.session_config = SessionConfig(
            threads=backend.get("threads", 0) if threads is None else threads,
            optimization_level=backend.get("optimization_level", "extended"),
        )
        self.backend = open_backend(self.folder, self.manifest, self.session_config)
        self.step_model = step_model_of(self.backend, self.manifest)
        self.tokenizer = Tokenizer.from_folder(self.folder / self.manifest["tokenizer"]["folder"])
        self.eos_token_ids = list(self.manifest["tokenizer"]["eos_token_ids"])
        spec = self.manifest.get("speculative")
        self.speculative = self._speculative_decoder(spec) if spec and speculative else None

    def _graph(self, name: str):
        if name == "verify" and isinstance(self.step_model, VerifyStepModel | SplitStepModel):
            return self.step_model.graph  # one session (one copy of the weights) serves both
        if name == "self_draft" and isinstance(self.step_model, SplitStepModel):
            return self.step_model.draft_graph
        return self.backend.graph(name, self.step_model.cache)

    def _table_source(self, name: str, spec: dict[str, Any]) -> CandidateSource:
        if name == "prompt-lookup":
            return PromptLookupDrafter()
        if name == "recycle":
            warm = spec.get("recycle")
            state = load_file(str(self.folder / warm["file"])) if warm else {}  # older: no pair cache
            return RecyclingDrafter(self.manifest["model"]["config"]["vocab_size"], state=state)
        if name == "corpus":
            stored = load_file(str(self.folder / spec["corpus"]["file"]))
            return CorpusDrafter(CorpusIndex(stored["tokens"], stored["suffix_array"]))
        raise ModelSourceError(f"the artifact's drafter source '{name}' is unknown to this skiptree",
                               "recompile the artifact with this version")  # fmt: skip

    def _drafter(self, spec: dict[str, Any]) -> Drafter:
        names = spec.get("sources") or ([spec["drafter"]] if spec["drafter"] in TABLE_SOURCES else [])
        if names:  # free drafters, one or merged
            sources = [self._table_source(name, spec) for name in names]
            return MergedDrafter(sources, VerifyCost.from_json(spec.get("verify_cost")))
        if spec["drafter"] == "feature-head":
            name = spec["feature_head"]["graph"]
            head = self.backend.graph(name, self.backend.cache(self.manifest["graphs"][name]["signature"]))
            return FeatureDrafter(head, self.manifest["model"]["config"]["hidden_size"])
        if spec["drafter"] == "self":
            return SelfDrafter(self._graph("self_draft"), spec["self_draft"]["kind"] == "exit")
        draft = spec["draft_model"]
        cache = KVCache(draft["signature"])
        return DraftModelDrafter(OnnxStepModel(self.folder / draft["file"], draft["signature"],
                                               self.session_config, cache))  # fmt: skip

    def _speculative_decoder(self, spec: dict[str, Any]) -> SpeculativeDecoder:
        shape = TreeShape(tuple(spec["tree"]["parents"]), spec["tree"].get("spec", ""))
        return SpeculativeDecoder(self.step_model, self._graph("verify"), self._graph("compact"),
                                  self._drafter(spec), shape)  # fmt: skip

    def decode_tokens(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig,
                      eos: Sequence[int], seed: int | None,
                      on_token: Callable[[int], None] | None) -> GenerationResult:  # fmt: skip
        if self.speculative is None:
            result = super().decode_tokens(prompt_ids, max_new_tokens, sampling, eos, seed, on_token)
            if isinstance(self.step_model, EarlyExitStepModel):
                result.layers_run = list(self.step_model.layers_run)
            return result
        return self.speculative.generate(prompt_ids, max_new_tokens, sampling, eos, seed, on_token)

    @property
    def precision(self) -> str:
        """The target's weights as run: "float32", or e.g. "int4 weights (block 32), float32 activations"."""
        dtype = self.manifest.get("dtype", "float32")
        graph = self.manifest["graphs"].get("verify") or self.manifest["graphs"].get("step") or {}
        quantization = graph.get("quantization")
        if not quantization:
            return dtype
        head = "" if quantization["head"] else ", float head"
        compute = "int8 activations" if quantization["accuracy_level"] == 4 else f"{dtype} activations"
        grids = quantization.get("gguf_grid") or {}
        kept = ", ".join(f"{n} {kind}" for kind, n in grids.items())
        grid = f"; the GGUF grid kept for {kept}" if kept else ""
        block = quantization["block_size"]
        return f"int{quantization['bits']} weights (block {block}{head}{grid}), {compute}"

    @property
    def description(self) -> str:
        backend, spec = self.manifest["backend"], self.manifest.get("speculative")
        mode = f", speculative: {spec['drafter']} {spec['tree']['spec']}" if self.speculative else ""
        parents = spec["tree"]["parents"] if spec else []
        branching = parents != list(range(-1, len(parents) - 1))
        if self.speculative and branching and "int8 activations" in self.precision:
            # measured (README, int8 activations): chains are exact, branching trees are not
            mode += (" (LOSSY at near-ties: with int8 activations a branching tree can differ from "
                     "plain decoding; a chain:N tree or --quantize ...:accuracy=0 is exact)")  # fmt: skip
        if early := self.manifest.get("early_exit"):
            mode = (f", early exit (LOSSY): gate {early['gate']} at layers {early['exits']}, calibrated "
                    f"agreement {early['agreement']:.3f} with the full model, {early['mean_layers']:.1f} of "
                    f"{early['num_layers']} layers on average")  # fmt: skip
        return (f"{backend['name']} {backend['version']} artifact, {self.manifest['model']['source']}, "
                f"{self.precision}{mode}")  # fmt: skip


class OnnxBackend:
    """Opens an artifact's ONNX graphs: caches are `KVCache`s, graphs ORT sessions bound to them."""

    def __init__(self, folder: Path, manifest: dict[str, Any], config: SessionConfig):
        self.folder, self.graphs, self.config = Path(folder), manifest["graphs"], config

    def cache(self, signature: dict, num_layers: int | None = None) -> KVCache:
        return KVCache(signature, num_layers)

    def graph(self, name: str, cache: KVCache) -> OnnxGraph:
        return OnnxGraph(self.folder / self.graphs[name]["file"], cache, self.config)


def open_backend(folder: Path, manifest: dict[str, Any], config: SessionConfig):
    """The backend that runs the artifact's graphs (TVM is imported only for TVM artifacts)."""
    name = manifest.get("backend", {}).get("name", "onnxruntime")
    if name == "onnxruntime":
        return OnnxBackend(folder, manifest, config)
    if name == "tvm":
        from skiptree.runtime.tvm_step import TvmBackend

        return TvmBackend(folder, manifest, config)
    raise ModelSourceError(f"artifact backend '{name}' is not supported by this skiptree",
                           "recompile with --backend onnxruntime or --backend tvm")  # fmt: skip


def step_model_of(backend, manifest: dict[str, Any]):
    """The artifact's step model: its "step" graph, or its verify graph when it has no step graph."""
    graphs = manifest["graphs"]
    if "exit_step" in graphs:
        threshold = (manifest.get("early_exit") or {}).get("threshold", NEVER)
        cache = backend.cache(graphs["step"]["signature"])
        return EarlyExitStepModel(backend.graph("step", cache), backend.graph("exit_step", cache), threshold)
    if "step" in graphs:
        return GraphStepModel(backend.graph("step", backend.cache(graphs["step"]["signature"])))
    verify, speculative = graphs["verify"], manifest.get("speculative")
    max_tree = speculative["max_tree"] if speculative else verify["max_tree"]  # plain: a fused verify graph
    if "self_draft" in graphs and verify["signature"]["inputs"][0]["name"] == "hidden":  # a prefix exit
        cache = backend.cache(verify["signature"], num_layers=manifest["model"]["config"]["num_layers"])
        return SplitStepModel(backend.graph("self_draft", cache), backend.graph("verify", cache), max_tree)
    activations = (verify.get("quantization") or {}).get("accuracy_level", 0)
    even_rows = bool(speculative) and activations == 4  # int8 under speculation: see pad_to_even_rows
    return VerifyStepModel(backend.graph("verify", backend.cache(verify["signature"])), max_tree, even_rows)


def is_artifact(path: Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def load(path: str | Path, threads: int | None = None, speculative: bool = True) -> Runtime:
    """Open an artifact directory written by `skiptree compile`."""
    return Runtime(Path(path), threads=threads, speculative=speculative)
