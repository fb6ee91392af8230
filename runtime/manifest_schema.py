"""The artifact manifest's schema (format 2): one frozen dataclass per JSON object of `manifest.json`.

Field names are the JSON keys. `to_json()` writes every field (None as null); `from_json()` reads
one back and refuses a missing field, a field this format does not have, or a value of the wrong
kind with a `SchemaError` naming it (`read_manifest` turns that into a one-line error saying to
recompile). The graph names (`GraphName`) and decode modes (`DecodeMode`) are defined here once.
Open-ended parts stay plain JSON: a model's config, a graph's signature, quantisation records,
a trained head's training record, TVM tuning records. stdlib only (the runtime reads it).
"""

from __future__ import annotations

import enum
import functools
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Self

FORMAT_VERSION = 2


class GraphName(enum.StrEnum):
    """The artifact's graphs, the keys of the manifest's `graphs` (each lowered to one executable)."""

    STEP = "step"  # prefill + decode (the trace); not lowered when a fused "verify" serves as the step
    VERIFY = "verify"  # root + a tree of drafts in one call (InsertTreeVerify)
    COMPACT = "compact"  # moves the accepted drafts' K/V into place (InsertTreeVerify)
    SELF_DRAFT = "self_draft"  # the target on a subset of its layers (SkipLayers)
    FEATURE_DRAFT = "feature_draft"  # a trained feature-level draft head, EAGLE (InsertFeatureHead)
    EXIT_STEP = "exit_step"  # a one-token decode that may stop after an exit layer (InsertEarlyExit)


class DecodeMode(enum.StrEnum):
    """How the artifact decodes, stated by the compiler (never guessed from its graphs)."""

    PLAIN = "plain"  # one token per step
    SPECULATIVE = "speculative"  # a drafter proposes a tree, the verify graph checks it (lossless)
    EARLY_EXIT = "early-exit"  # decode steps may stop before the last layer (lossy, calibrated)


class SchemaError(ValueError):
    """A manifest that does not fit this schema (a field missing, unknown or of the wrong kind)."""


def _at(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _encode(value: Any) -> Any:
    if isinstance(value, Entry):
        return value.to_json()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        return {_encode(key): _encode(item) for key, item in value.items()}
    return value


def _decode(hint: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as the schema's type `hint`; SchemaError when it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # the schema's unions are all `X | None`
        if value is None:
            return None
        (kind,) = [arg for arg in args if arg is not type(None)]
        return _decode(kind, value, where)
    if hint is Any:
        return value
    if value is None:
        raise SchemaError(f"{where} is null")
    if isinstance(hint, type) and issubclass(hint, Entry):
        return hint.from_json(value, where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise SchemaError(f"{where} is '{value}', not one of {', '.join(hint)}") from None
    if origin is tuple:
        _expect(value, list | tuple, where)
        return tuple(_decode(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        _expect(value, dict, where)
        return {_decode(args[0], key, f"{where} key"): _decode(args[1], item, _at(where, key))
                for key, item in value.items()}  # fmt: skip
    if hint is float:
        _expect(value, int | float, where)
        return value
    _expect(value, hint, where)
    return value


def _expect(value: Any, kind: Any, where: str) -> None:
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = {dict: "an object", list | tuple: "a list", int | float: "a number"}
        raise SchemaError(f"{where} is {type(value).__name__} {str(value)[:40]!r}, "
                          f"not {names.get(kind, getattr(kind, '__name__', kind))}")  # fmt: skip


class Entry:
    """to_json / from_json for the schema's frozen dataclasses."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: _encode(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> Self:
        if not isinstance(data, dict):
            raise SchemaError(f"{where or 'the manifest'} is not a JSON object")
        hints = _hints(cls)
        unknown = [name for name in data if name not in hints]
        if unknown:
            raise SchemaError(f"{_at(where, unknown[0])} is not a field of this format")
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                values[f.name] = _decode(hints[f.name], data[f.name], _at(where, f.name))
            elif f.default is MISSING and f.default_factory is MISSING:
                raise SchemaError(f"{_at(where, f.name)} is missing")
        return cls(**values)


@dataclass(frozen=True)
class FileEntry(Entry):
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ModelEntry(Entry):
    source: str  # as given to compile: a zoo name, a folder, a GGUF file
    model_type: str
    weights_sha256: str  # over the weight files (compiler/compile.py weights_sha256)
    config: dict[str, Any]  # skiptree.models.config.ModelConfig.to_json()


@dataclass(frozen=True)
class BackendEntry(Entry):
    name: str  # "onnxruntime" or "tvm"
    version: str
    threads: int = 0  # the artifact's default (0: the backend decides)
    optimization_level: str | None = None  # onnxruntime: the graph optimisation level
    target: dict[str, Any] | None = None  # tvm: the compile target
    weights: str | None = None  # tvm: the shared weights file
    database: str | None = None  # tvm: the MetaSchedule database the schedules came from
    tuning: dict[str, Any] | None = None  # tvm: what MetaSchedule did, by graph


@dataclass(frozen=True)
class DeviceEntry(Entry):
    """runtime/device.py's description of a machine and backend, and its fingerprint."""

    machine: str
    cpu: str
    cores: int | None
    accelerator: str
    backend: str
    backend_version: str
    fingerprint: str


@dataclass(frozen=True)
class GraphEntry(Entry):
    file: str  # the executable, relative to the artifact
    signature: dict[str, Any]  # inputs, outputs, in-place cache writes (compiler/ir/graph.py)
    quantization: dict[str, Any] | None = None  # onnxruntime: weight-only MatMulNBits, if quantised
    max_tree: int | None = None  # verify: the largest tree (root included), also its prefill chunk
    max_batch: int | None = None  # verify: > 1 when it takes a batch of trees (one per cache row)
    params: tuple[str, ...] | None = None  # tvm: the weight keys the graph takes
    static_tokens: tuple[int, ...] | None = None  # tvm: token counts with a static (tunable) entry


@dataclass(frozen=True)
class TokenizerEntry(Entry):
    folder: str
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class PassEntry(Entry):
    name: str
    options: dict[str, Any]
    modified: bool


@dataclass(frozen=True)
class CheckEntry(Entry):
    """The lowered graphs against eager torch on a few steps, at compile time."""

    steps: int
    max_abs_logit_error: float
    argmax_agreement: float
    perplexity: float | None = None  # a quantised artifact's, on compiler/quality.py's passage
    float_perplexity: float | None = None  # the float model's (eager torch) on the same passage


@dataclass(frozen=True)
class TreeProvenance(Entry):
    """The tuning session that measured and chose a tree (compile --tuned)."""

    session: str  # the session folder
    device: DeviceEntry | None  # where it was measured (fingerprint included)
    forced: bool  # used with --force: tuned on another device or model
    acceptance: tuple[float, ...]  # measured: of each rank's draft (a tree), or of the chain's drafts
    decode_ms: float | None  # T(0), the plain step
    verify_ms: dict[str, float]  # T(n): the verify step by draft nodes n
    predicted_speedup: float | None
    measured_speedup: float | None


@dataclass(frozen=True)
class TreeEntry(Entry):
    spec: str  # as parsed (runtime/tree.py): a preset, or the tree file's path
    parents: tuple[int, ...]
    depth: int
    provenance: TreeProvenance | None = None  # None: the tree was given by hand


@dataclass(frozen=True)
class DraftModelEntry(Entry):
    source: str
    model_type: str
    config: dict[str, Any]
    file: str
    quantization: dict[str, Any] | None
    signature: dict[str, Any]
    pipeline: tuple[PassEntry, ...] = ()  # the passes its step graph went through, as the target's


@dataclass(frozen=True)
class SelfDraftEntry(Entry):
    spec: str
    kind: str  # "skip" (any layers) or "exit" (a prefix, which verification continues)
    layers: tuple[int, ...]
    layers_run_share: float


@dataclass(frozen=True)
class FeatureHeadEntry(Entry):
    graph: GraphName
    training: dict[str, Any]  # the trained head's record


@dataclass(frozen=True)
class RecycleEntry(Entry):
    """A Token Recycling table warmed on the calibration prompts (compiler/drafters/recycle_warm.py)."""

    file: str
    width: int
    warm_prompts: int
    rows_filled: int
    pairs_filled: int


@dataclass(frozen=True)
class CorpusEntry(Entry):
    """A corpus lookup datastore (compiler/drafters/corpus.py)."""

    file: str
    source: str
    documents: int
    skipped_files: int
    tokens: int
    bytes: int
    build_seconds: float


@dataclass(frozen=True)
class VerifyCostEntry(Entry):
    """T(n) / T(0) on the compiling machine (compiler/drafters/verify_cost.py)."""

    prefix: int
    plain_ms: float
    nodes: tuple[int, ...]
    ratio: tuple[float, ...]
    paired: bool


@dataclass(frozen=True)
class DraftVocabEntry(Entry):
    size: int
    calibration_coverage: float


@dataclass(frozen=True)
class DrafterEntry(Entry):
    """The manifest's `speculative`: the drafter, its state and the tree it drafts."""

    drafter: str  # "prompt-lookup+recycle" (free sources), "self", "feature-head", "draft-model"
    tree: TreeEntry
    max_tree: int  # the largest tree the verify graph accepts (root included)
    sources: tuple[str, ...] = ()  # free drafters: their table sources, merged in this order
    verify_cost: VerifyCostEntry | None = None
    draft_model: DraftModelEntry | None = None
    self_draft: SelfDraftEntry | None = None
    feature_head: FeatureHeadEntry | None = None
    recycle: RecycleEntry | None = None
    corpus: CorpusEntry | None = None
    draft_vocab: DraftVocabEntry | None = None


@dataclass(frozen=True)
class EarlyExitEntry(Entry):
    """The calibrated early exit (compiler/drafters/exit_calibration.py): lossy."""

    threshold: float
    agreement: float
    mean_layers: float
    gate: str
    exits: tuple[int, ...]
    min_agreement: float
    calibration_positions: int
    top1_agreement_by_exit: tuple[float, ...]
    num_layers: int
    lossy: bool
    exit_head_tokens: int


@dataclass(frozen=True)
class Manifest(Entry):
    format_version: int
    skiptree_version: str
    created: str
    decode_mode: DecodeMode
    model: ModelEntry
    backend: BackendEntry
    device: DeviceEntry
    max_seq_len: int
    graphs: dict[GraphName, GraphEntry]
    tokenizer: TokenizerEntry
    pipeline: tuple[PassEntry, ...]
    check: CheckEntry | None
    speculative: DrafterEntry | None
    early_exit: EarlyExitEntry | None
    dtype: str
    torch_version: str
    files: dict[str, FileEntry] = field(default_factory=dict)  # filled by write_manifest

    def __post_init__(self) -> None:
        """The decode mode and the parts it needs agree."""
        needs = {DecodeMode.PLAIN: (), DecodeMode.SPECULATIVE: (GraphName.VERIFY, GraphName.COMPACT),
                 DecodeMode.EARLY_EXIT: (GraphName.STEP, GraphName.EXIT_STEP)}[self.decode_mode]  # fmt: skip
        missing = [name.value for name in needs if name not in self.graphs]
        if GraphName.STEP not in self.graphs and GraphName.VERIFY not in self.graphs:
            missing.append("step or verify")
        if missing:
            raise SchemaError(f"decode_mode {self.decode_mode} but no {' or '.join(missing)} graph")
        for part, mode in (("speculative", DecodeMode.SPECULATIVE), ("early_exit", DecodeMode.EARLY_EXIT)):
            if (getattr(self, part) is not None) != (self.decode_mode == mode):
                state = "without" if getattr(self, part) is None else "with"
                raise SchemaError(f"decode_mode {self.decode_mode} {state} a {part} entry")

    @property
    def max_tree(self) -> int | None:
        """The largest tree a verify call takes: the drafter's, else the verify graph's (plain)."""
        if self.speculative is not None:
            return self.speculative.max_tree
        verify = self.graphs.get(GraphName.VERIFY)
        return verify.max_tree if verify else None
