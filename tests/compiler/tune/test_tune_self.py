"""`skiptree tune --draft self:auto` end to end on a tiny model, and the cost model's arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from conftest import TINY_LLAMA, write_tiny_model, write_word_tokenizer

from skiptree.compiler.drafters.self_draft_search import SelfDraftCosts, predict, skip_candidates
from skiptree.compiler.specs import SelfDraftSpec
from skiptree.compiler.tune.driver import tune


def test_cost_model_and_prediction():
    costs = SelfDraftCosts(decode_ms=40.0, verify_ms={1: 44.0, 2: 46.0, 4: 50.0, 8: 60.0}, probe_layers=15,
                           probe_ms=25.0, num_layers=30)  # fmt: skip
    assert costs.layer_ms == pytest.approx(1.0) and costs.draft_ms(6) == pytest.approx(16.0)
    exit_spec, skip_spec = SelfDraftSpec("exit", exit_layer=6), SelfDraftSpec("skip", skipped=(3, 4))
    assert costs.cycle_ms(exit_spec, 3) == pytest.approx(4 * 16.0 + 48.0 - 6)  # T(3) interpolated: 48
    assert costs.cycle_ms(skip_spec, 2) == pytest.approx(2 * 38.0 + 46.0)
    best = predict(exit_spec, 0.5, costs)
    gains = [sum(0.5**i for i in range(k + 1)) * 40 / costs.cycle_ms(exit_spec, k) for k in range(1, 9)]
    speedups = [(gain, k) for k, gain in enumerate(gains, start=1)]
    expected = max(speedups)
    assert (best["speedup"], best["chain"]) == pytest.approx(expected)


def test_skip_candidates_follow_layer_similarity():
    specs = skip_candidates(np.array([0.99, 0.5, 0.97, 0.7, 0.8, 0.95]))  # first and last never skipped
    assert [s.skipped for s in specs] == [(2,), (2, 4), (2, 3, 4)]


def test_tune_self_auto_on_a_tiny_model(tmp_path):
    folder = tmp_path / "model"
    write_tiny_model(folder, transformers.LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 4}))
    write_word_tokenizer(folder)
    prompts = [" ".join(f"t{t}" for t in np.random.default_rng(i).integers(3, 97, 6)) for i in range(3)]
    record = tune(str(folder), tmp_path / "session", draft="self:auto", prompts=prompts, max_seq_len=64,
                  prefix=16, max_new_tokens=8, log=lambda m: None)  # fmt: skip
    names = [c["draft"] for c in record["candidates"]]
    assert {"self:exit=1", "self:exit=2", "self:exit=3"} <= set(names) and any("skip" in n for n in names)
    assert all(0.0 <= c["acceptance"] <= 1.0 and c["chain"] >= 1 for c in record["candidates"])
    choice = json.loads((tmp_path / "session" / "choice.json").read_text())
    assert choice["mode"] in ("plain", "speculative")
    if choice["mode"] == "speculative":
        assert choice["draft"] == record["candidates"][0]["draft"] and choice["measured_speedup"] > 0
    assert "Decision" in (tmp_path / "session" / "report.md").read_text()
    again = tune(str(folder), tmp_path / "session", draft="self:auto", prompts=prompts, max_seq_len=64,
                 prefix=16, max_new_tokens=8, log=lambda m: None)  # resumed: nothing re-measured
    assert again["candidates"] == record["candidates"]
