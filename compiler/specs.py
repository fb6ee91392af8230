"""Typed specs: the option languages of `skiptree compile`, parsed once, at the edge.

`--draft`, `--early-exit`, `--quantize` / `--draft-quantize` (and `--tree`, parsed by
`skiptree.runtime.tree.parse_tree` because the runtime reads tree files too) are strings on the
command line and in `skiptree.compile(**options)`. `CompileOptions` turns each into one of the
values below when it is built; everything downstream reads their fields and never parses a string
again. A malformed option is refused here, in one line, before any work is done.

  DraftSpec       FreeDraft (lookup, recycle, corpus:PATH, '+'-combined) | SelfDraftSpec
                  (self:exit=E, self:skip=4-9,15) | FeatureHeadDraft (feature-head:WEIGHTS, and
                  +lookup+recycle... for free drafters in the same tree)
                  | DraftModel (a zoo name, HF folder or .gguf file with the target's tokenizer)
  EarlyExitSpec   min-agreement=0.95[,exits=8+16][,gate=softmax][,vocab=8192] (lossy, CALM)
  WeightQuantization  int8 | int4[:block=32][,head=no][,accuracy=0] (MatMulNBits)
Each spec's `str()` is its canonical option text (what the manifest and the logs show).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skiptree.errors import SkiptreeError
from skiptree.runtime.merged_draft import TABLE_SOURCES

# --- --draft -------------------------------------------------------------------------------------

SELF_PREFIX = "self:"
FEATURE_PREFIX = "feature-head:"
SOURCE_ALIASES = {"lookup": "prompt-lookup"}


class CompileOptionError(SkiptreeError):
    """A compile option that cannot be honoured."""


class DraftSpecError(CompileOptionError):
    """A --draft value that names no drafter."""


class SelfDraftError(DraftSpecError):
    """A self-draft spec that names no usable layer set."""


@dataclass(frozen=True)
class FreeDraft:
    """Drafters that need no weights: prompt lookup, Token Recycling, a corpus, or several merged.
    `sources` are canonical names in the order given ("prompt-lookup", "recycle", "corpus");
    `corpus` is the corpus:PATH path when "corpus" is one of them."""

    sources: tuple[str, ...]
    corpus: Path | None = None

    def __str__(self) -> str:
        return "+".join(f"corpus:{self.corpus}" if name == "corpus" else name for name in self.sources)


@dataclass(frozen=True)
class SelfDraftSpec:
    """Which of the target's layers a self-draft runs: `kind` "exit" (layers 0..exit-1) or "skip"."""

    kind: str
    exit_layer: int = 0  # kind "exit"
    skipped: tuple[int, ...] = ()  # kind "skip"

    def kept(self, num_layers: int) -> list[int]:
        if self.kind == "exit":
            return list(range(self.exit_layer))
        return [i for i in range(num_layers) if i not in self.skipped]

    def __str__(self) -> str:
        if self.kind == "exit":
            return f"self:exit={self.exit_layer}"
        return f"self:skip={format_layers(self.skipped)}"

    def check(self, num_layers: int) -> SelfDraftSpec:
        """Refuse layer sets that do not fit a model with `num_layers` layers."""
        if self.kind == "exit" and not 1 <= self.exit_layer < num_layers:
            raise SelfDraftError(f"self:exit={self.exit_layer} is outside 1..{num_layers - 1} "
                                 f"(the model has {num_layers} layers)",
                                 "pick an exit layer in that range")  # fmt: skip
        bad = [i for i in self.skipped if not 0 <= i < num_layers]
        if bad or (self.kind == "skip" and len(self.skipped) >= num_layers):
            raise SelfDraftError(f"self:skip={format_layers(self.skipped)} does not fit {num_layers} layers",
                                 f"skip some, not all, of the layers 0..{num_layers - 1}")  # fmt: skip
        return self


@dataclass(frozen=True)
class FeatureHeadDraft:
    """A trained feature-level draft head (EAGLE), from `skiptree tune --train-draft feature-head`."""

    weights: Path
    free: FreeDraft | None = None  # free drafters proposing in the same tree (feature-head:W+lookup+recycle)

    def __str__(self) -> str:
        return f"{FEATURE_PREFIX}{self.weights}" + (f"+{self.free}" if self.free else "")


@dataclass(frozen=True)
class DraftModel:
    """A separate draft model compiled next to the target (same tokenizer, checked at compile)."""

    source: str

    def __str__(self) -> str:
        return self.source


DraftSpec = FreeDraft | SelfDraftSpec | FeatureHeadDraft | DraftModel


def format_layers(layers: tuple[int, ...]) -> str:
    """(4, 5, 6, 9) -> "4-6,9"."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def parse_self_draft(text: str) -> SelfDraftSpec:
    """ "self:exit=8" or "self:skip=4-9,15" -> SelfDraftSpec (layer ranges inclusive)."""
    usage = "write --draft self:exit=E or self:skip=4-9,15 (layer indices, inclusive ranges) or self:auto"
    body = text.removeprefix(SELF_PREFIX)
    kind, _, value = body.partition("=")
    try:
        if kind == "exit":
            return SelfDraftSpec("exit", exit_layer=int(value))
        if kind == "skip":
            layers: set[int] = set()
            for part in value.split(","):
                low, _, high = part.partition("-")
                layers.update(range(int(low), int(high or low) + 1))
            if layers:
                return SelfDraftSpec("skip", skipped=tuple(sorted(layers)))
    except ValueError:
        pass
    raise SelfDraftError(f"cannot read the self-draft '{text}'", usage)


def parse_free_draft(text: str) -> FreeDraft | None:
    """"lookup+recycle+corpus:docs/" -> FreeDraft; None when no part names a free source (then
    the text names another kind of drafter). A path after corpus: holds no '+'."""
    parts = [SOURCE_ALIASES.get(part, part) for part in text.split("+")]
    known = [part.startswith("corpus:") or part in TABLE_SOURCES and part != "corpus" for part in parts]
    if not any(known):
        if "+" in text:
            raise DraftSpecError(f"--draft {text}: '+' combines free drafters, and none is named here",
                                 "combine lookup, recycle and corpus:PATH with '+' (a path holds no '+')")
        return None
    if not all(known):
        unknown = next(part for part, ok in zip(parts, known, strict=True) if not ok)
        raise DraftSpecError(f"--draft {text}: '{unknown}' is not a free drafter",
                             "combine lookup, recycle and corpus:PATH with '+' (a path holds no '+')")
    names = tuple(part.split(":")[0] for part in parts)
    if len(set(names)) != len(names):
        raise DraftSpecError(f"--draft {text} names a source twice", "name each source once")
    corpus = next((Path(part.removeprefix("corpus:")) for part in parts if part.startswith("corpus:")), None)
    if corpus is not None and not str(corpus).strip():
        raise DraftSpecError(f"--draft {text}: corpus: names no path", "write corpus:PATH (a file or folder)")
    return FreeDraft(names, corpus)


def parse_draft(text: str) -> DraftSpec:
    """Any --draft value -> its DraftSpec. `self:auto` is a search (skiptree tune), not a drafter."""
    text = text.strip()
    if not text:
        raise DraftSpecError("--draft is empty", "name a drafter, e.g. --draft lookup+recycle")
    if text == "self:auto":
        raise DraftSpecError("--draft self:auto is a search, run by skiptree tune",
                             "run skiptree tune MODEL --draft self:auto --session DIR, "
                             "then skiptree compile MODEL --tuned DIR")  # fmt: skip
    if text.startswith(SELF_PREFIX):
        return parse_self_draft(text)
    if text.startswith(FEATURE_PREFIX):
        weights, plus, others = text.removeprefix(FEATURE_PREFIX).partition("+")
        if not weights:
            raise DraftSpecError("--draft feature-head: names no weights file",
                                 "write --draft feature-head:PATH (from skiptree tune --train-draft "
                                 "feature-head)")  # fmt: skip
        free = parse_free_draft(others) if plus else None
        if plus and free is None:
            raise DraftSpecError(f"--draft {text}: '+' after the head's weights names no free drafter",
                                 "write feature-head:PATH+lookup+recycle (a path holds no '+')")
        return FeatureHeadDraft(Path(weights), free)
    free = parse_free_draft(text)
    if free is not None:
        return free
    return DraftModel(text)


# --- --early-exit --------------------------------------------------------------------------------

GATES = ("softmax", "margin", "cosine")


class EarlyExitError(CompileOptionError):
    """An --early-exit option that cannot be honoured."""


@dataclass(frozen=True)
class EarlyExitSpec:
    """`--early-exit min-agreement=0.95[,exits=8+16][,gate=softmax][,vocab=8192]` (exits default:
    L/4, L/2, 3L/4; vocab: exit heads keep only the target's most frequent tokens, 0 = all)."""

    min_agreement: float
    exits: tuple[int, ...] = ()
    gate: str = "softmax"
    vocab: int = 0

    def resolved(self, num_layers: int) -> EarlyExitSpec:
        """With default exits filled in; refuses exits that are not strictly inside the model."""
        exits = self.exits or tuple(sorted({max(1, num_layers * q // 4) for q in (1, 2, 3)}))
        if any(not 1 <= e < num_layers for e in exits) or list(exits) != sorted(set(exits)):
            raise EarlyExitError(f"exits {'+'.join(map(str, exits))} are not increasing layers in "
                                 f"1..{num_layers - 1}", "write e.g. exits=8+16 (the model has "
                                 f"{num_layers} layers)")  # fmt: skip
        return EarlyExitSpec(self.min_agreement, exits, self.gate, self.vocab)

    def __str__(self) -> str:
        parts = [f"min-agreement={self.min_agreement:g}"]
        if self.exits:
            parts.append("exits=" + "+".join(map(str, self.exits)))
        parts.append(f"gate={self.gate}")
        if self.vocab:
            parts.append(f"vocab={self.vocab}")
        return ",".join(parts)


def parse_early_exit(text: str) -> EarlyExitSpec:
    usage = "write --early-exit min-agreement=0.95[,exits=8+16][,gate=softmax|margin|cosine][,vocab=8192]"
    fields = dict(part.partition("=")[::2] for part in text.split(",") if part)
    unknown = set(fields) - {"min-agreement", "exits", "gate", "vocab"}
    try:
        agreement = float(fields["min-agreement"])
        exits = tuple(int(e) for e in fields["exits"].split("+")) if "exits" in fields else ()
        vocab = int(fields.get("vocab", 0))
    except (KeyError, ValueError):
        raise EarlyExitError(f"cannot read --early-exit '{text}'", usage) from None
    gate = fields.get("gate", "softmax")
    if unknown or gate not in GATES or not 0.0 < agreement <= 1.0 or vocab < 0:
        raise EarlyExitError(f"cannot read --early-exit '{text}' (min-agreement is in (0, 1], gate one of "
                             f"{', '.join(GATES)})", usage)  # fmt: skip
    return EarlyExitSpec(agreement, exits, gate, vocab)


# --- --quantize ----------------------------------------------------------------------------------

QUANTIZE_USAGE = "write --quantize int8 or int4, optionally int4:block=32,sym=no,grid=yes,head=no,accuracy=0"


class QuantizeError(CompileOptionError):
    """A --quantize option that cannot be honoured."""


@dataclass(frozen=True)
class WeightQuantization:
    """`bits` 4 or 8; `block_size` inputs per scale (a power of two >= 16); `symmetric`: no zero
    points (MLAS's faster kernel, bench/results/matmulnbits_formats.md); `head`: quantise the
    output head too; `accuracy_level`: MatMulNBits' compute type (0 float32, 4 int8); `grid`: keep a
    GGUF source's own grid where it maps (block 32: slower, closer to the source) instead of
    re-quantising its dequantised weights (bench/results/quantized_formats_1t.md)."""

    bits: int
    block_size: int = 32
    head: bool = True
    accuracy_level: int = 4
    symmetric: bool = True
    grid: bool = False

    @property
    def label(self) -> str:
        head = "" if self.head else ", float head"
        zero_points = "symmetric" if self.symmetric else "zero points"
        return f"int{self.bits} weights (block {self.block_size}, {zero_points}{head})"

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "block_size": self.block_size, "head": self.head,
                "accuracy_level": self.accuracy_level, "symmetric": self.symmetric,
                "grid": self.grid}  # fmt: skip

    def __str__(self) -> str:
        """The shortest text that parses back to this spec (defaults left out)."""
        default = WeightQuantization(self.bits)
        parts = [f"{key}={value}" for key, value, differs in (
            ("block", self.block_size, self.block_size != default.block_size),
            ("sym", "yes" if self.symmetric else "no", self.symmetric != default.symmetric),
            ("grid", "yes", self.grid),
            ("head", "no", not self.head),
            ("accuracy", self.accuracy_level, self.accuracy_level != default.accuracy_level)) if differs]
        return f"int{self.bits}" + (":" + ",".join(parts) if parts else "")


def parse_quantize(text: str) -> WeightQuantization:
    """`int8`, `int4`, `int4:block=64,sym=no`, `int8:head=no,accuracy=0` -> WeightQuantization."""
    kind, _, rest = text.partition(":")
    if kind not in ("int8", "int4"):
        raise QuantizeError(f"--quantize {text!r}: unknown precision {kind!r}", QUANTIZE_USAGE)
    fields: dict[str, Any] = {"bits": int(kind[3:])}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key == "block" and re.fullmatch(r"\d+", value):
            fields["block_size"] = int(value)
        elif key == "head" and value in ("yes", "no"):
            fields["head"] = value == "yes"
        elif key in ("sym", "grid") and value in ("yes", "no"):
            fields["symmetric" if key == "sym" else "grid"] = value == "yes"
        elif key == "accuracy" and value in ("0", "4"):
            fields["accuracy_level"] = int(value)
        else:
            raise QuantizeError(f"--quantize {text!r}: cannot read {item!r}", QUANTIZE_USAGE)
    spec = WeightQuantization(**fields)
    block = spec.block_size
    if block < 16 or block & (block - 1):
        raise QuantizeError(f"--quantize {text!r}: block {block} is not a power of two >= 16",
                            "use block=16, 32, 64, 128 or 256")  # fmt: skip
    return spec
