"""`skiptree tune MODEL --train-draft exit-adapter --session DIR`: a trained cheap draft, end to end.

Phases (each persisted in the session; a rerun resumes): the shrunk head's tokens -> training data
(standard-library pieces + the target's continuations of the calibration prompts; held out: its
continuations of other prompts) -> adapter training (checkpointed) -> compile self:exit=E with the
adapter and shrunk head into the session -> backend costs -> the chain length by predicted
speed-up -> measured speed-up -> choice.json (plain unless the measured speed-up beats 1.0).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skiptree.compiler.compile import calibration_prompts, compile_model
from skiptree.compiler.drafters.self_draft_search import SelfDraftCosts, predict, target_continuations
from skiptree.compiler.drafters.vocab import frequent_tokens
from skiptree.compiler.options import CompileOptions
from skiptree.compiler.specs import SelfDraftSpec
from skiptree.compiler.train.exit_adapter import (
    TrainConfig,
    stdlib_pieces,
    teacher_forced,
    train_exit_adapter,
)
from skiptree.compiler.tune.measure import VERIFY_SIZES, measure_decode_ms, measure_speedup, measure_verify_ms
from skiptree.compiler.tune.self_draft import choice_header, measure_probe_ms
from skiptree.compiler.tune.session import TuneSession
from skiptree.models.base import CausalLM
from skiptree.models.loader import load_model
from skiptree.models.source import resolve_model_dir
from skiptree.runtime.artifact import Runtime, is_artifact
from skiptree.runtime.tokenizer import Tokenizer
from skiptree.runtime.tree import chain

HELD_OUT_PROMPTS = (
    "Explain the difference between a process and a thread.",
    "Write a Python function that counts the words in a text file.",
    "What is a closure in Python? Give a short example.",
)


@dataclass
class TrainingSetup:
    """What every --train-draft session starts from: the session, the target (float32) and its
    tokenizer, calibration and held-out prompts (token ids), and the shrunk head's tokens (persisted)."""

    session: TuneSession
    model: CausalLM
    tokenizer: Tokenizer
    options: CompileOptions
    calibration: list[list[int]]
    held_out: list[list[int]]
    size: int
    vocab: list[int]
    coverage: float

    @classmethod
    def open(cls, target: str, session_dir: Path, fingerprint: str, prompts: Sequence[str] | None,
             draft_vocab: int, log: Callable[[str], None]) -> TrainingSetup:  # fmt: skip
        session = TuneSession.open(Path(session_dir), fingerprint)
        folder = resolve_model_dir(target)
        model, tokenizer = load_model(folder, torch.float32), Tokenizer.from_folder(folder)
        options = CompileOptions(calibration_prompts=tuple(prompts or ()))
        calibration = calibration_prompts(options, tokenizer)
        held_out = calibration_prompts(CompileOptions(calibration_prompts=HELD_OUT_PROMPTS), tokenizer)
        size = min(draft_vocab or model.config.vocab_size, model.config.vocab_size)
        vocab, coverage = session.measure(
            "draft_vocab", f"size={size}", lambda: frequent_tokens(model, calibration, size), log
        )
        log(f"draft head: {size} tokens, covering {coverage:.3f} of the target's calibration outputs")
        return cls(session, model, tokenizer, options, calibration, held_out, size, list(vocab), coverage)


def tune_exit_adapter(
    target: str,
    session_dir: Path,
    fingerprint: str,
    device: dict[str, Any],
    exit_layer: int | None = None,
    draft_vocab: int = 8192,
    steps: int = 1500,
    corpus_tokens: int = 40_000,
    max_seq_len: int = 512,
    prefix: int = 256,
    max_new_tokens: int = 64,
    threads: int = 1,
    prompts: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    **_: Any,  # options of the other --train-draft kinds (distill_prompts)
) -> dict[str, Any]:
    session_dir = Path(session_dir)
    setup = TrainingSetup.open(target, session_dir, fingerprint, prompts, draft_vocab, log)
    session, model, tokenizer, calibration = setup.session, setup.model, setup.tokenizer, setup.calibration
    options, size, vocab, coverage = setup.options, setup.size, setup.vocab, setup.coverage
    count = model.config.num_layers
    exit_layer = exit_layer or max(1, round(count / 10))  # Kangaroo exits shallow (2 of 32 layers)
    config = TrainConfig(exit_layer, tuple(vocab), steps=steps)
    checkpoint = session_dir / "exit_adapter.safetensors"
    pieces, files = stdlib_pieces(tokenizer.encode, corpus_tokens)
    log(f"teacher-forcing {len(pieces)} standard-library pieces and {len(calibration)} continuations")
    own = target_continuations(model, calibration, max_new_tokens).sequences
    train = teacher_forced(model, [(1, p) for p in pieces] + own, exit_layer)
    held_out = target_continuations(model, setup.held_out, max_new_tokens).sequences
    held = teacher_forced(model, held_out, exit_layer)
    data = {
        "stdlib_files": len(files),
        "stdlib_tokens": len(pieces) * len(pieces[0]) if pieces else 0,
        "own_continuation_prompts": len(own),
        "held_out_prompts": list(HELD_OUT_PROMPTS),
    }
    record = session.measure(
        "adapter",
        f"exit={exit_layer},vocab={size},steps={steps}",
        lambda: train_exit_adapter(model, train, held, config, checkpoint, data, log),
        log,
    )
    log(
        f"exit after layer {exit_layer}: held-out acceptance {record['untrained_acceptance']:.3f} untrained "
        f"-> {record['held_out_acceptance']:.3f} trained ({record['train_positions']} positions, "
        f"{record['seconds']:.0f} s)"
    )
    spec = SelfDraftSpec("exit", exit_layer=exit_layer)
    artifact = session_dir / "artifact"
    compile_options = CompileOptions(
        max_seq_len=max_seq_len,
        draft=str(spec),
        tree="chain:1",
        check=False,
        draft_adapter=checkpoint,
        draft_vocab=size,
        calibration_prompts=options.calibration_prompts,
    )
    if not is_artifact(artifact):
        compile_model(target, artifact, compile_options, log=log)
    runtime = Runtime(artifact, threads=threads)
    prefix = min(prefix, max_seq_len // 2)
    decode_ms = session.measure(
        "decode_ms", f"prefix={prefix}", lambda: measure_decode_ms(runtime, prefix), log
    )
    verify_ms = {
        n: session.measure(
            "verify_ms", f"n={n},prefix={prefix}", lambda n=n: measure_verify_ms(runtime, n, prefix), log
        )
        for n in VERIFY_SIZES
        if n <= 8
    }
    draft_ms = session.measure(
        "self_draft_ms", f"exit={exit_layer},prefix={prefix}", lambda: measure_probe_ms(runtime, prefix), log
    )
    costs = SelfDraftCosts(decode_ms, verify_ms, exit_layer, draft_ms, count)
    best = predict(spec, record["held_out_acceptance"], costs)
    parents = list(chain(best["chain"]).parents)
    log(
        f"draft {draft_ms:.1f} ms = {draft_ms / decode_ms:.2f} of a {decode_ms:.1f} ms step; "
        f"chain {best['chain']}: predicted {best['speedup']:.2f}x"
    )
    measured = session.measure(
        "measured_speedup",
        json.dumps(parents),
        lambda: measure_speedup(runtime, parents, HELD_OUT_PROMPTS, max_new_tokens),
        log,
    )
    log(f"measured {measured:.2f}x (predicted {best['speedup']:.2f}x)")
    choice = {
        **choice_header(target, runtime, device, max_seq_len),
        "adapter": record,
        "draft_vocab": size,
        "vocab_coverage": coverage,  # in-sample: the calibration outputs the tokens were counted on
        "vocab_held_out_coverage": float(torch.isin(held[1], torch.tensor(vocab)).float().mean()),
        "decode_ms": decode_ms,
        "verify_ms": verify_ms,
        "draft_ms": draft_ms,
        "predicted_speedup": best["speedup"],
        "measured_speedup": measured,
        "parents": parents,
    }
    if measured > 1.0:
        choice.update(mode="speculative", draft=str(spec), draft_adapter=str(checkpoint))
    else:
        log("the trained draft does not beat plain decoding here: plain decoding chosen")
        choice.update(mode="plain", draft=None)
    session.write_choice(choice)
    return choice
