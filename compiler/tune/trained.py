"""Strategies for trained drafts: `skiptree tune MODEL --train-draft exit-adapter|feature-head`.

Both start from `TrainingSetup` (the target, its shrunk head's tokens, calibration and held-out
prompts) and persist every phase in the session (a rerun resumes; training is checkpointed).

exit-adapter (Kangaroo): training data (standard-library pieces + the target's continuations of the
calibration prompts; held out: its continuations of other prompts) -> adapter training -> compile
self:exit=E with the adapter and shrunk head into the session -> backend costs -> the chain length
by predicted speed-up -> measured speed-up -> plain unless the measured speed-up beats 1.0.

feature-head (EAGLE): training data: the target's own greedy answers to `distill_prompts` requests
made from the standard library's docstrings (compiler/train/self_distill.py, batched), its
continuations of the calibration prompts and standard-library source pieces -> training -> the
tree strategy (compiler/tune/draft_tree.py) with `--draft feature-head:WEIGHTS+lookup+recycle` (one
tree, gated per step). Training runs in chunks of at most TRAIN_CHUNK_SECONDS: the command stops
after a chunk and the same command resumes from the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from skiptree.compiler.compile import calibration_prompts, weights_sha256
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
from skiptree.compiler.train.feature_head import FeatureTrainConfig, train_feature_head
from skiptree.compiler.train.feature_head import teacher_forced_features as features_of
from skiptree.compiler.train.self_distill import distill, docstring_prompts
from skiptree.compiler.train.self_requests import RequestSettings, self_written_requests
from skiptree.compiler.tune.context import Outcome, TrainSettings, TuneContext
from skiptree.compiler.tune.draft_tree import tune_draft_tree
from skiptree.compiler.tune.measure import measure_probe_ms, measure_speedup
from skiptree.compiler.tune.session import SessionError, TuneSession
from skiptree.models.base import CausalLM
from skiptree.models.feature_head import KIND, check_family
from skiptree.models.loader import load_model
from skiptree.models.source import resolve_model_dir
from skiptree.models.zoo import skiptree_home
from skiptree.runtime.tokenizer import Tokenizer
from skiptree.runtime.tree import chain

TRAIN_CHUNK_SECONDS = 15 * 60  # feature-head training returns after a checkpoint past this; a rerun resumes
HEAD_WITH = "lookup+recycle"  # the free drafters proposing in the feature head's tree

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
    def open(cls, context: TuneContext, draft_vocab: int) -> TrainingSetup:
        session, log = context.session, context.log
        folder = resolve_model_dir(context.target)
        model, tokenizer = load_model(folder, torch.float32), Tokenizer.from_folder(folder)
        options = CompileOptions(calibration_prompts=context.settings.prompts)
        calibration = calibration_prompts(options, tokenizer)
        held_out = calibration_prompts(CompileOptions(calibration_prompts=HELD_OUT_PROMPTS), tokenizer)
        size = min(draft_vocab or model.config.vocab_size, model.config.vocab_size)
        vocab, coverage = session.measure(
            "draft_vocab", f"size={size}", lambda: frequent_tokens(model, calibration, size), log
        )
        log(f"draft head: {size} tokens, covering {coverage:.3f} of the target's calibration outputs")
        return cls(session, model, tokenizer, options, calibration, held_out, size, list(vocab), coverage)


def tune_exit_adapter(context: TuneContext, train: TrainSettings, draft_vocab: int = 8192, steps: int = 1500,
                      corpus_tokens: int = 40_000) -> Outcome:  # fmt: skip
    """`train` overrides the keyword defaults; the exit layer defaults to L/10 (Kangaroo exits
    shallow: 2 of 32 layers)."""
    given = train.given()
    draft_vocab, steps = given.get("draft_vocab", draft_vocab), given.get("steps", steps)
    settings, log, session_dir = context.settings, context.log, context.folder
    new_tokens = settings.max_new_tokens
    setup = TrainingSetup.open(context, draft_vocab)
    session, model, tokenizer, calibration = setup.session, setup.model, setup.tokenizer, setup.calibration
    size, vocab, coverage = setup.size, setup.vocab, setup.coverage
    count = model.config.num_layers
    exit_layer = given.get("exit_layer") or max(1, round(count / 10))
    config = TrainConfig(exit_layer, tuple(vocab), steps=steps)
    checkpoint = session_dir / "exit_adapter.safetensors"
    pieces, files = stdlib_pieces(tokenizer.encode, corpus_tokens)
    log(f"teacher-forcing {len(pieces)} standard-library pieces and {len(calibration)} continuations")
    own = target_continuations(model, calibration, new_tokens).sequences
    examples = teacher_forced(model, [(1, p) for p in pieces] + own, exit_layer)
    held_out = target_continuations(model, setup.held_out, new_tokens).sequences
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
        lambda: train_exit_adapter(model, examples, held, config, checkpoint, data, log),
        log,
    )
    log(
        f"exit after layer {exit_layer}: held-out acceptance {record['untrained_acceptance']:.3f} untrained "
        f"-> {record['held_out_acceptance']:.3f} trained ({record['train_positions']} positions, "
        f"{record['seconds']:.0f} s)"
    )
    spec = SelfDraftSpec("exit", exit_layer=exit_layer)
    runtime = context.artifact("artifact", CompileOptions(
        max_seq_len=settings.max_seq_len, draft=spec, tree="chain:1", check=False, draft_adapter=checkpoint,
        draft_vocab=size, calibration_prompts=setup.options.calibration_prompts))  # fmt: skip
    prefix = settings.context
    decode_ms, verify_ms = context.step_costs(runtime, max_nodes=8)
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
        lambda: measure_speedup(runtime, parents, HELD_OUT_PROMPTS, new_tokens),
        log,
    )
    log(f"measured {measured:.2f}x (predicted {best['speedup']:.2f}x)")
    choice = {
        **context.choice_header(runtime),
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
    return Outcome(choice)


def own_requests(context: TuneContext, model: CausalLM, tokenizer: Tokenizer, count: int
                 ) -> tuple[list[str], dict[str, Any]]:  # fmt: skip
    """`count` requests the target writes itself, cached by its weights' sha256 (resumable chunks),
    with the synthesis record (also kept in the session)."""
    if count <= 0:
        return [], {}
    settings = RequestSettings()
    key = f"count={count},{settings.key}"

    def write() -> dict[str, Any]:  # the weights are hashed only when the session lacks the requests
        folder = skiptree_home() / "requests" / weights_sha256(resolve_model_dir(context.target))[:16]
        requests, record = self_written_requests(model, tokenizer, count, folder, settings, log=context.log)
        return {"requests": requests, "record": record}

    synthesis = context.measured("self_written_requests", key, write)
    return list(synthesis["requests"]), {**synthesis["record"], "key": key}


def tune_feature_head(context: TuneContext, train: TrainSettings, draft_vocab: int = 8192, steps: int = 800,
                      distill_prompts: int = 512, self_requests: int = 512, corpus_tokens: int = 20_000
                      ) -> Outcome:  # fmt: skip
    """`train` overrides the keyword defaults. `self_requests`: requests the target writes itself
    (chat models only), answered with the `distill_prompts` docstring requests."""
    given = train.given()
    draft_vocab, steps = given.get("draft_vocab", draft_vocab), given.get("steps", steps)
    distill_prompts = given.get("distill_prompts", distill_prompts)
    log, session_dir, new_tokens = context.log, context.folder, context.settings.max_new_tokens
    setup = TrainingSetup.open(context, draft_vocab)
    model, tokenizer, session = setup.model, setup.tokenizer, setup.session
    check_family(model.config)
    chat = tokenizer.chat_template is not None
    self_requests = given.get("self_requests", self_requests) if chat else 0
    written, synthesis = own_requests(context, model, tokenizer, self_requests)
    requests = docstring_prompts(distill_prompts) + written
    encoded = [tokenizer.apply_chat_template([{"role": "user", "content": text}]) if chat
               else tokenizer.encode(text) for text in requests]  # fmt: skip
    eos = model.config.eos_token_ids
    mix = f"docstrings={distill_prompts},self_written={len(written)}"
    mix += f",{synthesis['key']}" if written else ""
    answers = session.measure("distilled", f"prompts={len(requests)},{mix},tokens={new_tokens}",
                              lambda: distill(model, encoded, new_tokens, eos=eos), log)  # fmt: skip
    config = FeatureTrainConfig(tuple(setup.vocab), steps=steps, max_seconds=TRAIN_CHUNK_SECONDS)
    checkpoint = session_dir / "feature_head.safetensors"
    key = (f"vocab={setup.size},steps={steps},unroll={config.unroll},answers={len(answers)},{mix},"
           f"corpus={corpus_tokens},tokens={new_tokens}")  # fmt: skip
    other = [k for kind, k in session.records if kind == "feature_head" and k != key]
    if other:  # its later measurements (acceptance, the artifact) belong to that head
        raise SessionError(f"session {session_dir} already holds a feature head trained with other settings "
                           f"({other[0]})", "use a new --session DIR for new settings")  # fmt: skip

    def train_head() -> dict[str, Any]:  # teacher forcing only when the head is not trained yet
        pieces, files = stdlib_pieces(tokenizer.encode, corpus_tokens)
        own = target_continuations(model, setup.calibration, new_tokens).sequences
        log(f"teacher-forcing {len(answers)} answers of the target, {len(own)} continuations and "
            f"{len(pieces)} standard-library pieces")  # fmt: skip
        examples = features_of(model, [tuple(a) for a in answers] + own + [(1, p) for p in pieces])
        held = features_of(model, target_continuations(model, setup.held_out, new_tokens).sequences)
        data = {"target_answers": len(answers), "answer_tokens": sum(len(s) - f for f, s in answers),
                "answer_prompts": {"docstrings (compiler/train/self_distill.py)": distill_prompts,
                                   "self-written (compiler/train/self_requests.py)": len(written)},
                "self_written_requests": synthesis,
                "own_continuation_prompts": len(own), "stdlib_files": len(files),
                "stdlib_tokens": sum(len(p) for p in pieces),
                "held_out_prompts": list(HELD_OUT_PROMPTS)}  # fmt: skip
        return train_feature_head(model, examples, held, config, checkpoint, data, log)

    record = session.get("feature_head", key)
    if record is None:  # trained in chunks: a record is kept only once training has finished
        log(f"  measuring feature_head {key}")
        record = train_head()
        if not record["finished"]:
            raise SessionError(f"feature-head training stopped at step {record['step']} of {steps} "
                               f"(a {config.max_seconds / 60:.0f}-minute chunk)",
                               "run the same skiptree tune command again to resume")  # fmt: skip
        session.put("feature_head", key, record)
    depths = ", ".join(f"{a:.3f}" for a in record.get("held_out_acceptance_by_depth", ()))
    log(f"feature head: held-out acceptance of its first draft {record['untrained_acceptance']:.3f} "
        f"untrained -> {record['held_out_acceptance']:.3f} trained (by depth: {depths}; "
        f"{record['train_positions']} positions, {record['seconds']:.0f} s)")  # fmt: skip
    # one tree with the free drafters: the gate then verifies only what pays, head or not
    return tune_draft_tree(context, f"{KIND}:{checkpoint}+{HEAD_WITH}", draft_vocab=setup.size,
                           extra={"feature_head": record, "vocab_coverage": setup.coverage})
