"""`CompileOptions`: everything `skiptree compile` takes, as one frozen dataclass.

CLI flags and `skiptree.compile(**options)` both build this; it is checked once (`validate`)
and then only read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from skiptree.errors import SkiptreeError
from skiptree.runtime.merged_draft import TABLE_SOURCES

BACKENDS = ("onnxruntime", "tvm")
OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
DEFAULT_MAX_SEQ_LEN = 2048  # attention runs over all S slots: a smaller S is a faster step


SOURCE_ALIASES = {"lookup": "prompt-lookup"}


def table_sources(draft: str | None) -> list[str] | None:
    """The free sources of a --draft value, canonical ("lookup+corpus:docs/" -> ["prompt-lookup",
    "corpus:docs/"]); None when it names another kind of drafter (a model, self:..., feature-head:...)."""
    if draft is None:
        return None
    parts = [SOURCE_ALIASES.get(part, part) for part in draft.split("+")]
    known = [part.startswith("corpus:") or part in TABLE_SOURCES and part != "corpus" for part in parts]
    if not any(known):
        return None
    if not all(known):
        unknown = next(part for part, ok in zip(parts, known, strict=True) if not ok)
        raise CompileOptionError(f"--draft {draft}: '{unknown}' is not a free drafter",
                                 "combine lookup, recycle and corpus:PATH with '+' (a path holds no '+')")
    kinds = [part.split(":")[0] for part in parts]
    if len(set(kinds)) != len(kinds):
        raise CompileOptionError(f"--draft {draft} names a source twice", "name each source once")
    return parts


def is_table_draft(draft: str | None) -> bool:
    return table_sources(draft) is not None


class CompileOptionError(SkiptreeError):
    """A compile option that cannot be honoured."""


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "onnxruntime"
    max_seq_len: int | None = None  # None: min(model context, DEFAULT_MAX_SEQ_LEN)
    optimization_level: str = "extended"
    threads: int = 0  # runtime default for the artifact (0 = ORT decides)
    dump_ir: Path | None = None
    verify: bool = False
    check: bool = True  # run the lowered graph against eager torch before writing the manifest
    draft: str | None = None  # None: plain; lookup+recycle+corpus:PATH (any); self:...; feature-head:W; model
    tree: str = "chain:4"  # chain:K, k-ary:WxD, k-ary:WxD+chain:K or a JSON file (see runtime/tree.py)
    max_tree: int = 64  # largest tree (root included) the verify graph accepts
    dtype: str = "float32"  # "float64" for exact-arithmetic tests on tiny models
    draft_adapter: Path | None = None  # a trained exit adapter for --draft self:exit=E (skiptree tune)
    draft_vocab: int = 0  # > 0: the draft's head keeps only this many frequent tokens (ShrinkDraftVocab)
    early_exit: str | None = None  # "min-agreement=0.95[,exits=8+16][,gate=softmax]": lossy (CALM)
    calibration_prompts: tuple[str, ...] = ()  # for early exit; () = the tuner's built-in prompts
    tvm_database: Path | None = None  # a MetaSchedule database (a tune session's) for --backend tvm
    tvm_trials: int = 0  # > 0: MetaSchedule-tune into tvm_database first (a total; resumes count records)
    tvm_trials_per_task: int = 64
    tvm_tune_only: tuple[str, ...] = ()  # tune only tasks whose name contains one of these (() = all)
    tvm_static_tokens: tuple[int, ...] = ()  # token counts with a static (tunable) entry; () = 1 and the tree
    quantize: str | None = None  # int8 | int4[:block=32][,head=no][,accuracy=0]: weight-only (MatMulNBits)
    draft_quantize: str | None = None  # the same for the draft's own graphs (e.g. int4 draft, int8 target)

    def validate(self, context: int) -> CompileOptions:
        """Check against the model's context; returns the options with max_seq_len resolved."""
        if self.backend not in BACKENDS:
            raise CompileOptionError(f"backend '{self.backend}' is not available",
                                     f"use one of: {', '.join(BACKENDS)}")  # fmt: skip
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise CompileOptionError(f"optimization level '{self.optimization_level}' is unknown",
                                     f"use one of: {', '.join(OPTIMIZATION_LEVELS)}")  # fmt: skip
        if self.backend == "tvm":
            self._check_tvm()
        elif self.tvm_database is not None or self.tvm_trials:
            raise CompileOptionError("--tvm-database / --tvm-trials apply to --backend tvm only",
                                     "add --backend tvm or drop them")  # fmt: skip
        if self.dtype not in ("float32", "float64"):
            raise CompileOptionError(f"dtype '{self.dtype}' is not supported", "use float32 or float64")
        if self.draft is not None:
            from skiptree.runtime.tree import parse_tree

            shape = parse_tree(self.tree)
            if shape.size + 1 > self.max_tree:
                raise CompileOptionError(f"tree {self.tree} has more than max_tree - 1 = {self.max_tree - 1} "
                                         "nodes", "use a smaller tree or raise max_tree")  # fmt: skip
            for source in table_sources(self.draft) or ():
                if source.startswith("corpus:"):
                    self._check_corpus(Path(source.removeprefix("corpus:")))
            if self.draft.startswith("self:"):
                from skiptree.passes.skip_layers import parse_self_draft
                if self.draft == "self:auto":
                    raise CompileOptionError("--draft self:auto is a search, run by skiptree tune",
                                             "run skiptree tune MODEL --draft self:auto --session DIR, "
                                             "then skiptree compile MODEL --tuned DIR")  # fmt: skip
                parse_self_draft(self.draft)
                if shape.size != shape.depth:
                    raise CompileOptionError(f"self-drafts draft chains, not the tree {self.tree}",
                                             "use --tree chain:K with a self-draft")  # fmt: skip
            if self.draft.startswith("feature-head:"):
                weights = Path(self.draft.removeprefix("feature-head:"))
                if not weights.is_file():
                    raise CompileOptionError(f"--draft {self.draft}: no trained feature head at {weights}",
                                             "train one with skiptree tune MODEL --train-draft feature-head "
                                             "--session DIR, then compile with --tuned DIR")  # fmt: skip
        if self.draft_vocab and (self.draft is None or is_table_draft(self.draft) or self.draft_vocab < 2):
            raise CompileOptionError(
                f"--draft-vocab {self.draft_vocab} needs a draft with an output head and a size >= 2",
                "use it with --draft self:... or a draft model")  # fmt: skip
        self._check_quantize()
        if self.early_exit is not None:
            from skiptree.passes.insert_early_exit import parse_early_exit
            parse_early_exit(self.early_exit)
            if self.draft is not None:
                raise CompileOptionError(
                    "--early-exit and --draft together are not supported",
                    "early exit is a (lossy) decoding mode of its own: drop one")  # fmt: skip
        max_seq_len = self.max_seq_len or min(context, DEFAULT_MAX_SEQ_LEN)
        if not 2 <= max_seq_len <= context:
            raise CompileOptionError(
                f"--max-seq-len {max_seq_len} is outside 2..{context} (the model's context)",
                f"pass a value from 2 to {context}",
            )
        return CompileOptions(**{**self.__dict__, "max_seq_len": max_seq_len})

    def _check_quantize(self) -> None:
        from skiptree.compiler.lower.quantize import parse_quantize

        for option, text in (("--quantize", self.quantize), ("--draft-quantize", self.draft_quantize)):
            if text is not None:
                parse_quantize(text)
                if self.backend != "onnxruntime":
                    raise CompileOptionError(f"{option} is lowered to ONNX Runtime only (MatMulNBits)",
                                             "use --backend onnxruntime, or drop the option")  # fmt: skip
                if self.dtype != "float32":
                    raise CompileOptionError(f"{option} needs float32 activations, not {self.dtype}",
                                             "compile with dtype float32")  # fmt: skip
        if self.draft_quantize is not None and (self.draft is None or is_table_draft(self.draft)):
            raise CompileOptionError(f"--draft-quantize {self.draft_quantize} needs a draft with weights",
                                     "use it with --draft self:..., feature-head:... or a draft model")

    def _check_corpus(self, path: Path) -> None:
        from skiptree.compiler.drafters.corpus import check_corpus_size

        if not path.exists():
            raise CompileOptionError(f"--draft {self.draft}: no file or folder {path}",
                                     "give corpus:PATH a text file or a folder of them")  # fmt: skip
        check_corpus_size(path)

    def _check_tvm(self) -> None:
        """What the TVM lowering does not cover (yet): say so before any work is done."""
        if self.early_exit is not None:
            raise CompileOptionError("--early-exit is not lowered to TVM (its in-graph torch.cond)",
                                     "use --backend onnxruntime for early exit")  # fmt: skip
        free = is_table_draft(self.draft) or (self.draft or "").startswith(("self:", "feature-head:"))
        if self.draft is not None and not free:
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
