"""Feature-level draft heads (EAGLE): batched self-distillation equals one-by-one greedy decoding,
training moves acceptance up and resumes, a trained head with a shrunk vocabulary keeps speculative
decoding lossless for random trees and prompts, and `tune --train-draft feature-head` end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_LLAMA, write_tiny_model, write_word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skiptree
from skiptree.compiler.drafters.self_draft_search import target_continuations
from skiptree.compiler.options import CompileOptionError, CompileOptions
from skiptree.compiler.train.feature_head import FeatureTrainConfig, train_feature_head
from skiptree.compiler.train.feature_head import teacher_forced_features as features_of
from skiptree.compiler.train.self_distill import batched_greedy, docstring_prompts
from skiptree.compiler.tune.driver import tune, tuned_options
from skiptree.errors import SkiptreeError
from skiptree.models.exit_adapter import load_trained
from skiptree.models.feature_head import FeatureHead, load_feature_head
from skiptree.models.loader import load_model
from skiptree.models.reference import ReferenceStepper
from skiptree.runtime.generation import generate_tokens
from skiptree.runtime.sampling import SamplingConfig, sampling_probabilities
from skiptree.runtime.tree import TreeShape

LAYERS = {**TINY_LLAMA, "num_hidden_layers": 4}


def random_prompts(seed: int, count: int, low: int = 5, high: int = 6) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 97, rng.integers(low, high))] for _ in range(count)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float64 tiny Llama, its teacher-forced data and a trained head (300 steps, resumed at 150)."""
    root = tmp_path_factory.mktemp("feature-head")
    write_tiny_model(root / "model", transformers.LlamaConfig(**LAYERS))
    write_word_tokenizer(root / "model")
    model = load_model(root / "model", torch.float64)
    train = features_of(model, target_continuations(model, random_prompts(0, 400), 24).sequences)
    held = features_of(model, target_continuations(model, random_prompts(1, 16), 24).sequences)
    config = FeatureTrainConfig(vocab=tuple(range(97)), steps=300, batch=16, lr=3e-3, checkpoint_every=50)
    messages: list[str] = []
    first = train_feature_head(model, train, held, FeatureTrainConfig(**{**config.__dict__, "steps": 150}),
                               root / "head.safetensors", {"data": "test"}, messages.append)  # fmt: skip
    record = train_feature_head(model, train, held, config, root / "head.safetensors", {"data": "test"},
                                messages.append)  # fmt: skip
    return root, model, first, record, messages


def test_batched_greedy_equals_one_by_one(tiny):
    _, model, _, _, _ = tiny
    prompts = random_prompts(3, 5, 2, 9)  # ragged: rows are left-padded
    sequences = batched_greedy(model, prompts, 10, eos=[17])
    for prompt, (first, sequence) in zip(prompts, sequences, strict=True):
        expected = generate_tokens(ReferenceStepper(model), prompt, 10, eos_token_ids=[17]).token_ids
        assert first == len(prompt) and sequence == prompt + expected


def test_docstring_prompts_are_seeded_requests():
    prompts = docstring_prompts(30)
    assert len(prompts) == 30 and len(set(prompts)) == 30 and prompts == docstring_prompts(30)
    assert any(p.startswith("Write a Python function `") for p in prompts)
    everything = docstring_prompts(100_000)  # all there are: functions, then classes and methods
    assert everything[:30] == prompts and len(everything) > 2000  # a larger count extends a smaller one
    assert len(set(everything)) > 0.99 * len(everything)
    assert any(p.startswith("Write a Python class `") for p in everything)
    assert any(p.startswith("Write a Python method `") and "." in p.split("`")[1] for p in everything)


def test_training_improves_acceptance_and_resumes(tiny):
    root, _, first, record, messages = tiny
    assert first["step"] == 150 and record["step"] == 300
    assert messages == ["resuming feature-head training at step 150 of 300"]
    # measured on this model: 0.02 untrained -> 0.32 trained (held-out top-1 of the first draft)
    assert record["held_out_acceptance"] >= record["untrained_acceptance"] + 0.2
    _, stored = load_trained(root / "head.safetensors", "feature-head")
    assert stored["held_out_acceptance"] == record["held_out_acceptance"]
    assert stored["data"] == {"data": "test"}


@pytest.fixture(scope="module")
def feature_artifact(tiny):
    root = tiny[0]
    art = skiptree.compile(root / "model", root / "art", max_seq_len=64, dtype="float64", tree="k-ary:2x2",
                           draft=f"feature-head:{root / 'head.safetensors'}", draft_vocab=40, max_tree=40,
                           calibration_prompts=("t5 t9 t30", "t60 t2 t7"))  # fmt: skip
    return skiptree.load(art), skiptree.load(art, speculative=False)


def trees():
    return st.integers(1, 24).flatmap(
        lambda n: st.tuples(*[st.integers(-1, i - 1) for i in range(n)]).map(lambda p: TreeShape(tuple(p)))
    )


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=trees(), prompt=st.lists(st.integers(0, 96), min_size=1, max_size=8), new=st.integers(1, 20))
def test_feature_head_greedy_equals_autoregressive(feature_artifact, shape, prompt, new):
    speculative, plain = feature_artifact
    expected = plain.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids
    assert speculative.speculative.with_tree(shape).generate(prompt, new).token_ids == expected


def test_trained_head_is_accepted_and_reported(feature_artifact, tiny):
    speculative, _ = feature_artifact
    accepted = [speculative.speculative.generate(prompt, 30).mean_accepted for prompt in random_prompts(9, 8)]
    assert np.mean(accepted) > 1.3  # measured 1.57 tokens per step (an untrained head: ~1.0)
    manifest = speculative.manifest.speculative
    assert manifest.drafter == "feature-head" and manifest.draft_vocab.size == 40
    assert manifest.feature_head.training["step"] == 300


def test_sampled_tokens_keep_the_target_distribution(feature_artifact):
    """The token after the first (drafted by the head from its own q, then verified) follows the
    target's top-4 distribution: chi-square over 1500 seeded runs, conditioned on the first token."""
    speculative, plain = feature_artifact
    prompt, options = [5, 9, 30], dict(do_sample=True, top_k=4, temperature=1.0, eos_token_id=[])
    runs = [speculative.generate(prompt, max_new_tokens=2, seed=s, **options).token_ids for s in range(1500)]
    first = max(set(r[0] for r in runs), key=[r[0] for r in runs].count)
    seconds = [r[1] for r in runs if r[0] == first]
    p = sampling_probabilities(plain.step_model.prefill([*prompt, first]), SamplingConfig(True, 1.0, 4))
    support = np.flatnonzero(p)
    counts = np.array([seconds.count(int(t)) for t in support])
    assert counts.sum() == len(seconds) > 300  # nothing outside the target's top 4
    expected = p[support] * len(seconds)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, (counts, expected)  # 99.9% quantile of chi-square with 3 degrees of freedom


def test_bad_feature_heads_are_refused(tiny, tmp_path):
    root = tiny[0]
    with pytest.raises(CompileOptionError, match="no trained feature head"):
        CompileOptions(draft=f"feature-head:{tmp_path / 'missing.safetensors'}").validate(64)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SkiptreeError, match="cannot be read"):
        load_trained(tmp_path / "broken.safetensors", "feature-head")
    config = load_model(root / "model").config
    with pytest.raises(SkiptreeError, match="not a feature head for this model"):
        load_feature_head(root / "head.safetensors", replace(config, hidden_size=48))
    gpt2 = replace(config, family="gpt2", model_type="gpt2")
    with pytest.raises(SkiptreeError, match="built for the Llama family, not gpt2"):
        FeatureHead(gpt2)


def test_tune_train_feature_head_end_to_end(tiny, tmp_path):
    root = tiny[0]
    choice = tune(str(root / "model"), tmp_path / "session", prompts=["t5 t9 t30 t5 t9", "t60 t2 t7"],
                  max_seq_len=64, max_new_tokens=8, train_draft="feature-head", log=lambda m: None,
                  train_options={"draft_vocab": 50, "steps": 40, "distill_prompts": 8})  # fmt: skip
    assert choice["feature_head"]["step"] == 40 and choice["draft_vocab"] == 50
    assert choice["feature_head"]["data"]["target_answers"] == 8
    assert choice["mode"] in ("plain", "speculative") and choice["draft_level_ms"][1] > 0
    stored = json.loads((tmp_path / "session" / "choice.json").read_text())
    options = tuned_options(tmp_path / "session", CompileOptions())
    with pytest.raises(SkiptreeError, match="already holds a feature head trained with other settings"):
        tune(str(root / "model"), tmp_path / "session", prompts=["t5 t9 t30 t5 t9", "t60 t2 t7"],
             max_seq_len=64, max_new_tokens=8, train_draft="feature-head", log=lambda m: None,
             train_options={"draft_vocab": 50, "steps": 41, "distill_prompts": 8})  # fmt: skip
    if stored["mode"] == "speculative":
        weights = tmp_path / "session" / "feature_head.safetensors"
        assert str(options.draft) == f"feature-head:{weights}" and options.draft_vocab == 50
    else:
        assert options.draft is None
