"""One tree for all drafters: a trained feature head's candidates merged with prompt lookup's and
recycling's (`--draft feature-head:W+lookup+recycle`) keep greedy decoding exact for random trees
and prompts, the head's nodes are proposed and accepted, and the artifact records both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_LLAMA, random_trees, write_tiny_model, write_word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skiptree
from skiptree.compiler.drafters.self_draft_search import target_continuations
from skiptree.compiler.specs import DraftSpecError, FeatureHeadDraft, FreeDraft, parse_draft
from skiptree.compiler.train.feature_head import FeatureTrainConfig, train_feature_head
from skiptree.compiler.train.feature_head import teacher_forced_features as features_of
from skiptree.models.loader import load_model


def random_prompts(seed: int, count: int, low: int = 5, high: int = 9) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 97, rng.integers(low, high))] for _ in range(count)]


@pytest.fixture(scope="module")
def merged_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("head-source")
    write_tiny_model(root / "model", transformers.LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 4}))
    write_word_tokenizer(root / "model")
    model = load_model(root / "model", torch.float64)
    train = features_of(model, target_continuations(model, random_prompts(0, 200), 24).sequences)
    held = features_of(model, target_continuations(model, random_prompts(1, 8), 24).sequences)
    config = FeatureTrainConfig(vocab=tuple(range(97)), steps=150, batch=16, lr=3e-3, checkpoint_every=150)
    head = root / "head.safetensors"
    train_feature_head(model, train, held, config, head, {"data": "test"}, lambda m: None)
    art = skiptree.compile(root / "model", root / "art", max_seq_len=64, dtype="float64", tree="k-ary:2x3",
                           draft=f"feature-head:{head}+lookup+recycle", max_tree=40,
                           calibration_prompts=("t5 t9 t30", "t60 t2 t7"))  # fmt: skip
    return skiptree.load(art), skiptree.load(art, speculative=False)


def test_the_spec_names_the_head_and_the_free_drafters():
    spec = parse_draft("feature-head:/w/head.safetensors+lookup+recycle")
    assert spec == FeatureHeadDraft(Path("/w/head.safetensors"), FreeDraft(("prompt-lookup", "recycle")))
    assert str(spec) == "feature-head:/w/head.safetensors+prompt-lookup+recycle"
    with pytest.raises(DraftSpecError, match="after the head's weights names no free drafter"):
        parse_draft("feature-head:/w/head.safetensors+self")
    with pytest.raises(DraftSpecError, match="'self' is not a free drafter"):
        parse_draft("feature-head:/w/head.safetensors+lookup+self")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=random_trees(20), prompt=st.lists(st.integers(0, 96), min_size=1, max_size=10),
       new=st.integers(1, 24))
def test_merged_greedy_equals_autoregressive(merged_artifact, shape, prompt, new):
    speculative, plain = merged_artifact
    expected = plain.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids
    assert speculative.speculative.with_tree(shape).generate(prompt, new).token_ids == expected


def test_the_head_proposes_in_the_merged_tree(merged_artifact):
    speculative, plain = merged_artifact
    spec = speculative.manifest.speculative
    assert spec.drafter == "feature-head+prompt-lookup+recycle" and spec.feature_head is not None
    assert spec.verify_cost is not None  # the per-step gate judges the head's nodes too
    drafter = speculative.speculative.drafter
    assert [source.name for source in drafter.sources] == ["prompt-lookup", "recycle", "feature-head"]
    counts: dict[str, int] = {}
    for prompt in random_prompts(5, 6):
        result = speculative.speculative.generate(prompt, 24)
        assert result.token_ids == plain.generate(prompt, max_new_tokens=24, eos_token_id=[]).token_ids
        for name, tokens in result.tokens_by_source.items():
            counts[name] = counts.get(name, 0) + tokens
    assert counts.get("feature-head", 0) > 0, counts
