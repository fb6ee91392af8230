"""`CompileOptions`: everything `skiptree compile` takes, as one frozen dataclass.

CLI flags and `skiptree.compile(**options)` both build this. The option languages arrive as
strings and are parsed into typed specs when it is built (`skiptree.compiler.specs`,
`skiptree.runtime.tree.parse_tree`), and every check that needs no model runs then too: a
malformed or contradictory option is refused in one line before any work. `validate(context)`
adds the one check that needs the model (its context length). Downstream code reads fields only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from skiptree.compiler.drafters.corpus import check_corpus_size
from skiptree.compiler.specs import (
    CompileOptionError,
    DraftModel,
    DraftSpec,
    EarlyExitSpec,
    FeatureHeadDraft,
    FreeDraft,
    SelfDraftSpec,
    WeightQuantization,
    parse_draft,
    parse_early_exit,
    parse_quantize,
)
from skiptree.models.source import check_model_source
from skiptree.runtime.manifest import TreeProvenance
from skiptree.runtime.tree import TreeShape, parse_tree

BACKENDS = ("onnxruntime", "tvm")
OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
DEFAULT_MAX_SEQ_LEN = 2048  # attention runs over all S slots: a smaller S is a faster step


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "onnxruntime"
    max_seq_len: int | None = None  # None: min(model context, DEFAULT_MAX_SEQ_LEN)
    optimization_level: str = "extended"
    threads: int = 0  # runtime default for the artifact (0 = ORT decides)
    dump_ir: Path | None = None
    verify: bool = False
    check: bool = True  # run the lowered graph against eager torch before writing the manifest
    # The option languages: a string is parsed into its spec in __post_init__ (see compiler/specs.py).
    draft: DraftSpec | None = None  # None: plain; lookup+recycle+corpus:PATH; self:...; feature-head:W; model
    tree: TreeShape = "chain:4"  # chain:K, k-ary:WxD, k-ary:WxD+chain:K or a JSON file (runtime/tree.py)
    max_tree: int = 64  # largest tree (root included) the verify graph accepts
    max_batch: int = 1  # > 1: the verify graph takes that many requests' trees in one call (`skiptree serve`)
    prefill_chunk: int = 256  # prompt tokens a call of a plain artifact prefills (bench/results/README.md)
    dtype: str = "float32"  # "float64" for exact-arithmetic tests on tiny models
    draft_adapter: Path | None = None  # a trained exit adapter for --draft self:exit=E (skiptree tune)
    draft_vocab: int = 0  # > 0: the draft's head keeps only this many frequent tokens (ShrinkDraftVocab)
    early_exit: EarlyExitSpec | None = None  # "min-agreement=0.95[,exits=8+16][,gate=softmax]": lossy (CALM)
    calibration_prompts: tuple[str, ...] = ()  # for early exit; () = the tuner's built-in prompts
    tvm_database: Path | None = None  # a MetaSchedule database (a tune session's) for --backend tvm
    tvm_trials: int = 0  # > 0: MetaSchedule-tune into tvm_database first (a total; resumes count records)
    tvm_trials_per_task: int = 64
    tvm_tune_only: tuple[str, ...] = ()  # tune only tasks whose name contains one of these (() = all)
    tvm_static_tokens: tuple[int, ...] = ()  # token counts with a static (tunable) entry; () = 1 and the tree
    quantize: WeightQuantization | None = None  # int8 | int4[:block=32][,head=no][,accuracy=0] (MatMulNBits)
    draft_quantize: WeightQuantization | None = None  # the same for the draft's own graphs (int4 draft, ...)
    tree_provenance: TreeProvenance | None = None  # the tuning session that chose `tree` (compile --tuned)

    def __post_init__(self) -> None:
        parse = (("draft", parse_draft), ("tree", parse_tree), ("early_exit", parse_early_exit),
                 ("quantize", parse_quantize), ("draft_quantize", parse_quantize))  # fmt: skip
        for name, parser in parse:
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, parser(value))
        for name in ("dump_ir", "draft_adapter", "tvm_database"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, Path(getattr(self, name)))
        self._check()

    @property
    def free_draft(self) -> FreeDraft | None:
        if isinstance(self.draft, FeatureHeadDraft):
            return self.draft.free
        return self.draft if isinstance(self.draft, FreeDraft) else None

    @property
    def plain_decoding(self) -> bool:
        """An ONNX Runtime artifact without a drafter: a causal verify graph runs prefill and decode."""
        return self.backend == "onnxruntime" and not self.draft and not self.early_exit

    @property
    def verify_tokens(self) -> int:
        """The most tokens one verify call takes: the largest tree, or a plain artifact's prefill chunk."""
        tokens = self.prefill_chunk if self.plain_decoding else self.max_tree
        return min(tokens, self.max_seq_len) if self.max_seq_len else tokens

    def validate(self, context: int) -> CompileOptions:
        """Check against the model's context; returns the options with max_seq_len resolved."""
        max_seq_len = self.max_seq_len or min(context, DEFAULT_MAX_SEQ_LEN)
        if not 2 <= max_seq_len <= context:
            raise CompileOptionError(
                f"--max-seq-len {max_seq_len} is outside 2..{context} (the model's context)",
                f"pass a value from 2 to {context}",
            )
        resolved = copy.copy(self)  # already parsed and checked: do not rerun the checks (corpus I/O)
        object.__setattr__(resolved, "max_seq_len", max_seq_len)
        return resolved

    def _check(self) -> None:
        """Every check that needs no model: contradictions between options, files that must exist."""
        if self.prefill_chunk < 1:
            raise CompileOptionError(f"prefill_chunk {self.prefill_chunk} is not a token count",
                                     "pass 1 or more (prompt tokens a call prefills)")  # fmt: skip
        if self.backend not in BACKENDS:
            raise CompileOptionError(f"backend '{self.backend}' is not available",
                                     f"use one of: {', '.join(BACKENDS)}")  # fmt: skip
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise CompileOptionError(f"optimization level '{self.optimization_level}' is unknown",
                                     f"use one of: {', '.join(OPTIMIZATION_LEVELS)}")  # fmt: skip
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise CompileOptionError(f"--max-seq-len {self.max_seq_len} is below 2",
                                     "pass at least 2 (prompt + output tokens)")  # fmt: skip
        if self.max_batch < 1:
            raise CompileOptionError(f"--max-batch {self.max_batch} is not a request count",
                                     "pass 1 or more (requests one verify call serves)")  # fmt: skip
        if self.max_batch > 1 and (self.backend != "onnxruntime" or self.early_exit
                                   or isinstance(self.draft, SelfDraftSpec)):
            raise CompileOptionError("--max-batch > 1 needs --backend onnxruntime and no early exit or "
                                     "self-draft", "drop --max-batch, or those options")  # fmt: skip
        if self.backend == "tvm":
            self._check_tvm()
        elif self.tvm_database is not None or self.tvm_trials:
            raise CompileOptionError("--tvm-database / --tvm-trials apply to --backend tvm only",
                                     "add --backend tvm or drop them")  # fmt: skip
        if self.dtype not in ("float32", "float64"):
            raise CompileOptionError(f"dtype '{self.dtype}' is not supported", "use float32 or float64")
        if self.draft is not None:
            self._check_draft(self.draft)
        has_head = self.draft is not None and not isinstance(self.draft, FreeDraft)
        if self.draft_vocab and (not has_head or self.draft_vocab < 2):
            raise CompileOptionError(
                f"--draft-vocab {self.draft_vocab} needs a draft with an output head and a size >= 2",
                "use it with --draft self:... or a draft model")  # fmt: skip
        self._check_quantize(has_head)
        if self.early_exit is not None and self.draft is not None:
            raise CompileOptionError(
                "--early-exit and --draft together are not supported",
                "early exit is a (lossy) decoding mode of its own: drop one")  # fmt: skip

    def _check_draft(self, draft: DraftSpec) -> None:
        if self.tree.size + 1 > self.max_tree:
            raise CompileOptionError(f"tree {self.tree.spec} has more than max_tree - 1 = "
                                     f"{self.max_tree - 1} nodes", "use a smaller tree or raise max_tree")
        if self.free_draft is not None and self.free_draft.corpus is not None:
            self._check_corpus(self.free_draft.corpus)
        if isinstance(draft, SelfDraftSpec) and self.tree.size != self.tree.depth:
            raise CompileOptionError(f"self-drafts draft chains, not the tree {self.tree.spec}",
                                     "use --tree chain:K with a self-draft")  # fmt: skip
        if isinstance(draft, FeatureHeadDraft) and not draft.weights.is_file():
            raise CompileOptionError(f"--draft {draft}: no trained feature head at {draft.weights}",
                                     "train one with skiptree tune MODEL --train-draft feature-head "
                                     "--session DIR, then compile with --tuned DIR")  # fmt: skip
        if isinstance(draft, DraftModel):
            check_model_source(draft.source, option="--draft")

    def _check_quantize(self, has_head: bool) -> None:
        if self.backend == "tvm" and (self.quantize or self.draft_quantize):
            # tvm_int4 imports TVM (seconds): only a TVM compile that quantises pays for it
            from skiptree.compiler.lower.tvm_int4 import c_compiler, host_has_avx2
        for option, spec in (("--quantize", self.quantize), ("--draft-quantize", self.draft_quantize)):
            if spec is not None:
                if self.backend == "tvm" and spec != WeightQuantization(4, head=spec.head):
                    raise CompileOptionError(f"{option} {spec}: TVM lowers int4 (block 32, symmetric, int8 "
                                             "activations) only", f"use {option} int4 (head=no allowed), or "
                                             "--backend onnxruntime")  # fmt: skip
                if self.backend == "tvm" and not (host_has_avx2() and c_compiler()):
                    raise CompileOptionError(f"{option} on TVM needs an AVX2 + FMA CPU and a C compiler "
                                             "(the int4 kernel is compiled at lowering)",
                                             "use --backend onnxruntime")  # fmt: skip
                if self.dtype != "float32":
                    raise CompileOptionError(f"{option} needs float32 activations, not {self.dtype}",
                                             "compile with dtype float32")  # fmt: skip
        if self.draft_quantize is not None and not has_head:
            raise CompileOptionError(f"--draft-quantize {self.draft_quantize} needs a draft with weights",
                                     "use it with --draft self:..., feature-head:... or a draft model")

    def _check_corpus(self, path: Path) -> None:
        if not path.exists():
            raise CompileOptionError(f"--draft {self.draft}: no file or folder {path}",
                                     "give corpus:PATH a text file or a folder of them")  # fmt: skip
        check_corpus_size(path)

    def _check_tvm(self) -> None:
        """What the TVM lowering does not cover (yet): say so before any work is done."""
        if self.early_exit is not None:
            raise CompileOptionError("--early-exit is not lowered to TVM (its in-graph torch.cond)",
                                     "use --backend onnxruntime for early exit")  # fmt: skip
        if isinstance(self.draft, DraftModel):
            raise CompileOptionError(f"--draft {self.draft}: separate draft models are lowered to ONNX only",
                                     "use --backend onnxruntime, or a self-draft / prompt lookup with tvm")
        if self.tvm_trials and self.tvm_database is None:
            raise CompileOptionError("--tvm-trials needs a folder for the tuning database",
                                     "add --tvm-database DIR (created, or resumed)")  # fmt: skip
        if self.tvm_database is not None and not self.tvm_trials and not (
            Path(self.tvm_database) / "database_workload.json"
        ).is_file():
            raise CompileOptionError(f"{self.tvm_database} holds no MetaSchedule database",
                                     "run skiptree tune MODEL --backend tvm --session DIR first")  # fmt: skip
