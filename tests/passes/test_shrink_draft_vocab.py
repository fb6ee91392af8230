"""ShrinkDraftVocab: a draft head cut to the most frequent tokens never changes the output (the verifier
keeps the full head); drafts only ever propose kept tokens; a bad size is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_LLAMA, ops_by_block, ops_by_layer, run_pass, write_tiny_model, write_word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skiptree
from skiptree.compiler.drafters.vocab import frequent_tokens
from skiptree.compiler.ir.trace import trace_model
from skiptree.compiler.options import CompileOptionError
from skiptree.compiler.specs import parse_self_draft
from skiptree.models.loader import load_model
from skiptree.models.reference import ReferenceStepper
from skiptree.passes.shrink_draft_vocab import ShrinkDraftVocab
from skiptree.passes.skip_layers import SkipLayers
from skiptree.runtime.generation import generate_tokens
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.tree import chain

VOCAB = 24  # of 97


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    """(eager float64 model, self-draft and draft-model artifacts, each with a 24-token draft head)."""
    root = tmp_path_factory.mktemp("shrink")
    for name, seed in (("target", 0), ("draft", 5)):
        write_tiny_model(
            root / name, transformers.LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 3}), seed=seed
        )
        write_word_tokenizer(root / name)
    prompts = tuple(" ".join(f"t{t}" for t in np.random.default_rng(i).integers(3, 97, 5)) for i in range(4))
    common = dict(
        max_seq_len=48, dtype="float64", max_tree=16, draft_vocab=VOCAB, calibration_prompts=prompts
    )
    self_art = skiptree.compile(root / "target", root / "self", draft="self:exit=2", tree="chain:3", **common)
    pair_art = skiptree.compile(root / "target", root / "pair", draft=str(root / "draft"), tree="k-ary:2x2",
                                **common)  # fmt: skip
    model = load_model(root / "target", torch.float64)
    ids = [[int(word[1:]) for word in p.split()] for p in prompts]  # what the word tokenizer gives
    kept, _ = frequent_tokens(model, ids, VOCAB)  # as compile counts them
    return model, skiptree.load(self_art), skiptree.load(pair_art), set(kept)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.lists(st.integers(0, 96), min_size=1, max_size=8),
    new=st.integers(1, 20),
    depth=st.integers(1, 4),
)
def test_shrunk_draft_head_never_changes_the_output(shrunk, prompt, new, depth):
    model, self_draft, pair, _ = shrunk
    expected = generate_tokens(ReferenceStepper(model, max_seq_len=48), prompt, new).token_ids
    assert self_draft.speculative.with_tree(chain(depth)).generate(prompt, new).token_ids == expected
    assert pair.speculative.generate(prompt, new).token_ids == expected


def test_drafts_propose_only_kept_tokens(shrunk):
    _, self_draft, pair, kept = shrunk
    for runtime in (self_draft, pair):
        entry = runtime.manifest.speculative.draft_vocab
        assert entry.size == VOCAB and 0 < entry.calibration_coverage <= 1
    draft_passes = [(p.name, p.modified) for p in pair.manifest.speculative.draft_model.pipeline]
    assert draft_passes[0] == ("ShrinkDraftVocab", True)  # the draft model's graph, through the manager
    drafted = set()
    decoder = self_draft.speculative.with_tree(chain(4))
    for seed in range(6):
        prompt = [int(t) for t in np.random.default_rng(seed).integers(0, 97, 6)]
        decoder.step.prefill(prompt[:-1])
        drafted.update(decoder.drafter.propose(prompt, decoder.shape, SamplingConfig(), None).tokens)
        # sampling: the draft distribution is zero outside the kept tokens
        draft = decoder.drafter.propose(
            prompt, decoder.shape, SamplingConfig(do_sample=True), np.random.default_rng(0)
        )
        assert all(int((q > 0).sum()) <= VOCAB for q in draft.child_probs if q is not None)
    assert drafted and drafted <= kept


def test_bad_draft_vocab_is_refused(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    with pytest.raises(CompileOptionError, match="--draft-vocab 8 needs a draft with an output head"):
        skiptree.compile(folder, tmp_path / "art", draft="prompt-lookup", draft_vocab=8)


def head_products(ir, graph: str) -> list[int]:
    """The output widths of the matrix products in `graph`'s head block."""
    return [int(node.meta["val"].shape[-1]) for node in ir.graphs[graph].graph.nodes
            if node.op == "call_function" and node.meta["block"] == "head"
            and node.target == torch.ops.aten.linear.default]  # fmt: skip


def test_structure_draft_head_computes_exactly_the_kept_rows(tmp_path):
    """ShrinkDraftVocab re-exports "self_draft" with one head product of width len(vocab) (was the
    full 97) and the same layers, inputs and outputs (logits stay full width); "step" is untouched."""
    write_tiny_model(tmp_path, transformers.LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 3}))
    ir = trace_model(load_model(tmp_path), max_seq_len=16)
    assert not run_pass(ShrinkDraftVocab((5, 6)), ir).modified  # no self_draft graph yet
    ir = run_pass(SkipLayers(parse_self_draft("self:exit=2")), ir).ir
    step_ops, draft_layers = ops_by_block(ir, "step"), ops_by_layer(ir, "self_draft")
    signature = ir.graphs["self_draft"].signature_json()
    assert head_products(ir, "self_draft") == [97]
    vocab = (5, 17, 40, 2, 96, 11)

    result = run_pass(ShrinkDraftVocab(vocab), ir)

    assert result.modified and set(result.ir.graphs) == {"step", "self_draft"}
    assert head_products(result.ir, "self_draft") == [len(vocab)]
    program = result.ir.graphs["self_draft"].program
    assert tuple(program.state_dict["small_head.rows.weight"].shape) == (len(vocab), 32)
    assert ops_by_layer(result.ir, "self_draft") == draft_layers
    assert ops_by_block(result.ir, "step") == step_ops
    assert result.ir.graphs["self_draft"].signature_json() == signature  # logits [1, T, 97] still
