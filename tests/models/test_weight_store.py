"""Weights by reference: placeholders that read nothing, references that read the checkpoint's
values exactly, and eager torch over streamed weights equal to eager torch over loaded ones."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TINY_LLAMA, write_tiny_model

from skiptree.errors import IntegrityError
from skiptree.models.loader import load_model
from skiptree.models.reference import ReferenceStepper
from skiptree.models.weight_store import refs_by_storage, stream_weights

TINY_GPT2 = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
CONFIGS = {
    "llama": transformers.LlamaConfig(**TINY_LLAMA),
    "llama-tied": transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=True),
    "gpt2": transformers.GPT2Config(**TINY_GPT2),  # Conv1D weights: stored transposed
}


@pytest.fixture(params=sorted(CONFIGS))
def folder(request, tmp_path):
    write_tiny_model(tmp_path, CONFIGS[request.param])
    return tmp_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_reference_reads_the_value_load_model_loads(folder, dtype):
    loaded = dict(load_model(folder, dtype).named_parameters())
    by_reference = load_model(folder, dtype, by_reference=True)
    refs = refs_by_storage(by_reference)
    params = dict(by_reference.named_parameters())
    assert params.keys() == loaded.keys() == by_reference.weight_refs.keys()
    assert len(refs) == len(params)  # one placeholder each, tied weights once
    for name, param in params.items():
        value = refs[param.untyped_storage().data_ptr()].read()
        assert value.dtype == dtype and value.shape == param.shape
        assert torch.equal(value, loaded[name]), name


def test_eager_torch_over_streamed_weights_equals_eager_torch_over_loaded_ones(folder):
    prompt = [5, 17, 3, 60, 8, 41]
    model = load_model(folder)
    for param in model.parameters():  # own allocations (a loaded tensor may sit unaligned in the mapped
        param.data = param.data.clone()  # file, and kernels round differently on other alignments)
    loaded = ReferenceStepper(model, max_seq_len=32)
    streamed_model = stream_weights(load_model(folder, by_reference=True))
    streamed = ReferenceStepper(streamed_model, max_seq_len=32)
    assert torch.equal(torch.from_numpy(streamed.prefill(prompt)), torch.from_numpy(loaded.prefill(prompt)))
    for token in (9, 2, 33):
        assert torch.equal(torch.from_numpy(streamed.decode(token)), torch.from_numpy(loaded.decode(token)))
    placeholders = {p.untyped_storage().data_ptr() for p in streamed_model.parameters()}
    assert placeholders == set(refs_by_storage(streamed_model))  # every module put its placeholder back


def test_a_checkpoint_cut_short_is_refused_when_the_missing_tensor_is_read(tmp_path):
    write_tiny_model(tmp_path, CONFIGS["llama"])
    model = load_model(tmp_path, by_reference=True)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    last = max(model.weight_refs.values(), key=lambda ref: ref.end)
    with pytest.raises(IntegrityError, match=r"model.safetensors ends inside tensor .*re-download"):
        last.read()
