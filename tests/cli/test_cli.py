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


def test_compile_refuses_a_bad_quantize_option(tiny_artifact, tmp_path, capsys):
    args = ["compile", str(tiny_artifact[0]), "-o", str(tmp_path / "a"), "--quantize", "int4:block=48"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == ("skiptree: error: --quantize 'int4:block=48': block 48 is not a power "
                                    "of two >= 16; use block=16, 32, 64, 128 or 256.")  # fmt: skip
    assert "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_generate_json_states_the_precision(tiny_artifact, tmp_path):
    folder, _ = tiny_artifact
    art = tmp_path / "int8"
    compiled = run_cli("compile", str(folder), "-o", str(art), "--max-seq-len", "48", "--quantize", "int8")
    assert compiled.returncode == 0
    out = run_cli("generate", str(art), "--prompt", "t3 t4 t5", "--max-new-tokens", "3", "--json")
    precision = json.loads(out.stdout.splitlines()[-1])["precision"]
    assert precision == "int8 weights (block 32, symmetric), int8 activations"


def test_compile_refuses_a_max_seq_len_beyond_the_context(tiny_artifact, tmp_path, capsys):
    assert main(["compile", str(tiny_artifact[0]), "-o", str(tmp_path / "a"), "--max-seq-len", "65"]) == 2
    assert "--max-seq-len 65 is outside 2..64 (the model's context); pass a value from 2 to 64." in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "a").exists()


def test_speculative_compile_and_generate(tiny_artifact, tmp_path):
    folder, _ = tiny_artifact
    art = tmp_path / "spec"
    out = run_cli("compile", str(folder), "-o", str(art), "--max-seq-len", "48", "--draft", "lookup+recycle",
                  "--tree", "k-ary:2x2")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "InsertTreeVerify: modified" in out.stderr
    args = ("--prompt", "t3 t4 t5 t3 t4 t5 t3 t4", "--max-new-tokens", "12", "--json")
    spec = run_cli("generate", str(art), *args, "--stats", str(tmp_path / "steps.jsonl"))
    plain = run_cli("generate", str(art), *args, "--no-speculative")
    spec_record = json.loads(spec.stdout.splitlines()[-1])
    assert spec_record["token_ids"] == json.loads(plain.stdout.splitlines()[-1])["token_ids"]
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert sum(s["emitted"] for s in steps) == 11
    assert {"drafted", "accepted", "verify_seconds"} <= set(steps[0])
    assert spec_record["mean_accepted"] == round(11 / len(steps), 4)
    counts = spec_record["tokens_by_source"]
    assert set(counts) <= {"target", "prompt-lookup", "recycle"} and sum(counts.values()) == 12
    assert counts["target"] >= 12 - sum(s["accepted"] for s in steps)  # the last step may be cut
    text = run_cli("generate", str(art), *args[:-1])
    assert "tokens per target step" in text.stderr and "from target" in text.stderr


def test_a_draft_with_another_tokenizer_is_refused(tiny_artifact, tmp_path, capsys):
    import transformers
    from conftest import write_tiny_model, write_word_tokenizer

    folder, _ = tiny_artifact
    other = tmp_path / "other"
    write_tiny_model(other, transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))  # fmt: skip
    write_word_tokenizer(other, vocab_size=50)
    assert main(["compile", str(folder), "-o", str(tmp_path / "a"), "--max-seq-len", "48",
                 "--draft", str(other)]) == 2  # fmt: skip
    assert "has a different tokenizer than the target (50 vs 97 tokens, or different ids)" in (
        capsys.readouterr().err
    )


def test_tree_command_prints_the_solution_last(tmp_path):
    out = run_cli("tree", "--accept", "0.6,0.1,0.05", "--budget", "16", "--max-depth", "8", "--json",
                  "-o", str(tmp_path / "tree.json"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(record) == {"expected_tokens", "parents", "depth"} and len(record["parents"]) == 16
    assert json.loads((tmp_path / "tree.json").read_text()) == record  # usable as --tree FILE


@pytest.mark.parametrize("option,message", [
    (("--draft", "foo+bar"), "--draft foo+bar: '+' combines free drafters, and none is named here"),
    (("--draft", "lookup+nope"), "--draft lookup+nope: 'nope' is not a free drafter"),
    (("--draft", "self:exit=x"), "cannot read the self-draft 'self:exit=x'"),
    (("--draft", "no-such-model"), "--draft 'no-such-model' is not a model folder, a .gguf file or a zoo"),
    (("--draft", "lookup", "--tree", "chain:0"), "tree preset 'chain:0' is malformed"),
    (("--early-exit", "min-agreement=0.9,gate=xy"), "cannot read --early-exit 'min-agreement=0.9,gate=xy'"),
    (("--quantize", "int3"), "--quantize 'int3': unknown precision 'int3'"),
])  # fmt: skip
def test_compile_refuses_malformed_options_before_any_work(tmp_path, option, message, capsys):
    # The model does not even exist: an option error must come first, before the model is resolved.
    assert main(["compile", "/no/such/model", "-o", str(tmp_path / "a"), *option]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err.splitlines()[-1]] and "Traceback" not in err
    assert err.startswith(f"skiptree: error: {message}")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("option,message", [
    (("--temperature", "nan"), "--temperature nan is not a number >= 0"),
    (("--temperature", "-1"), "--temperature -1.0 is not a number >= 0"),
    (("--top-p", "0"), "--top-p 0.0 is outside (0, 1]"),
    (("--max-new-tokens", "0"), "--max-new-tokens 0 is below 1"),
])  # fmt: skip
def test_generate_refuses_meaningless_sampling_values(tiny_artifact, option, message, capsys):
    assert main(["generate", str(tiny_artifact[1]), "--prompt", "t3", *option]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"skiptree: error: {message}; " + err.split("; ", 1)[1]]
