"""The decoding loop: greedy equals transformers' generate; EOS and max_new_tokens are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skiptree.errors import GenerationError
from skiptree.models.loader import load_model
from skiptree.models.reference import ReferenceStepper
from skiptree.runtime.generation import generate_tokens
from skiptree.runtime.sampling import SamplingConfig


def transformers_greedy(model, prompt, max_new_tokens, eos=None):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
            pad_token_id=0, attention_mask=torch.ones_like(ids),
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.fixture
def tiny_pair(tiny_llama):
    folder, reference = tiny_llama
    return ReferenceStepper(load_model(folder, torch.float64)), reference.double()


# The fixture is read-only across examples: each generate_tokens call resets the stepper.
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.integers(3, 96), min_size=1, max_size=12), new=st.integers(1, 20))
def test_greedy_equals_transformers_generate(tiny_pair, prompt, new):
    stepper, reference = tiny_pair
    ours = generate_tokens(stepper, prompt, new).token_ids
    assert ours == transformers_greedy(reference, prompt, new, eos=[])


def test_stops_exactly_at_eos_and_includes_it(tiny_pair):
    stepper, _ = tiny_pair
    free = generate_tokens(stepper, [5, 6, 7], 20).token_ids
    eos = free[4]
    first = free.index(eos)
    stopped = generate_tokens(stepper, [5, 6, 7], 20, eos_token_ids=[eos])
    assert stopped.token_ids == free[: first + 1]
    assert stopped.stop_reason == "eos"


def test_never_emits_past_max_new_tokens(tiny_pair):
    stepper, _ = tiny_pair
    for n in (1, 2, 9):
        result = generate_tokens(stepper, [5, 6, 7], n)
        assert len(result.token_ids) == n and result.stop_reason == "length"


def test_sampling_is_seeded_and_differs_from_greedy(tiny_pair):
    stepper, _ = tiny_pair
    sampling = SamplingConfig(do_sample=True, temperature=2.0, top_k=0)
    one = generate_tokens(stepper, [5, 6], 24, sampling, seed=3).token_ids
    two = generate_tokens(stepper, [5, 6], 24, sampling, seed=3).token_ids
    three = generate_tokens(stepper, [5, 6], 24, sampling, seed=4).token_ids
    assert one == two and one != three


def test_prompt_longer_than_the_context_is_refused(tiny_pair):
    stepper, _ = tiny_pair  # context of 64 positions
    with pytest.raises(GenerationError, match="the prompt has 60 tokens and max_new_tokens is 10, "
                       "but the context holds 64; shorten the prompt or lower max_new_tokens "
                       "to at most 4"):  # fmt: skip
        generate_tokens(stepper, [5] * 60, 10)
    with pytest.raises(GenerationError, match="the prompt is empty"):
        generate_tokens(stepper, [], 10)


def test_cache_growth_keeps_logits(tiny_llama):
    folder, _ = tiny_llama
    model = load_model(folder, torch.float64)
    small = ReferenceStepper(model, initial_slots=2)  # grows 2 -> 4 -> ... while decoding
    large = ReferenceStepper(model, initial_slots=64)
    a = [small.prefill([4, 5, 6])] + [small.decode(t) for t in (7, 8, 9, 10, 11)]
    b = [large.prefill([4, 5, 6])] + [large.decode(t) for t in (7, 8, 9, 10, 11)]
    np.testing.assert_allclose(np.stack(a), np.stack(b), atol=1e-12)
