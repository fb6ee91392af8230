"""The typed manifest (format 2): what the compiler writes reads back as written, the decode mode is
stated, and an artifact of another format or with a malformed manifest is refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest

import skiptree
from skiptree.cli import main
from skiptree.errors import ModelSourceError
from skiptree.runtime.early_exit import EarlyExitStepModel
from skiptree.runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    DecodeMode,
    GraphName,
    Manifest,
    SchemaError,
    TreeEntry,
    read_manifest,
)

CALIBRATION = ("t5 t6 t7 t8 t5 t6 t7 t8", "t9 t3 t4 t9 t3 t4 t9")


@pytest.fixture(scope="module")
def artifacts(tiny_artifact, tmp_path_factory):
    """{decode mode: artifact folder} on the tiny Llama: plain, speculative, early exit."""
    folder, plain = tiny_artifact
    root = tmp_path_factory.mktemp("modes")
    speculative = skiptree.compile(folder, root / "speculative", max_seq_len=48, check=False,
                                   draft="prompt-lookup+recycle", tree="k-ary:2x2")  # fmt: skip
    early = skiptree.compile(folder, root / "early", max_seq_len=48, check=False,
                             early_exit="min-agreement=0.5,exits=1", calibration_prompts=CALIBRATION)
    return {DecodeMode.PLAIN: plain, DecodeMode.SPECULATIVE: speculative, DecodeMode.EARLY_EXIT: early}


def raw(artifact) -> dict:
    return json.loads((artifact / MANIFEST).read_text())


def test_format_version_is_2():
    assert FORMAT_VERSION == 2


@pytest.mark.parametrize("mode", list(DecodeMode))
def test_a_compiled_manifest_round_trips_to_the_file(artifacts, mode):
    data = raw(artifacts[mode])
    manifest = Manifest.from_json(data)
    assert manifest.to_json() == data
    assert read_manifest(artifacts[mode]) == manifest
    assert json.loads(json.dumps(manifest.to_json())) == data  # plain JSON: no enums, no tuples left


def test_every_decode_mode_is_stated_by_the_compiler(artifacts):
    for mode, artifact in artifacts.items():
        assert raw(artifact)["decode_mode"] == mode.value
    plain, speculative, early = (skiptree.load(artifacts[mode]) for mode in DecodeMode)
    assert plain.manifest.speculative is None and plain.manifest.early_exit is None
    assert plain.speculative is None and not isinstance(plain.step_model, EarlyExitStepModel)
    assert speculative.manifest.speculative.drafter == "prompt-lookup+recycle"
    assert speculative.manifest.speculative.sources == ("prompt-lookup", "recycle")
    assert speculative.speculative is not None
    assert {GraphName.VERIFY, GraphName.COMPACT} <= set(speculative.manifest.graphs)
    assert early.manifest.early_exit.exits == (1,) and isinstance(early.step_model, EarlyExitStepModel)
    assert set(early.manifest.graphs) == {GraphName.STEP, GraphName.EXIT_STEP}
    assert "early exit (LOSSY): gate softmax at layers [1]," in early.description


def test_a_tree_given_by_hand_has_no_provenance(artifacts):
    tree = skiptree.load(artifacts[DecodeMode.SPECULATIVE]).manifest.speculative.tree
    assert tree == TreeEntry("k-ary:2x2", (-1, -1, 0, 0, 1, 1), 2, None)


def test_the_graph_names_are_the_compiled_graphs(artifacts):
    names = {name for artifact in artifacts.values() for name in raw(artifact)["graphs"]}
    assert names <= {name.value for name in GraphName}
    assert GraphName.VERIFY == "verify" and json.dumps({GraphName.STEP: 1}) == '{"step": 1}'


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path):
    return shutil.copytree(tiny_artifact[1], tmp_path / "artifact")


def refusal(folder) -> str:
    with pytest.raises(ModelSourceError) as info:
        skiptree.load(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_artifact_of_the_old_format_is_refused_in_one_line(artifact_copy, capsys):
    """A version-1 manifest (written by hand as skiptree wrote them: no decode_mode, untyped
    entries) is refused before any graph is opened, with what to do; the CLI prints that line."""
    version_1 = {
        "format_version": 1, "skiptree_version": "0.1.0", "created": "2025-01-01T00:00:00Z",
        "model": {"source": "tiny", "model_type": "llama", "weights_sha256": "0" * 64, "config": {}},
        "backend": {"name": "onnxruntime", "version": "1.22.0", "optimization_level": "extended",
                    "threads": 0},
        "max_seq_len": 48, "graphs": {"step": {"file": "step.onnx", "quantization": None, "signature": {}}},
        "tokenizer": {"folder": "tokenizer", "eos_token_ids": [2]}, "pipeline": [], "check": None,
        "speculative": None, "early_exit": None, "dtype": "float32", "files": {},
    }  # fmt: skip
    (artifact_copy / MANIFEST).write_text(json.dumps(version_1, indent=2))
    expected = (f"artifact {artifact_copy} has format version 1, this skiptree reads 2; recompile it with "
                "skiptree compile from this version.")  # fmt: skip
    assert refusal(artifact_copy) == expected
    assert main(["generate", str(artifact_copy), "--prompt", "t1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"skiptree: error: {expected}"]
    del version_1["format_version"]
    (artifact_copy / MANIFEST).write_text(json.dumps(version_1))
    assert refusal(artifact_copy).startswith(f"artifact {artifact_copy} has no format version, this skiptree "
                                             "reads 2; recompile it")  # fmt: skip


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m.pop("decode_mode"), "decode_mode is missing"),
    (lambda m: m["backend"].pop("name"), "backend.name is missing"),
    (lambda m: m["graphs"]["step"].update(tile=8), "graphs.step.tile is not a field of this format"),
    (lambda m: m.update(graphs={"stepp": m["graphs"]["step"]}),
     "graphs key is 'stepp', not one of step, verify, compact, self_draft, feature_draft, exit_step"),
    (lambda m: m.update(decode_mode="fast"),
     "decode_mode is 'fast', not one of plain, speculative, early-exit"),
    (lambda m: m.update(max_seq_len="48"), "max_seq_len is str '48', not int"),
    (lambda m: m["tokenizer"].update(eos_token_ids=2), "tokenizer.eos_token_ids is int '2', not a list"),
    (lambda m: m.update(decode_mode="speculative"), "decode_mode speculative but no verify or compact graph"),
])  # fmt: skip
def test_a_malformed_manifest_is_refused_in_one_line(artifact_copy, edit, problem):
    data = raw(artifact_copy)
    edit(data)
    (artifact_copy / MANIFEST).write_text(json.dumps(data))
    message = refusal(artifact_copy)
    assert message == (f"artifact {artifact_copy} has a manifest this skiptree cannot read ({problem}); "
                       "recompile it with skiptree compile from this version.")  # fmt: skip


def test_the_decode_mode_and_the_entries_must_agree(artifacts):
    data = raw(artifacts[DecodeMode.SPECULATIVE])
    with pytest.raises(SchemaError, match="decode_mode plain with a speculative entry"):
        Manifest.from_json({**data, "decode_mode": "plain"})
    early = raw(artifacts[DecodeMode.EARLY_EXIT])
    with pytest.raises(SchemaError, match="decode_mode plain with a early_exit entry"):
        Manifest.from_json({**early, "decode_mode": "plain"})
