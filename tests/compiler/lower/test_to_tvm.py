"""TVM artifacts: greedy output == ONNX Runtime artifact == eager reference; tuned == untuned."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skiptree
from skiptree.compiler.compile import compile_model
from skiptree.compiler.lower.tvm_tune import recorded_trials
from skiptree.compiler.options import CompileOptionError, CompileOptions
from skiptree.models.loader import load_model
from skiptree.models.reference import ReferenceStepper
from skiptree.runtime.generation import generate_tokens
from skiptree.runtime.manifest import GraphName

QUIET = {"log": lambda message: None}


@pytest.fixture(scope="module")
def tvm_artifacts(tiny_artifact, tmp_path_factory):
    """(reference, ORT runtime, TVM runtime, TVM speculative runtime) on one tiny Llama."""
    folder, onnx_artifact = tiny_artifact
    root = tmp_path_factory.mktemp("tvm")
    plain = compile_model(folder, root / "plain", CompileOptions(backend="tvm", max_seq_len=48), **QUIET)
    options = CompileOptions(backend="tvm", max_seq_len=48, draft="prompt-lookup", tree="k-ary:2x2")
    tree = compile_model(folder, root / "tree", options, **QUIET)
    reference = ReferenceStepper(load_model(folder), max_seq_len=48)
    return reference, skiptree.load(onnx_artifact), skiptree.load(plain), skiptree.load(tree)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.integers(3, 96), min_size=1, max_size=16), new=st.integers(1, 24))
def test_tvm_greedy_equals_onnx_and_reference(tvm_artifacts, prompt, new):
    reference, onnx, plain, tree = tvm_artifacts
    expected = generate_tokens(reference, prompt, new).token_ids
    assert onnx.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids == expected
    assert plain.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids == expected
    assert tree.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids == expected


def test_tvm_speculative_accepts_drafts_losslessly(tvm_artifacts):
    reference, _, _, tree = tvm_artifacts
    prompt = [5, 6, 7, 8] * 4  # prompt lookup drafts from the repeats
    result = tree.generate(prompt, max_new_tokens=30, eos_token_id=[]).result
    assert result.token_ids == generate_tokens(reference, prompt, 30).token_ids
    assert tree.manifest.graphs[GraphName.VERIFY].static_tokens == (1, 7)  # a decode step; root + 6 nodes
    assert sum(step.accepted for step in result.steps) > 0


def test_tvm_in_place_cache_writes_and_compaction_leave_the_autoregressive_cache(tvm_artifacts):
    _, _, plain, tree = tvm_artifacts
    prompt = [7, 8, 9, 10] * 3
    plain.generate(prompt, max_new_tokens=16, eos_token_id=[])
    result = tree.generate(prompt, max_new_tokens=16, eos_token_id=[]).result
    assert sum(step.accepted for step in result.steps) > 0  # compaction ran
    filled = plain.step_model.cache.length
    assert tree.step_model.cache.length >= filled == len(prompt) + 15
    cache, expected = tree.step_model.cache, plain.step_model.cache
    np.testing.assert_allclose(cache.k[:, :, :, :filled], expected.k[:, :, :, :filled], atol=1e-5)
    np.testing.assert_allclose(cache.v[:, :, :, :filled], expected.v[:, :, :, :filled], atol=1e-5)


def test_tvm_logits_match_reference(tvm_artifacts):
    reference, _, plain, _ = tvm_artifacts
    steps = plain.step_model
    expected = [reference.prefill([3, 1, 4, 1, 5])] + [reference.decode(t) for t in (9, 2, 6)]
    got = [steps.prefill([3, 1, 4, 1, 5])] + [steps.decode(t) for t in (9, 2, 6)]
    np.testing.assert_allclose(np.stack(got), np.stack(expected), atol=1e-4)
    assert plain.manifest.backend.name == "tvm"
    assert plain.description.startswith("tvm ")


def test_tuned_schedules_keep_outputs_and_resume(tiny_artifact, tvm_artifacts, tmp_path):
    """A few MetaSchedule trials: the tuned artifact decodes as the untuned one; a rerun tunes nothing."""
    folder, _ = tiny_artifact
    _, _, plain, _ = tvm_artifacts
    database = tmp_path / "database"
    options = CompileOptions(backend="tvm", max_seq_len=48, tvm_database=database, tvm_trials=2,
                             tvm_trials_per_task=2, tvm_tune_only=("softmax",))  # fmt: skip
    lines: list[str] = []
    tuned = skiptree.load(compile_model(folder, tmp_path / "tuned", options, log=lines.append))
    assert recorded_trials(database) >= 1
    assert tuned.manifest.backend.tuning["step"]["trials"] == recorded_trials(database)
    prompt = [4, 8, 15, 16, 23, 42]
    untuned_logits = plain.step_model.prefill(prompt)
    np.testing.assert_allclose(tuned.step_model.prefill(prompt), untuned_logits, atol=1e-5)
    assert (tuned.generate(prompt, max_new_tokens=12, eos_token_id=[]).token_ids
            == plain.generate(prompt, max_new_tokens=12, eos_token_id=[]).token_ids)  # fmt: skip
    before = recorded_trials(database)
    lines.clear()
    compile_model(folder, tmp_path / "again", options, log=lines.append)
    assert recorded_trials(database) == before  # the budget was spent: resumed, nothing more to run
    assert any(f"{before} of 2 trials already recorded" in line for line in lines)


@pytest.mark.parametrize("options, message", [
    (dict(early_exit="min-agreement=0.9"), "--early-exit is not lowered to TVM"),
    (dict(draft="some/draft-model"), "separate draft models are lowered to ONNX only"),
    (dict(tvm_trials=8), "--tvm-trials needs a folder"),
    (dict(tvm_database="/nonexistent/db"), "holds no MetaSchedule database"),
])  # fmt: skip
def test_unsupported_tvm_options_are_refused(options, message):
    with pytest.raises(CompileOptionError, match=message):
        CompileOptions(backend="tvm", **options).validate(64)


def test_tvm_options_need_the_tvm_backend():
    with pytest.raises(CompileOptionError, match="apply to --backend tvm only"):
        CompileOptions(tvm_trials=8, tvm_database="/tmp/db").validate(64)
