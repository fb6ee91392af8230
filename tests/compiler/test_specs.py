"""The option languages parse once into typed specs; each spec prints back as text that parses to
itself, and CompileOptions holds specs, never strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from skiptree.compiler.options import CompileOptions
from skiptree.compiler.specs import (
    CompileOptionError,
    DraftModel,
    EarlyExitSpec,
    FeatureHeadDraft,
    FreeDraft,
    SelfDraftSpec,
    WeightQuantization,
    parse_draft,
    parse_early_exit,
    parse_quantize,
)
from skiptree.runtime.tree import TreeShape


@pytest.mark.parametrize("text", ["lookup", "recycle+lookup", "self:exit=3", "self:skip=1-2,5",
                                  "feature-head:head.safetensors", "models/draft"])  # fmt: skip
def test_draft_specs_round_trip(text):
    spec = parse_draft(text)
    assert parse_draft(str(spec)) == spec


def test_each_draft_kind_is_its_own_type():
    assert isinstance(parse_draft("lookup+recycle"), FreeDraft)
    assert isinstance(parse_draft("self:exit=2"), SelfDraftSpec)
    assert parse_draft("feature-head:h.safetensors") == FeatureHeadDraft(Path("h.safetensors"))
    assert parse_draft("smollm2-135m") == DraftModel("smollm2-135m")
    with pytest.raises(CompileOptionError, match="self:auto is a search, run by skiptree tune"):
        parse_draft("self:auto")


@pytest.mark.parametrize("text", ["min-agreement=0.9", "min-agreement=0.95,exits=2+4,gate=margin,vocab=64"])
def test_early_exit_specs_round_trip(text):
    spec = parse_early_exit(text)
    assert parse_early_exit(str(spec)) == spec


@pytest.mark.parametrize("text", ["int8", "int4:block=128,head=no,accuracy=0"])
def test_quantize_specs_round_trip(text):
    spec = parse_quantize(text)
    assert parse_quantize(str(spec)) == spec


def test_compile_options_hold_specs_not_strings():
    options = CompileOptions(draft="lookup+recycle", tree="k-ary:2x2", quantize="int4")
    assert options.draft == FreeDraft(("prompt-lookup", "recycle"))
    assert isinstance(options.tree, TreeShape) and options.tree.size == 6
    assert options.quantize == WeightQuantization(4)
    early = CompileOptions(early_exit="min-agreement=0.9")
    assert early.early_exit == EarlyExitSpec(0.9)
    again = CompileOptions(**options.__dict__)  # already-parsed specs pass through unchanged
    assert again == options


@pytest.mark.parametrize("options,message", [
    ({"draft": "lookup", "early_exit": "min-agreement=0.9"}, "--early-exit and --draft together"),
    ({"draft": "self:exit=1", "tree": "k-ary:2x2"}, "self-drafts draft chains, not the tree k-ary:2x2"),
    ({"draft": "lookup", "draft_vocab": 8}, "--draft-vocab 8 needs a draft with an output head"),
    ({"draft_quantize": "int4"}, "--draft-quantize int4 needs a draft with weights"),
    ({"draft": "corpus:/no/such/docs"}, "no file or folder /no/such/docs"),
    ({"backend": "tvm", "quantize": "int8"}, "--quantize int8: TVM lowers int4"),
    ({"max_batch": 0}, "--max-batch 0 is not a request count"),
    ({"backend": "tvm", "max_batch": 4}, "--max-batch > 1 needs --backend onnxruntime"),
    ({"draft": "self:exit=1", "tree": "chain:2", "max_batch": 4}, "no early exit or self-draft"),
])  # fmt: skip
def test_contradictions_are_refused_when_the_options_are_built(options, message):
    with pytest.raises(CompileOptionError, match=message):
        CompileOptions(**options)


def test_every_backend_option_has_a_lowering():
    from skiptree.compiler.compile import LOWERINGS
    from skiptree.compiler.options import BACKENDS

    assert tuple(LOWERINGS) == BACKENDS
