"""The `skiptree` command: help lists every command, JSON on the last line, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from skiptree.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skiptree", *args], capture_output=True, text=True)


def test_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("fetch", "compile", "generate"):
        assert command in out.stdout


def test_generate_from_an_artifact_prints_json_last(tiny_artifact):
    args = ("--prompt", "t3 t4 t5", "--max-new-tokens", "6", "--json")
    out = run_cli("generate", str(tiny_artifact[1]), *args)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["prompt_ids"] == [3, 4, 5] and len(record["token_ids"]) == 6
    assert record["engine"] == "onnxruntime" and record["stop_reason"] == "length"
    assert set(record) >= {"text", "tokens_per_second", "prefill_seconds"}


def test_generate_streams_text_and_summarises_on_stderr(tiny_artifact):
    out = run_cli("generate", str(tiny_artifact[1]), "--prompt", "t3 t4 t5", "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 4
    assert "[4 tokens, stopped at length; decode" in out.stderr


def test_reference_and_artifact_agree_from_the_cli(tiny_artifact):
    folder, artifact = tiny_artifact
    args = ("--prompt", "t9 t8 t7", "--max-new-tokens", "8", "--json")
    ours = json.loads(run_cli("generate", str(artifact), *args).stdout.splitlines()[-1])
    reference = json.loads(run_cli("generate", str(folder), *args).stdout.splitlines()[-1])
    assert ours["token_ids"] == reference["token_ids"] and reference["engine"] == "reference"


MISSING = "skiptree: error: no such file or folder: /no/such/model; pass a Hugging Face"


@pytest.mark.parametrize("args,message", [
    (("generate", "/no/such/model", "--prompt", "x"), MISSING),
    (("compile", "/no/such/model", "-o", "/tmp/never-written"), MISSING),
    (("fetch", "gpt-5"), "skiptree: error: 'gpt-5' is not a zoo name; use one of: smollm2-135m,"),
])  # fmt: skip
def test_errors_are_one_line_without_traceback(args, message, capsys):
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith(message) and "Traceback" not in err


def test_compile_refuses_a_folder_that_is_not_an_artifact(tiny_artifact, tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["compile", str(tiny_artifact[0]), "-o", str(tmp_path)]) == 2
    assert f"{tmp_path} exists and is not a skiptree artifact; choose an empty or new -o folder." in (
        capsys.readouterr().err
    )
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_compile_refuses_a_max_seq_len_beyond_the_context(tiny_artifact, tmp_path, capsys):
    assert main(["compile", str(tiny_artifact[0]), "-o", str(tmp_path / "a"), "--max-seq-len", "65"]) == 2
    assert "--max-seq-len 65 is outside 2..64 (the model's context); pass a value from 2 to 64." in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "a").exists()
