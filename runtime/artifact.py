"""Load a compiled artifact: check its manifest and hashes, then run it. numpy + onnxruntime only."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from safetensors.numpy import load_file

from skiptree.errors import ModelSourceError
from skiptree.runtime.corpus import CorpusDrafter, CorpusIndex
from skiptree.runtime.draft_gate import VerifyCost
from skiptree.runtime.drafters import CandidateSource, Drafter, DraftModelDrafter, PromptLookupDrafter
from skiptree.runtime.early_exit import NEVER, EarlyExitStepModel
from skiptree.runtime.feature_draft import FeatureDrafter
from skiptree.runtime.generation import GenerationResult
from skiptree.runtime.generator import TextGenerator
from skiptree.runtime.head_source import HeadCandidates
from skiptree.runtime.manifest import (
    BackendEntry,
    DecodeMode,
    DrafterEntry,
    GraphEntry,
    GraphName,
    Manifest,
    read_manifest,
)
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
                 speculative: bool = True, session: SessionConfig | None = None):  # fmt: skip
        """`session`: the ONNX Runtime settings in full (threads and level included), instead of the
        manifest's with `threads`."""
        self.folder = Path(folder)
        self.manifest: Manifest = read_manifest(self.folder, check_hashes=check_hashes)
        backend = self.manifest.backend
        head = bool(self.manifest.speculative and self.manifest.speculative.feature_head)
        self.session_config = session or SessionConfig(
            threads=backend.threads if threads is None else threads,
            optimization_level=backend.optimization_level or "extended",
            # the head's session and the target's alternate every step: a pool spinning after its call
            # holds the cores the other needs (bench/results/README.md, "Drafts on held-out prompts")
            spinning=not head,
        )
        self.backend = open_backend(self.folder, backend, self.manifest.graphs, self.session_config)
        self.step_model = artifact_step_model(self.backend, self.manifest)
        self.tokenizer = Tokenizer.from_folder(self.folder / self.manifest.tokenizer.folder)
        self.eos_token_ids = list(self.manifest.tokenizer.eos_token_ids)
        spec = self.manifest.speculative
        decodes_speculatively = self.manifest.decode_mode == DecodeMode.SPECULATIVE and speculative
        self.speculative = self._speculative_decoder(spec) if spec and decodes_speculatively else None

    def _graph(self, name: GraphName):
        if name == GraphName.VERIFY and isinstance(self.step_model, VerifyStepModel | SplitStepModel):
            return self.step_model.graph  # one session (one copy of the weights) serves both
        if name == GraphName.SELF_DRAFT and isinstance(self.step_model, SplitStepModel):
            return self.step_model.draft_graph
        return self.backend.graph(name, self.step_model.cache)

    def _drafter(self, spec: DrafterEntry) -> Drafter:
        sources: list = free_sources(self.folder, self.manifest, spec)
        head = None
        if spec.feature_head is not None:
            name = spec.feature_head.graph
            graph = self.backend.graph(name, self.backend.cache(self.manifest.graphs[name].signature))
            head = FeatureDrafter(graph, self.manifest.model.config["hidden_size"])
        if sources:  # free drafters, one or merged (and the feature head's candidates among them)
            if head is not None:
                sources.append(HeadCandidates(head, TreeShape(spec.tree.parents, spec.tree.spec)))
            cost = spec.verify_cost
            return MergedDrafter(sources, VerifyCost(cost.nodes, cost.ratio, cost.paired) if cost else None)
        if head is not None:
            return head
        if spec.self_draft is not None:
            return SelfDrafter(self._graph(GraphName.SELF_DRAFT), spec.self_draft.kind == "exit")
        draft = spec.draft_model
        if draft is None:
            raise ModelSourceError(f"the artifact's drafter '{spec.drafter}' is unknown to this skiptree",
                                   "recompile the artifact with this version")  # fmt: skip
        cache = KVCache(draft.signature)
        return DraftModelDrafter(OnnxStepModel(self.folder / draft.file, draft.signature,
                                               self.session_config, cache))  # fmt: skip

    def _speculative_decoder(self, spec: DrafterEntry) -> SpeculativeDecoder:
        shape = TreeShape(spec.tree.parents, spec.tree.spec)
        return SpeculativeDecoder(self.step_model, self._graph(GraphName.VERIFY),
                                  self._graph(GraphName.COMPACT), self._drafter(spec), shape)  # fmt: skip

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
        """The target's weights as run: "float32", or e.g. "int4 weights (block 32, symmetric),
        float32 activations"."""
        dtype, graphs = self.manifest.dtype, self.manifest.graphs
        graph = graphs.get(GraphName.VERIFY) or graphs.get(GraphName.STEP)
        quantization = graph.quantization if graph else None
        if not quantization:
            return dtype
        head = "" if quantization["head"] else ", float head"
        compute = "int8 activations" if quantization["accuracy_level"] == 4 else f"{dtype} activations"
        grids = quantization.get("gguf_grid") or {}
        kept = ", ".join(f"{n} {kind}" for kind, n in grids.items())
        grid = f"; the GGUF grid kept for {kept}" if kept else ""
        block = quantization["block_size"]
        zero_points = "symmetric" if quantization.get("symmetric") else "zero points"  # older: zero points
        return f"int{quantization['bits']} weights (block {block}, {zero_points}{head}{grid}), {compute}"

    @property
    def description(self) -> str:
        backend, spec = self.manifest.backend, self.manifest.speculative
        mode = f", speculative: {spec.drafter} {spec.tree.spec}" if self.speculative and spec else ""
        parents = list(spec.tree.parents) if spec else []
        branching = parents != list(range(-1, len(parents) - 1))
        graph = self.manifest.graphs.get(GraphName.VERIFY)
        invariant = bool(((graph.quantization if graph else None) or {}).get("batch_invariant"))
        if self.speculative and branching and "int8 activations" in self.precision and not invariant:
            # measured (README, int8 activations): chains are exact, branching trees are not
            mode += (" (LOSSY at near-ties: with int8 activations a branching tree can differ from "
                     "plain decoding; a chain:N tree or --quantize ...:accuracy=0 is exact)")  # fmt: skip
        early = self.manifest.early_exit
        if self.manifest.decode_mode == DecodeMode.EARLY_EXIT and early is not None:
            mode = (f", early exit (LOSSY): gate {early.gate} at layers {list(early.exits)}, calibrated "
                    f"agreement {early.agreement:.3f} with the full model, {early.mean_layers:.1f} of "
                    f"{early.num_layers} layers on average")  # fmt: skip
        return (f"{backend.name} {backend.version} artifact, {self.manifest.model.source}, "
                f"{self.precision}{mode}")  # fmt: skip


def table_source(folder: Path, manifest: Manifest, name: str, spec: DrafterEntry) -> CandidateSource:
    """A free drafter of the artifact: prompt lookup, recycling (warm table if stored), corpus lookup."""
    if name == "prompt-lookup":
        return PromptLookupDrafter()
    if name == "recycle":
        warm = spec.recycle
        state = load_file(str(folder / warm.file)) if warm else {}  # no warm table: starts empty
        return RecyclingDrafter(manifest.model.config["vocab_size"], state=state)
    if name == "corpus" and spec.corpus is not None:
        stored = load_file(str(folder / spec.corpus.file))
        return CorpusDrafter(CorpusIndex(stored["tokens"], stored["suffix_array"]))
    raise ModelSourceError(f"the artifact's drafter source '{name}' is unknown to this skiptree",
                           "recompile the artifact with this version")  # fmt: skip


def free_sources(folder: Path, manifest: Manifest, spec: DrafterEntry) -> list[CandidateSource]:
    """The artifact's free drafters (no weights, no graph), [] when it drafts otherwise."""
    names = spec.sources or ((spec.drafter,) if spec.drafter in TABLE_SOURCES else ())
    return [table_source(folder, manifest, name, spec) for name in names]


class OnnxBackend:
    """Opens an artifact's ONNX graphs: caches are `KVCache`s, graphs ORT sessions bound to them."""

    def __init__(self, folder: Path, graphs: Mapping[str, GraphEntry], config: SessionConfig):
        self.folder, self.graphs, self.config = Path(folder), graphs, config

    def cache(self, signature: dict, num_layers: int | None = None) -> KVCache:
        return KVCache(signature, num_layers)

    def graph(self, name: str, cache: KVCache) -> OnnxGraph:
        return OnnxGraph(self.folder / self.graphs[name].file, cache, self.config)


def open_backend(folder: Path, backend: BackendEntry, graphs: Mapping[str, GraphEntry],
                 config: SessionConfig):  # fmt: skip
    """The backend that runs the artifact's graphs (TVM is imported only for TVM artifacts)."""
    if backend.name == "onnxruntime":
        return OnnxBackend(folder, graphs, config)
    if backend.name == "tvm" and backend.weights:
        from skiptree.runtime.tvm_step import TvmBackend  # imports tvm: only for TVM artifacts

        return TvmBackend(folder, backend.weights, graphs, config)
    raise ModelSourceError(f"artifact backend '{backend.name}' is not supported by this skiptree",
                           "recompile with --backend onnxruntime or --backend tvm")  # fmt: skip


def lone_rows_differ(verify: GraphEntry) -> bool:
    """Whether the graph's one-row calls compute differently from calls of 2+ rows (int8 activations,
    not batch-invariant): speculation then pads them (`pad_lone_rows`)."""
    quantization = verify.quantization or {}
    return quantization.get("accuracy_level", 0) == 4 and not quantization.get("batch_invariant", False)


def step_model_of(backend, graphs: Mapping[str, GraphEntry], mode: DecodeMode, num_layers: int,
                  max_tree: int | None = None, threshold: float = NEVER):  # fmt: skip
    """The step model of decode mode `mode`: early exit's "step" + "exit_step" (exiting at
    `threshold`), else the "step" graph, else the verify graph (trees of up to `max_tree` tokens,
    default the graph's), which a prefix-exit self-draft's graph feeds."""
    if mode == DecodeMode.EARLY_EXIT:
        cache = backend.cache(graphs[GraphName.STEP].signature)
        return EarlyExitStepModel(backend.graph(GraphName.STEP, cache),
                                  backend.graph(GraphName.EXIT_STEP, cache), threshold)  # fmt: skip
    if GraphName.STEP in graphs:
        return GraphStepModel(backend.graph(GraphName.STEP, backend.cache(graphs[GraphName.STEP].signature)))
    verify = graphs[GraphName.VERIFY]  # plain: a fused verify graph serves as the step
    max_tree = max_tree or verify.max_tree or 1
    if GraphName.SELF_DRAFT in graphs and verify.signature["inputs"][0]["name"] == "hidden":  # a prefix exit
        cache = backend.cache(verify.signature, num_layers=num_layers)
        return SplitStepModel(backend.graph(GraphName.SELF_DRAFT, cache),
                              backend.graph(GraphName.VERIFY, cache), max_tree)  # fmt: skip
    pads = mode == DecodeMode.SPECULATIVE and lone_rows_differ(verify)  # pad_lone_rows
    graph = backend.graph(GraphName.VERIFY, backend.cache(verify.signature))
    return VerifyStepModel(graph, max_tree, pads)


def artifact_step_model(backend, manifest: Manifest):
    """`step_model_of` for a whole artifact."""
    early = manifest.early_exit
    return step_model_of(backend, manifest.graphs, manifest.decode_mode, manifest.model.config["num_layers"],
                         manifest.max_tree, early.threshold if early else NEVER)  # fmt: skip


def is_artifact(path: Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def load(path: str | Path, threads: int | None = None, speculative: bool = True) -> Runtime:
    """Open an artifact directory written by `skiptree compile`."""
    return Runtime(Path(path), threads=threads, speculative=speculative)
