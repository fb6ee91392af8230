"""A compiled ONNX Runtime artifact decodes exactly like the eager reference, and guards itself."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skiptree
from skiptree.errors import IntegrityError, ModelSourceError
from skiptree.models.loader import load_model
from skiptree.models.reference import ReferenceStepper
from skiptree.runtime.generation import generate_tokens
from skiptree.runtime.manifest import DecodeMode, GraphName, PassEntry
from skiptree.runtime.sampling import SamplingConfig


@pytest.fixture(scope="module")
def pair(tiny_artifact):
    folder, artifact = tiny_artifact
    return ReferenceStepper(load_model(folder), max_seq_len=48), skiptree.load(artifact)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.integers(0, 96), min_size=1, max_size=20), new=st.integers(1, 24))
def test_greedy_equals_reference(pair, prompt, new):
    reference, runtime = pair
    expected = generate_tokens(reference, prompt, new).token_ids
    assert runtime.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids == expected


def test_logits_match_reference(pair):
    reference, runtime = pair
    steps = runtime.step_model
    expected = [reference.prefill([3, 1, 4, 1, 5])] + [reference.decode(t) for t in (9, 2, 6)]
    got = [steps.prefill([3, 1, 4, 1, 5])] + [steps.decode(t) for t in (9, 2, 6)]
    np.testing.assert_allclose(np.stack(got), np.stack(expected), atol=1e-4)


def test_seeded_sampling_matches_reference(pair):
    reference, runtime = pair
    sampling = SamplingConfig(do_sample=True, temperature=1.5, top_k=0)
    expected = generate_tokens(reference, [7, 7], 20, sampling, seed=11).token_ids
    got = runtime.generate([7, 7], max_new_tokens=20, do_sample=True, temperature=1.5, top_k=0, seed=11)
    assert got.token_ids == expected


def test_cache_is_updated_in_place(pair):
    """ORT's ScatterND writes through the bound output into our buffer (no copy): if a future
    onnxruntime stops doing that, decoding would silently read a stale cache; this catches it."""
    reference, runtime = pair
    steps = runtime.step_model
    buffer_address = steps.k_cache.ctypes.data
    steps.prefill([1, 2, 3, 4])
    reference.prefill([1, 2, 3, 4])
    assert steps.k_cache.ctypes.data == buffer_address
    np.testing.assert_allclose(steps.k_cache[:, :, :, :4], reference.k_cache[:, :, :, :4].numpy(), atol=1e-5)
    assert np.abs(steps.k_cache[:, :, :, :4]).sum() > 0


def test_manifest_records_what_was_built(tiny_artifact):
    _, artifact = tiny_artifact
    manifest = skiptree.load(artifact).manifest
    assert manifest.format_version == 2 and manifest.max_seq_len == 48
    assert manifest.backend.name == "onnxruntime" and manifest.decode_mode == DecodeMode.PLAIN
    verify = {"max_tree": 48, "first_layer": 0, "fused_attention": True, "plain_decoding": True,
              "max_batch": 1}
    assert manifest.pipeline == (  # a model that cannot fuse (head size 8) keeps its step graph
        PassEntry("InsertTreeVerify", verify, False), PassEntry("EliminateDeadCode", {}, False))
    assert manifest.check.argmax_agreement == 1.0 and manifest.check.max_abs_logit_error < 1e-4
    assert set(manifest.files) == {"step.onnx", "step.onnx.data", "tokenizer/tokenizer.json",
                                   "tokenizer/generation_config.json"}
    assert len(manifest.model.weights_sha256) == 64 and len(manifest.device.fingerprint) == 16
    assert manifest.graphs[GraphName.STEP].signature["inputs"][2] == {
        "name": "attn_bias", "dtype": "float32", "shape": [1, 1, "T", 48]}


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path):
    return shutil.copytree(tiny_artifact[1], tmp_path / "artifact")


def test_altered_file_is_refused(artifact_copy):
    data = artifact_copy / "step.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=re.escape(
        "artifact file step.onnx.data does not match its sha256 in the manifest; the artifact is "
        "corrupted or was modified; recompile it with skiptree compile."
    )):  # fmt: skip
        skiptree.load(artifact_copy)


def test_truncated_and_missing_files_are_refused(artifact_copy):
    data = artifact_copy / "step.onnx.data"
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match=f"has {size - 10} bytes, the manifest says {size}"):
        skiptree.load(artifact_copy)
    data.unlink()
    with pytest.raises(IntegrityError, match="artifact file step.onnx.data is missing"):
        skiptree.load(artifact_copy)
    (artifact_copy / "manifest.json").unlink()
    with pytest.raises(ModelSourceError, match="has no manifest.json, so it is not a skiptree artifact"):
        skiptree.load(artifact_copy)


def test_runtime_runs_an_artifact_without_torch(tiny_artifact):
    code = (
        "import sys, skiptree\n"
        f"out = skiptree.load({str(tiny_artifact[1])!r}).generate('t1 t2 t3', max_new_tokens=5)\n"
        "assert len(out.token_ids) == 5, out\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_context_overflow_is_refused(pair):
    _, runtime = pair
    with pytest.raises(skiptree.GenerationError, match="but the context holds 48"):
        runtime.generate(list(range(40)), max_new_tokens=10)


def test_wrong_format_version_and_truncated_onnx_are_refused(artifact_copy):
    manifest_path = artifact_copy / "manifest.json"
    manifest = manifest_path.read_text()
    manifest_path.write_text(manifest.replace('"format_version": 2', '"format_version": 99'))
    with pytest.raises(ModelSourceError, match=re.escape(
        f"artifact {artifact_copy} has format version 99, this skiptree reads 2; recompile it with "
        "skiptree compile from this version."
    )):  # fmt: skip
        skiptree.load(artifact_copy)
    manifest_path.write_text(manifest)
    graph = artifact_copy / "step.onnx"
    size = graph.stat().st_size
    graph.write_bytes(graph.read_bytes()[: size // 2])
    with pytest.raises(IntegrityError, match=re.escape(
        f"artifact file step.onnx has {size // 2} bytes, the manifest says {size}; the artifact is "
        "truncated or corrupted; recompile it with skiptree compile."
    )):  # fmt: skip
        skiptree.load(artifact_copy)


def test_recompiling_replaces_an_older_artifact(tiny_artifact, tmp_path):
    folder, _ = tiny_artifact
    out = tmp_path / "art"
    skiptree.compile(folder, out, max_seq_len=16, check=False)
    skiptree.compile(folder, out, max_seq_len=24, check=False)
    assert skiptree.load(out).manifest.max_seq_len == 24
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary folders left behind
