"""Token choice: greedy, and sampling that matches transformers' warpers and their distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from skiptree.errors import GenerationError
from skiptree.runtime.sampling import SamplingConfig, choose_token, sampling_probabilities


def transformers_probabilities(logits: np.ndarray, temperature, top_k, top_p) -> np.ndarray:
    scores = torch.tensor(logits[None], dtype=torch.float64)
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores, -1)[0].numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.5, 10, 0.9), (1.0, 50, 0.3),
])  # fmt: skip
def test_probabilities_match_transformers_warpers(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=64) * 3
        ours = sampling_probabilities(logits, SamplingConfig(True, temperature, top_k, top_p))
        theirs = transformers_probabilities(logits, temperature, top_k, top_p)
        np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_greedy_is_argmax_and_ignores_rng():
    logits = np.array([0.1, 3.0, -2.0, 2.9])
    rng = np.random.default_rng(0)
    assert {choose_token(logits, SamplingConfig(), rng) for _ in range(10)} == {1}


def test_samples_follow_the_distribution_on_a_tiny_vocabulary():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03]))
    config = SamplingConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    rng = np.random.default_rng(1234)
    draws = 40_000
    counts = np.bincount([choose_token(logits, config, rng) for _ in range(draws)], minlength=5)
    expected = np.exp(logits) * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, (counts, chi2)  # 99.9% quantile of chi-square with 4 degrees of freedom


def test_top_k_and_top_p_never_sample_outside_their_support():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.06, 0.04]))
    rng = np.random.default_rng(7)
    top2 = SamplingConfig(do_sample=True, top_k=2)
    assert {choose_token(logits, top2, rng) for _ in range(500)} == {0, 1}
    nucleus = SamplingConfig(do_sample=True, top_k=0, top_p=0.85)  # 0.4+0.3+0.2 >= 0.85
    assert {choose_token(logits, nucleus, rng) for _ in range(500)} == {0, 1, 2}


def test_same_seed_same_samples():
    logits = np.random.default_rng(0).normal(size=100)
    config = SamplingConfig(do_sample=True, temperature=1.5, top_k=0)
    first = [choose_token(logits, config, np.random.default_rng(42)) for _ in range(5)]
    again = [choose_token(logits, config, np.random.default_rng(42)) for _ in range(5)]
    assert first == again


@pytest.mark.parametrize("kwargs,message", [
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0 when sampling, got 0.0"),
    (dict(top_k=-1), "top_k must be >= 0, got -1"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
])  # fmt: skip
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(GenerationError, match=message.replace("(", r"\(").replace("]", r"\]")):
        SamplingConfig(**kwargs)
