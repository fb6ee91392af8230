"""Real model: SmolLM2-135M compiled to ONNX Runtime (with prompt-lookup speculation) decodes
exactly like the eager reference, plainly and speculatively."""

from __future__ import annotations

import numpy as np
import pytest

import skiptree
from skiptree.models.reference import ReferenceModel

pytestmark = pytest.mark.slow

PROMPTS = ["def fib(n):", "The capital of France is",
           "import numpy as np\n\n# compute the mean of each column\n",
           "Once upon a time, in a small village by the sea,"]  # fmt: skip


@pytest.fixture(scope="module")
def smollm2_pair(tmp_path_factory):
    from skiptree.models.zoo import fetch

    folder = fetch("smollm2-135m", progress=False)
    artifact = skiptree.compile(folder, tmp_path_factory.mktemp("smol") / "artifact", max_seq_len=256,
                                draft="prompt-lookup", tree="k-ary:2x3")  # fmt: skip
    return ReferenceModel(folder), skiptree.load(artifact)


def is_tie(logits: np.ndarray) -> bool:
    top2 = np.sort(logits)[-2:]
    return float(top2[1] - top2[0]) < 1e-3


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_reference(smollm2_pair, prompt):
    reference, runtime = smollm2_pair
    expected = reference.generate(prompt, max_new_tokens=48).token_ids
    speculative = runtime.generate(prompt, max_new_tokens=48)
    runtime.speculative, decoder = None, runtime.speculative
    try:
        plain = runtime.generate(prompt, max_new_tokens=48).token_ids
    finally:
        runtime.speculative = decoder
    assert speculative.result.steps  # it did decode speculatively
    for got in (plain, speculative.token_ids):
        if got != expected:  # accept only a numeric tie at the first divergence
            k = next(i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b)
            ids = reference.encode_prompt(prompt) + expected[:k]
            assert is_tie(reference.step_model.prefill(ids)), (k, got, expected)


def test_manifest_check_and_chat(smollm2_pair):
    reference, runtime = smollm2_pair
    assert runtime.manifest.check.max_abs_logit_error < 1e-3
    assert runtime.manifest.check.argmax_agreement == 1.0
    chat = runtime.generate("What is 2 + 2?", max_new_tokens=24, chat=True)
    assert chat.prompt_ids == reference.encode_prompt("What is 2 + 2?", chat=True)
    assert "4" in chat.text


def test_tvm_artifact_decodes_as_the_reference(smollm2_pair, tmp_path):
    """SmolLM2 lowered to TVM (untuned), speculative with a padded prompt-lookup tree."""
    from skiptree.models.zoo import fetch

    reference, _ = smollm2_pair
    artifact = skiptree.compile(fetch("smollm2-135m", progress=False), tmp_path / "tvm", max_seq_len=256,
                                backend="tvm", draft="prompt-lookup", tree="chain:3")  # fmt: skip
    runtime = skiptree.load(artifact)
    assert runtime.manifest.check.max_abs_logit_error < 1e-3
    for prompt in PROMPTS[:2]:
        expected = reference.generate(prompt, max_new_tokens=24).token_ids
        got = runtime.generate(prompt, max_new_tokens=24).token_ids
        if got != expected:  # accept only a numeric tie at the first divergence
            k = next(i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b)
            assert is_tie(reference.step_model.prefill(reference.encode_prompt(prompt) + expected[:k]))
