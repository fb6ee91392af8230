"""Tuning sessions: persisted, resumable after a kill, refused on other hardware; the choice
falls back to plain decoding when no tree is predicted to pay."""

from __future__ import annotations

import json
import re

import pytest

from skiptree.compiler.options import CompileOptions
from skiptree.compiler.tune.choose import choose_tree
from skiptree.compiler.tune.driver import this_device, tune, tuned_options
from skiptree.compiler.tune.session import MEASUREMENTS, SessionError, TuneSession, read_choice


def test_choice_is_plain_when_verification_costs_too_much():
    acceptance = {"acceptance": [0.2, 0.05], "hit_rate": 0.3, "draft_ms_per_node": 0.5}
    verify_ms = {1: 48.0, 2: 52.0, 4: 60.0, 8: 90.0}  # a one-token step costs 35 ms
    choice = choose_tree(acceptance, verify_ms, decode_ms=35.0)
    assert choice["mode"] == "plain" and choice["predicted_speedup"] == 1.0
    assert all(c["predicted_speedup"] < 1.0 for c in choice["candidates"])


def test_choice_follows_the_measured_costs():
    acceptance = {"acceptance": [0.7, 0.1], "hit_rate": 1.0, "draft_ms_per_node": 0.0}
    flat = choose_tree(acceptance, {1: 10.0, 4: 10.5, 16: 11.0}, decode_ms=10.0)  # GPU-like T(n)
    steep = choose_tree(acceptance, {1: 10.0, 4: 16.0, 16: 40.0}, decode_ms=10.0)  # CPU-like T(n)
    assert flat["nodes"] == 16 and steep["nodes"] < 16
    assert flat["predicted_speedup"] > steep["predicted_speedup"] > 1.0


def test_session_survives_a_torn_line_and_ignores_other_devices(tmp_path):
    session = TuneSession.open(tmp_path, "device-a")
    session.put("verify_ms", "n=1", 3.5)
    TuneSession.open(tmp_path, "device-b").put("verify_ms", "n=1", 99.0)
    with open(tmp_path / MEASUREMENTS, "a") as handle:
        handle.write('{"fingerprint": "device-a", "kind": "verify_ms", "key": "n=2", "val')  # killed
    again = TuneSession.open(tmp_path, "device-a")
    assert again.get("verify_ms", "n=1") == 3.5 and again.get("verify_ms", "n=2") is None


def test_tune_resumes_and_compile_uses_its_choice(tiny_artifact, tmp_path):
    folder, _ = tiny_artifact
    session_dir = tmp_path / "session"
    messages: list[str] = []
    first = tune(str(folder), session_dir, max_seq_len=64, max_new_tokens=12, log=messages.append)
    taken = len((session_dir / MEASUREMENTS).read_text().splitlines())
    assert taken >= 7  # decode, verify grid, acceptance (+ measured speed-up)
    assert first["mode"] in ("plain", "speculative") and "predicted_speedup" in first
    report = (session_dir / "report.md").read_text()
    assert "| draft nodes n | verify ms T(n) | T(n) / plain step |" in report and "Choice:" in report
    assert (session_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    messages.clear()
    second = tune(str(folder), session_dir, max_seq_len=64, max_new_tokens=12, log=messages.append)
    assert not any(m.startswith("  measuring") for m in messages)  # everything reused
    assert len((session_dir / MEASUREMENTS).read_text().splitlines()) == taken
    assert second["parents"] == first["parents"]
    options = tuned_options(session_dir, CompileOptions())
    assert (options.draft and str(options.draft)) == (None if first["mode"] == "plain" else "prompt-lookup")


def test_a_session_from_another_machine_is_refused(tmp_path):
    _, fingerprint = this_device()
    (tmp_path / "choice.json").write_text(json.dumps({"fingerprint": "0123456789abcdef",
                                                     "device": {"cpu": "Other CPU"}}))  # fmt: skip
    with pytest.raises(SessionError, match=re.escape(
        f"session {tmp_path} was tuned for device 0123456789abcdef (Other CPU), this machine is "
        f"{fingerprint}; run skiptree tune on this machine"
    )):  # fmt: skip
        read_choice(tmp_path, fingerprint)
    with pytest.raises(SessionError, match="holds no finished tuning session"):
        read_choice(tmp_path / "empty", fingerprint)


def test_a_session_for_another_model_is_refused_unless_forced(tmp_path):
    _, fingerprint = this_device()
    (tmp_path / "choice.json").write_text(json.dumps({
        "fingerprint": fingerprint, "target": "other-model", "model_sha256": "ab" * 32, "mode": "plain"}))
    with pytest.raises(SessionError, match=re.escape(
        f"session {tmp_path} was tuned for another model (other-model, weights sha256 abababababab...); "
        "tune this model in its own session, or pass --force to use the tree anyway."
    )):  # fmt: skip
        read_choice(tmp_path, fingerprint, model_sha256="cd" * 32)
    assert read_choice(tmp_path, fingerprint, model_sha256="cd" * 32, force=True)["mode"] == "plain"


def test_resume_after_sigkill(tiny_artifact, tmp_path):
    """A real tuner process killed with SIGKILL mid-session: the rerun keeps what was measured."""
    import os
    import signal
    import subprocess
    import sys
    import time

    folder, _ = tiny_artifact
    session_dir = tmp_path / "session"
    command = [sys.executable, "-m", "skiptree", "tune", str(folder), "--session", str(session_dir),
               "--max-seq-len", "64", "--max-new-tokens", "12"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    measurements = session_dir / MEASUREMENTS
    while time.time() < deadline and process.poll() is None:
        if measurements.is_file() and len(measurements.read_text().splitlines()) >= 3:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the tuner finished before it could be killed"
    kept = [json.loads(line) for line in measurements.read_text().splitlines() if line.endswith("}")]
    assert len(kept) >= 3
    messages: list[str] = []
    tune(str(folder), session_dir, max_seq_len=64, max_new_tokens=12, log=messages.append)
    assert messages[0] == f"session {session_dir}: {len(kept)} measurements already taken on this device"
    retaken = {m.removeprefix("  measuring ") for m in messages if m.startswith("  measuring")}
    assert not retaken & {f"{r['kind']} {r['key']}" for r in kept}
    assert (session_dir / "choice.json").is_file()


def test_draft_model_levels_are_priced_by_width():
    from skiptree.compiler.tune.choose import draft_ms

    level_ms = {1: 2.0, 2: 2.5, 4: 3.0, 8: 4.0}
    # k-ary 2x2: the draft model runs the root (width 1), then the 2 depth-1 nodes (width 2)
    assert draft_ms((-1, -1, 0, 0, 1, 1), 0.0, level_ms) == 2.0 + 2.5
    assert draft_ms((-1, 0, 1), 0.0, level_ms) == 2.0 * 3  # a chain: one call per level
    assert draft_ms((-1, 0, 1), 0.1, {}) == pytest.approx(0.3)  # lookups: per node


def test_noisy_costs_cannot_make_a_big_tree_look_cheap():
    from skiptree.compiler.tune.choose import monotone

    noisy = {1: 746.5, 2: 1015.9, 4: 980.8, 8: 1256.3, 16: 809.2, 32: 1519.9}  # measured under load
    assert monotone(noisy) == {1: 746.5, 2: 1015.9, 4: 1015.9, 8: 1256.3, 16: 1256.3, 32: 1519.9}
    acceptance = {"acceptance": [0.65, 0.1, 0.04], "hit_rate": 1.0, "draft_ms_per_node": 0.0}
    candidates = choose_tree(acceptance, noisy, decode_ms=579.5)["candidates"]
    best = {n: max(c["predicted_speedup"] for c in candidates if c["nodes"] == n) for n in (8, 16)}
    # at face value T(16) = 809 ms would predict 16 nodes far faster than 8; priced at >= T(8) it is not
    assert best[16] < best[8] * 1.2


def test_draft_levels_cost_at_most_a_wider_level():
    from skiptree.compiler.tune.choose import padded_level_ms

    padded = padded_level_ms({1: 279.0, 2: 180.0, 4: 215.0, 8: 455.0})
    assert padded == {1: 180.0, 2: 180.0, 4: 215.0, 8: 455.0}


def test_tvm_session_tunes_schedules_measures_tvm_and_compiles_for_tvm(tiny_artifact, tmp_path):
    """--backend tvm: MetaSchedule into the session, T(n) on the tuned TVM code, a TVM artifact."""
    from skiptree.compiler.compile import compile_model
    from skiptree.compiler.lower.tvm_tune import recorded_trials
    from skiptree.compiler.tune.driver import BackendChoice

    folder, _ = tiny_artifact
    session_dir = tmp_path / "session"
    messages: list[str] = []
    choice = tune(str(folder), session_dir, max_seq_len=16, max_new_tokens=6, log=messages.append,
                  prompts=["t5 t6 t7 t5 t6", "t9 t8 t9 t8"],
                  backend=BackendChoice("tvm", trials=3, trials_per_task=1, only=("softmax",)))  # fmt: skip
    assert choice["backend"] == "tvm" and choice["device"]["backend"] == "tvm"
    assert recorded_trials(session_dir / "tvm_database") >= 1
    manifest = json.loads((session_dir / "artifact" / "manifest.json").read_text())
    assert manifest["backend"]["name"] == "tvm"
    assert manifest["graphs"]["verify"]["static_tokens"] == [1, 2, 3, 5]  # the T(n) grid + root
    assert set(choice["verify_ms"]) == {1, 2, 4}
    options = tuned_options(session_dir, CompileOptions())
    assert options.backend == "tvm" and options.tvm_database == session_dir / "tvm_database"
    if choice["mode"] != "plain":
        artifact = compile_model(folder, tmp_path / "tuned", options, log=messages.append)
        assert json.loads((artifact / "manifest.json").read_text())["backend"]["name"] == "tvm"


def test_a_tuned_tree_records_its_provenance_in_the_manifest(tiny_artifact, tmp_path):
    """compile --tuned: the artifact's tree says which session chose it, on which machine, from which
    measured acceptance and T(n) (a tree given by hand has none: tests/runtime/test_manifest.py)."""
    import skiptree
    from skiptree.compiler.compile import compile_model
    from skiptree.runtime.manifest import DeviceEntry, TreeProvenance

    folder, _ = tiny_artifact
    device, fingerprint = this_device()
    session_dir = tmp_path / "session"
    TuneSession.open(session_dir, fingerprint).write_choice({  # as the draft-tree strategy writes it
        "target": str(folder), "device": device, "max_seq_len": 48, "draft": "prompt-lookup",
        "mode": "speculative", "parents": [-1, 0, 0], "decode_ms": 1.5, "verify_ms": {1: 1.7, 2: 1.9},
        "acceptance": {"acceptance": [0.6, 0.2], "hit_rate": 0.9, "draft_ms_per_node": 0.0},
        "predicted_speedup": 1.3, "measured_speedup": 1.2})  # fmt: skip
    options = tuned_options(session_dir, CompileOptions(check=False))
    provenance = TreeProvenance(
        session=str(session_dir), device=DeviceEntry.from_json({**device, "fingerprint": fingerprint}),
        forced=False, acceptance=(0.6, 0.2), decode_ms=1.5, verify_ms={"1": 1.7, "2": 1.9},
        predicted_speedup=1.3, measured_speedup=1.2)  # fmt: skip
    assert options.tree_provenance == provenance
    runtime = skiptree.load(compile_model(folder, tmp_path / "tuned", options, log=lambda message: None))
    tree = runtime.manifest.speculative.tree
    assert (tree.parents, tree.spec) == ((-1, 0, 0), str(session_dir / "tree.json"))
    assert tree.provenance == provenance
    written = json.loads((tmp_path / "tuned" / "manifest.json").read_text())["speculative"]["tree"]
    assert written["provenance"]["device"]["fingerprint"] == fingerprint
    assert written["provenance"]["verify_ms"] == {"1": 1.7, "2": 1.9}

    chain = tmp_path / "self-draft"  # a chain chosen by the self-draft search, used with --force
    TuneSession.open(chain, "another-machine").write_choice({
        "target": str(folder), "device": device, "max_seq_len": 48, "draft": "self:skip=1",
        "mode": "speculative", "parents": [-1, 0], "decode_ms": 1.5, "verify_ms": {"1": 1.7},
        "candidates": [{"draft": "self:skip=1", "acceptance": 0.55}], "predicted_speedup": 1.1,
        "measured_speedup": 1.05})  # fmt: skip
    chosen = tuned_options(chain, CompileOptions(check=False), force=True).tree_provenance
    assert (chosen.acceptance, chosen.forced, chosen.device.fingerprint) == ((0.55,), True, "another-machine")
