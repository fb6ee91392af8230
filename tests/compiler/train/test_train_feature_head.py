"""Feature-level draft heads (EAGLE-3): batched self-distillation equals one-by-one greedy decoding,
training moves acceptance up at depths 1 to 3, resumes (also after a time limit) taking the steps an
unbroken run takes, drafts its levels as the tree does, a trained head with a shrunk vocabulary keeps
speculative decoding lossless for random trees and prompts (the artifact's features are the fused
streams; an EAGLE-1 head still compiles), and `tune --train-draft feature-head` end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_LLAMA, random_trees, write_tiny_model, write_word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skiptree
from skiptree.compiler.drafters.self_draft_search import run_layers, target_continuations
from skiptree.compiler.options import CompileOptionError, CompileOptions
from skiptree.compiler.train.feature_head import (
    FeatureData,
    FeatureTrainConfig,
    draft_levels,
    train_feature_head,
)
from skiptree.compiler.train.feature_head import teacher_forced_features as features_of
from skiptree.compiler.train.self_distill import batched_greedy, docstring_prompts
from skiptree.compiler.tune.driver import tune, tuned_options
from skiptree.errors import SkiptreeError
from skiptree.models.exit_adapter import load_trained, save_trained
from skiptree.models.feature_head import KIND, FeatureHead, load_feature_head
from skiptree.models.loader import load_model
from skiptree.models.reference import ReferenceStepper, causal_bias
from skiptree.runtime.generation import generate_tokens
from skiptree.runtime.sampling import SamplingConfig, sampling_probabilities

LAYERS = {**TINY_LLAMA, "num_hidden_layers": 4}


def random_prompts(seed: int, count: int, low: int = 5, high: int = 6) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 97, rng.integers(low, high))] for _ in range(count)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float64 tiny Llama, its teacher-forced data and a trained head (300 steps, resumed at 150,
    stopped by `max_seconds` at its next checkpoint, 200, and resumed again)."""
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
    chunk = train_feature_head(model, train, held, replace(config, max_seconds=1e-9),
                               root / "head.safetensors", {"data": "test"}, messages.append)  # fmt: skip
    assert chunk["step"] == 200 and chunk["finished"] is False and "held_out_acceptance" not in chunk
    record = train_feature_head(model, train, held, config, root / "head.safetensors", {"data": "test"},
                                messages.append)  # fmt: skip
    return root, model, first, record, messages, train, held


def test_batched_greedy_equals_one_by_one(tiny):
    model = tiny[1]
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
    root, _, first, record, messages = tiny[:5]
    assert first["step"] == 150 and record["step"] == 300 and record["finished"] is True
    assert messages == ["resuming feature-head training at step 150 of 300",
                        "feature-head training stopped at step 200 of 300 after 0 s: run again to resume",
                        "resuming feature-head training at step 200 of 300"]  # fmt: skip
    # measured on this model: 0.03 untrained -> 0.33 trained (held-out top-1 of the first draft),
    # 0.29 and 0.28 at depths 2 and 3 (drafting from its own features)
    depths = record["held_out_acceptance_by_depth"]
    assert len(depths) == 3 and depths[0] == record["held_out_acceptance"]
    assert min(depths) >= record["untrained_acceptance"] + 0.2
    assert record["feature_layers"] == [1, 2, 4] and record["unroll"] == 2
    _, stored = load_trained(root / "head.safetensors", "feature-head")
    assert stored["held_out_acceptance"] == record["held_out_acceptance"]
    assert stored["data"] == {"data": "test"}


def test_resumed_training_takes_the_unbroken_steps(tiny, tmp_path):
    """Checkpoints keep the optimizer's moments: 2 + 2 steps give the weights 4 unbroken steps give."""
    model, train, held = tiny[1], tiny[5], tiny[6]
    few, held = (FeatureData(data.tokens[:n], data.features[:n], data.labels[:n], data.first[:n], data.layers)
                 for data, n in ((train, 32), (held, 2)))  # fmt: skip
    config = FeatureTrainConfig(vocab=tuple(range(97)), steps=4, batch=4, lr=3e-3, checkpoint_every=2)
    train_feature_head(model, few, held, config, tmp_path / "a.safetensors", {}, lambda m: None)
    for steps in (2, 4):
        train_feature_head(model, few, held, replace(config, steps=steps), tmp_path / "b.safetensors", {},
                           lambda m: None)  # fmt: skip
    unbroken, resumed = (load_trained(tmp_path / f"{run}.safetensors", "feature-head")[0] for run in "ab")
    assert unbroken.keys() == resumed.keys() and all(torch.equal(unbroken[k], resumed[k]) for k in unbroken)


def test_draft_levels_are_the_trees_drafts(tiny):
    """Level l of root i in training and evaluation is what drafting a chain below root i computes: the
    pairs up to the root caught up in one call, then one node a level on the head's own features."""
    root, model, held = tiny[0], tiny[1], tiny[6]
    head = load_feature_head(root / "head.safetensors", model.config)[0].double()
    tokens, pairs, dtype = held.tokens[0][None], len(held.tokens[0]) - 1, torch.float64
    config = model.config
    with torch.no_grad():
        inputs = head.fuse_streams(held.features[0][None, :-1])
        levels = draft_levels(head, model, inputs, tokens, 3)
        assert [level.shape[1] for level in levels] == [pairs, pairs - 1, pairs - 2]
        for pair in (0, 5, pairs - 3):
            size = pair + 3
            k_cache, v_cache = (torch.zeros(1, config.num_kv_heads, size, config.head_dim, dtype=dtype)
                                for _ in range(2))  # fmt: skip
            embedded, context = model.embed_step(tokens[:, 1 : pair + 2], torch.arange(1, pair + 2)[None])
            bias = causal_bias(0, pair + 1, size, dtype)
            g = head(inputs[:, : pair + 1], embedded, context, bias, k_cache, v_cache, torch.arange(pair + 1))
            g = g[:, -1:]
            torch.testing.assert_close(g[0, 0], levels[0][0, pair], atol=1e-9, rtol=1e-9)
            for level in (2, 3):  # slot pair + level - 1, position pair + level: sees the pairs and its path
                slot, position = pair + level - 1, pair + level
                embedded, context = model.embed_step(tokens[:, position : position + 1],
                                                     torch.tensor([[position]]))  # fmt: skip
                g = head(g, embedded, context, causal_bias(slot, 1, size, dtype), k_cache, v_cache,
                         torch.tensor([slot]))  # fmt: skip
                torch.testing.assert_close(g[0, 0], levels[level - 1][0, pair], atol=1e-9, rtol=1e-9)


@pytest.fixture(scope="module")
def feature_artifact(tiny):
    root = tiny[0]
    art = skiptree.compile(root / "model", root / "art", max_seq_len=64, dtype="float64", tree="k-ary:2x2",
                           draft=f"feature-head:{root / 'head.safetensors'}", draft_vocab=40, max_tree=40,
                           calibration_prompts=("t5 t9 t30", "t60 t2 t7"))  # fmt: skip
    return skiptree.load(art), skiptree.load(art, speculative=False)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=random_trees(24), prompt=st.lists(st.integers(0, 96), min_size=1, max_size=8),
       new=st.integers(1, 20))
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


def fused_streams(model, head, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        states = run_layers(model, tokens, range(model.config.num_layers))
        return head.double().fuse_streams(torch.cat([states[i] for i in head.layers], dim=-1)).numpy()


def test_artifact_features_are_the_fused_streams(feature_artifact, tiny):
    """The compiled verify graph's `features` (ONNX Runtime) are the head's fused low, middle and last
    streams of the eager model."""
    speculative, _ = feature_artifact
    root, model = tiny[0], tiny[1]
    head, _ = load_feature_head(root / "head.safetensors", model.config)
    assert head.layers == (1, 2, 4)
    prompt = [5, 9, 30, 7, 60, 2, 11]
    step = speculative.step_model
    step.cache.length = 0
    features = step.forward(prompt, ("features",))[0]
    expected = fused_streams(model, head, prompt)
    # within 1e-5: the artifact's own logits differ from the eager float64 model's by ~4e-7 here
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_an_eagle1_head_still_compiles_and_is_lossless(tiny, tmp_path):
    """A head trained before fusion (no `fuse`: fc over the last layer's stream) loads, compiles and
    drafts from the last layer's features; decoding with it stays the target's greedy decoding."""
    root, model = tiny[0], tiny[1]
    torch.manual_seed(1)
    weights = tmp_path / "eagle1.safetensors"
    save_trained(FeatureHead(model.config, 16, ()), weights, {"kind": KIND, "step": 0})
    head, _ = load_feature_head(weights, model.config)
    assert head.fuse is None and head.layers == (4,)
    art = skiptree.compile(root / "model", tmp_path / "art", max_seq_len=64, dtype="float64",
                           tree="k-ary:2x2", draft=f"feature-head:{weights}", max_tree=40,
                           calibration_prompts=("t5 t9 t30",))  # fmt: skip
    speculative, plain = skiptree.load(art), skiptree.load(art, speculative=False)
    for prompt in random_prompts(4, 3, 2, 8):
        expected = plain.generate(prompt, max_new_tokens=12, eos_token_id=[]).token_ids
        assert speculative.speculative.generate(prompt, 12).token_ids == expected
    speculative.step_model.cache.length = 0
    features = speculative.step_model.forward([5, 9, 30], ("features",))[0]
    expected = fused_streams(model, head, [5, 9, 30])  # the last layer's stream
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


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
        assert str(options.draft) == f"feature-head:{weights}+prompt-lookup+recycle"
        assert options.draft_vocab == 50
    else:
        assert options.draft is None
