"""Exit adapters (Kangaroo): training moves acceptance up, resumes from its checkpoint, and a trained
adapter with a shrunk head keeps decoding lossless; `tune --train-draft exit-adapter` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_LLAMA, write_tiny_model, write_word_tokenizer

import skiptree
from skiptree.compiler.drafters.self_draft_search import target_continuations
from skiptree.compiler.options import CompileOptions
from skiptree.compiler.train.exit_adapter import TrainConfig, teacher_forced, train_exit_adapter
from skiptree.compiler.tune.driver import tune, tuned_options
from skiptree.models.exit_adapter import load_adapter
from skiptree.models.loader import load_model
from skiptree.models.reference import ReferenceStepper
from skiptree.runtime.generation import generate_tokens
from skiptree.runtime.tree import chain

LAYERS = {**TINY_LLAMA, "num_hidden_layers": 4}


def random_prompts(seed: int, count: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 97, 5)] for _ in range(count)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    write_tiny_model(root / "model", transformers.LlamaConfig(**LAYERS))
    write_word_tokenizer(root / "model")
    model = load_model(root / "model", torch.float64)
    train = teacher_forced(model, target_continuations(model, random_prompts(0, 96), 24).sequences, 1)
    held = teacher_forced(model, target_continuations(model, random_prompts(1, 16), 24).sequences, 1)
    return root, model, train, held


def test_training_improves_acceptance_and_resumes(tiny):
    root, model, train, held = tiny
    config = TrainConfig(exit_layer=1, vocab=tuple(range(97)), steps=300, batch=64, lr=3e-3, inner=64,
                         checkpoint_every=50)  # fmt: skip
    messages: list[str] = []
    first = train_exit_adapter(model, train, held, TrainConfig(**{**config.__dict__, "steps": 150}),
                               root / "adapter.safetensors", {"data": "test"}, messages.append)  # fmt: skip
    assert first["step"] == 150 and not messages
    record = train_exit_adapter(model, train, held, config, root / "adapter.safetensors", {"data": "test"},
                                messages.append)  # fmt: skip
    assert messages == ["resuming exit-adapter training at step 150 of 300"] and record["step"] == 300
    # measured on this model: 0.096 untrained -> ~0.22 trained (held-out top-1 agreement)
    assert record["held_out_acceptance"] >= record["untrained_acceptance"] + 0.08
    _, stored = load_adapter(root / "adapter.safetensors")
    assert stored["held_out_acceptance"] == record["held_out_acceptance"]
    assert stored["data"] == {"data": "test"}


def test_trained_adapter_with_shrunk_head_is_lossless(tiny):
    root, model, _, _ = tiny
    art = skiptree.compile(root / "model", root / "art", max_seq_len=48, dtype="float64", draft="self:exit=1",
                           tree="chain:3", draft_adapter=root / "adapter.safetensors", draft_vocab=40,
                           calibration_prompts=("t5 t9 t30", "t60 t2 t7"))  # fmt: skip
    runtime = skiptree.load(art)
    for prompt in random_prompts(7, 6):
        expected = generate_tokens(ReferenceStepper(model, max_seq_len=48), prompt, 16).token_ids
        assert runtime.speculative.with_tree(chain(4)).generate(prompt, 16).token_ids == expected


def test_tune_train_draft_end_to_end(tiny, tmp_path):
    root, _, _, _ = tiny
    choice = tune(str(root / "model"), tmp_path / "session", prompts=["t5 t9 t30 t5 t9", "t60 t2 t7"],
                  max_seq_len=64, max_new_tokens=8, train_draft="exit-adapter", log=lambda m: None,
                  train_options={"exit_layer": 2, "draft_vocab": 50, "steps": 60})  # fmt: skip
    assert choice["adapter"]["step"] == 60 and choice["draft_vocab"] == 50 and choice["measured_speedup"] > 0
    assert choice["mode"] in ("plain", "speculative")
    stored = json.loads((tmp_path / "session" / "choice.json").read_text())
    options = tuned_options(tmp_path / "session", CompileOptions())
    if stored["mode"] == "speculative":
        assert str(options.draft) == "self:exit=2" and options.draft_vocab == 50
        assert options.draft_adapter == tmp_path / "session" / "exit_adapter.safetensors"
    else:
        assert options.draft is None
