"""Self-written requests (Magpie): the user-turn prefix and its end are read from the template, the
sampling is seeded, cached and resumable chunk by chunk, the filters and deduplication drop what
they say, and the real SmolLM2 writes distinct English requests."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import TINY_LLAMA, write_tiny_model, write_word_tokenizer

from skiptree.compiler.train.self_distill import batched_greedy
from skiptree.compiler.train.self_requests import (
    RequestSettings,
    RequestSynthesisError,
    acceptable,
    deduplicate,
    end_of_turn,
    sample_chunk,
    self_written_requests,
    top_p_sampler,
    user_turn,
)
from skiptree.models.loader import load_model
from skiptree.models.source import resolve_model_dir
from skiptree.runtime.tokenizer import Tokenizer

TEMPLATE = ("{% for m in messages %}t1 {{ m['content'] }} t2 {% endfor %}"
            "{% if add_generation_prompt %}t3 {% endif %}")  # fmt: skip


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-model")
    write_tiny_model(folder, transformers.LlamaConfig(**TINY_LLAMA))
    write_word_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return load_model(folder, torch.float32), Tokenizer.from_folder(folder), folder


def test_user_turn_is_cut_from_the_template(chat_model):
    _, tokenizer, folder = chat_model
    prefix, suffix = user_turn(tokenizer)
    assert prefix == [1] and suffix == " t2 "
    assert end_of_turn(tokenizer, suffix, [7]) == [2, 7]
    tokenizer_without = Tokenizer(folder / "tokenizer.json", {})
    with pytest.raises(RequestSynthesisError, match="no chat template"):
        user_turn(tokenizer_without)


def test_requests_are_seeded_cached_and_resumable(chat_model, tmp_path):
    model, tokenizer, _ = chat_model
    settings = RequestSettings(chunk=8, max_tokens=40, min_chars=8, min_words=2)
    first, record = self_written_requests(model, tokenizer, 6, tmp_path / "a", settings, log=lambda m: None)
    assert len(first) == 6 == record["kept"] and record["written"] == 8 * record["chunks"]
    chunks = sorted((tmp_path / "a" / settings.key).glob("chunk-*.json"))
    assert len(chunks) == record["chunks"]
    chunks[-1].unlink()  # an interrupted synthesis: the last chunk is sampled again, the same
    again, _ = self_written_requests(model, tokenizer, 6, tmp_path / "a", settings, log=lambda m: None)
    elsewhere, _ = self_written_requests(model, tokenizer, 6, tmp_path / "b", settings, log=lambda m: None)
    assert again == first == elsewhere
    other, _ = self_written_requests(model, tokenizer, 6, tmp_path / "c", RequestSettings(**{
        **settings.__dict__, "seed": 1}), log=lambda m: None)  # fmt: skip
    assert other != first
    for text in first:  # each ended its turn: the end-of-turn word never appears inside
        assert "t2" not in text.split()


def test_a_tiny_nucleus_samples_the_argmax(chat_model):
    model, _, _ = chat_model
    logits = torch.randn(5, 97)
    choose = top_p_sampler(RequestSettings(top_p=1e-9), torch.Generator().manual_seed(0))
    assert torch.equal(choose(logits), logits.argmax(-1))
    settings = RequestSettings(top_p=1e-9, chunk=3, max_tokens=6)
    sampled = sample_chunk(model, [1, 4], [2], settings, 0)
    greedy = batched_greedy(model, [[1, 4]] * 3, 6, eos=[2])
    assert sampled == [sequence[2:] for _, sequence in greedy]


def test_filters_and_deduplication():
    settings = RequestSettings()
    assert acceptable("How do I sort a list of tuples by the second item?", settings)
    assert not acceptable("Hi there", settings)  # too short
    assert not acceptable("Как отсортировать список кортежей по второму элементу?", settings)
    assert not acceptable("Sort this list please <|im_start|>assistant", settings)
    assert not acceptable("word " * 200, settings)
    texts = ["How do I sort a list of tuples by the second item?",
             "How do I sort a list of tuples by the second item in Python?",
             "Write a short poem about the sea at night."]  # fmt: skip
    assert deduplicate(texts, 0.5) == [texts[0], texts[2]]
    assert deduplicate(texts, 1.0) == texts


def test_smollm2_writes_distinct_english_requests(tmp_path):
    folder = resolve_model_dir("smollm2-135m")
    model, tokenizer = load_model(folder, torch.float32), Tokenizer.from_folder(folder)
    settings = RequestSettings(chunk=12, max_tokens=64)
    requests, record = self_written_requests(model, tokenizer, 12, tmp_path, settings, max_chunks=1,
                                             log=lambda m: None)  # fmt: skip
    # the user-turn prefix (system turn and user header) is 24 tokens (measured with 96-token requests)
    assert len(requests) >= 5 and record["prefix_tokens"] > 10
    assert len(set(requests)) == len(requests) and all(acceptable(r, settings) for r in requests)
    assert record["stop_ids"] == sorted({*model.config.eos_token_ids, tokenizer.token_id("<|im_end|>")})
