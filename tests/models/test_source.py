"""resolve_model_dir: zoo names, HF folders and GGUF files, and the messages for everything else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_gguf_convert import tiny_hf_model, write_gguf

from skiptree.errors import ModelSourceError
from skiptree.models.gguf_convert import ensure_converted, file_sha256, is_complete
from skiptree.models.source import resolve_model_dir

ACCEPTED = ("pass a Hugging Face model folder, a .gguf file, synthetic:NAME (random weights), or one of "
            "the zoo names: smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b.")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("SKIPTREE_HOME", str(home))
    return home


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_gguf(tiny_hf_model("llama"), tmp_path / "tiny-llama.gguf")


def test_gguf_file_converted_once_into_home(home, tiny_gguf):
    folder = resolve_model_dir(tiny_gguf, progress=False)
    assert folder == home / "converted" / f"{file_sha256(tiny_gguf)[:16]}-tiny-llama"
    assert is_complete(folder) and (folder / "config.json").is_file()
    stamp = os.stat(folder / "model.safetensors").st_mtime_ns
    assert resolve_model_dir(str(tiny_gguf), progress=False) == folder  # str works too; reused
    assert os.stat(folder / "model.safetensors").st_mtime_ns == stamp
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_hf_folder_used_as_is(home, tiny_gguf, tmp_path):
    folder = ensure_converted(tiny_gguf, tmp_path / "hf", progress=False)
    assert resolve_model_dir(folder) == folder
    assert resolve_model_dir(str(folder)) == folder
    assert not home.exists()


def test_zoo_name_resolves_to_fetched_folder(home, tiny_gguf):
    # A complete cached folder under the zoo name: resolved without any download.
    cached = ensure_converted(tiny_gguf, home / "models" / "smollm2-135m", progress=False)
    assert resolve_model_dir("smollm2-135m", progress=False) == cached


def test_folder_without_config_refused(tmp_path, home):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError) as err:
        resolve_model_dir(tmp_path / "empty")
    assert str(err.value) == f"{tmp_path / 'empty'} has no config.json; {ACCEPTED}"


@pytest.mark.parametrize("spec", ["./nope", "missing.gguf", "/no/such/dir"])
def test_missing_path_refused(home, spec):
    with pytest.raises(ModelSourceError) as err:
        resolve_model_dir(spec)
    assert str(err.value) == f"no such file or folder: {spec}; {ACCEPTED}"


def test_missing_path_object_refused(home, tmp_path):
    with pytest.raises(ModelSourceError, match="^no such file or folder: "):
        resolve_model_dir(tmp_path / "smollm2-135m")


def test_unknown_name_refused(home):
    with pytest.raises(ModelSourceError) as err:
        resolve_model_dir("llama-7b")
    assert str(err.value) == (
        f"'llama-7b' is not a model folder, a .gguf file or a zoo name; {ACCEPTED}")


def test_non_gguf_file_refused(home, tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(ModelSourceError) as err:
        resolve_model_dir(weights)
    assert str(err.value) == f"{weights} is a file but not a .gguf file; {ACCEPTED}"


def test_unsupported_gguf_leaves_no_folder(home, tmp_path):
    from skiptree.errors import UnsupportedArchitectureError

    path = write_gguf(tiny_hf_model("llama"), tmp_path / "g.gguf", arch="gemma3")
    with pytest.raises(UnsupportedArchitectureError):
        resolve_model_dir(path, progress=False)
    assert list((home / "converted").iterdir()) == []
