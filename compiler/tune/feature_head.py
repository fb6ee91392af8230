"""`skiptree tune MODEL --train-draft feature-head --session DIR`: train an EAGLE-style draft head,
then shape its tree with the same tuner as every other drafter.

Phases (each persisted in the session; a rerun resumes): the shrunk head's tokens -> training data:
the target's own greedy answers to `distill_prompts` requests made from the standard library's
docstrings (compiler/train/self_distill.py, batched), its continuations of the calibration prompts and
standard-library source pieces; held out: its continuations of other prompts -> training
(checkpointed safetensors, seeded) -> the ordinary tuning session (compiler/tune/driver.py) with
`--draft feature-head:WEIGHTS`: T(n), the head's cost per tree level, acceptance by rank and by
depth, Sequoia's DP, the measured speed-up of the chosen tree, or plain decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from skiptree.compiler.drafters.self_draft_search import target_continuations
from skiptree.compiler.train.exit_adapter import stdlib_pieces
from skiptree.compiler.train.feature_head import FeatureTrainConfig, train_feature_head
from skiptree.compiler.train.feature_head import teacher_forced_features as features_of
from skiptree.compiler.train.self_distill import distill, docstring_prompts
from skiptree.compiler.tune.exit_adapter import HELD_OUT_PROMPTS, TrainingSetup
from skiptree.compiler.tune.session import SessionError
from skiptree.models.feature_head import KIND, check_family


def tune_feature_head(
    target: str,
    session_dir: Path,
    fingerprint: str,
    draft_vocab: int = 8192,
    steps: int = 800,
    distill_prompts: int = 1024,
    corpus_tokens: int = 20_000,
    max_seq_len: int = 512,
    prefix: int = 256,
    max_new_tokens: int = 64,
    threads: int = 1,
    prompts: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    **_: Any,  # options of the other --train-draft kinds (exit_layer)
) -> dict[str, Any]:
    from skiptree.compiler.tune.driver import tune  # tune dispatches here: import at call time

    session_dir = Path(session_dir)
    setup = TrainingSetup.open(target, session_dir, fingerprint, prompts, draft_vocab, log)
    model, tokenizer, session = setup.model, setup.tokenizer, setup.session
    check_family(model.config)
    requests = docstring_prompts(distill_prompts)
    chat = tokenizer.chat_template is not None
    encoded = [tokenizer.apply_chat_template([{"role": "user", "content": text}]) if chat
               else tokenizer.encode(text) for text in requests]  # fmt: skip
    eos = model.config.eos_token_ids
    answers = session.measure("distilled", f"prompts={len(requests)},tokens={max_new_tokens}",
                              lambda: distill(model, encoded, max_new_tokens, eos=eos), log)  # fmt: skip
    config = FeatureTrainConfig(tuple(setup.vocab), steps=steps)
    checkpoint = session_dir / "feature_head.safetensors"
    key = (f"vocab={setup.size},steps={steps},unroll={config.unroll},answers={len(answers)},"
           f"corpus={corpus_tokens},tokens={max_new_tokens}")  # fmt: skip
    other = [k for kind, k in session.records if kind == "feature_head" and k != key]
    if other:  # its later measurements (acceptance, the artifact) belong to that head
        raise SessionError(f"session {session_dir} already holds a feature head trained with other settings "
                           f"({other[0]})", "use a new --session DIR for new settings")  # fmt: skip

    def train_head() -> dict[str, Any]:  # teacher forcing only when the head is not trained yet
        pieces, files = stdlib_pieces(tokenizer.encode, corpus_tokens)
        own = target_continuations(model, setup.calibration, max_new_tokens).sequences
        log(f"teacher-forcing {len(answers)} answers of the target, {len(own)} continuations and "
            f"{len(pieces)} standard-library pieces")  # fmt: skip
        train = features_of(model, [tuple(a) for a in answers] + own + [(1, p) for p in pieces])
        held = features_of(model, target_continuations(model, setup.held_out, max_new_tokens).sequences)
        data = {"target_answers": len(answers), "answer_tokens": sum(len(s) - f for f, s in answers),
                "answer_prompts": "standard-library docstrings (compiler/train/self_distill.py)",
                "own_continuation_prompts": len(own), "stdlib_files": len(files),
                "stdlib_tokens": sum(len(p) for p in pieces),
                "held_out_prompts": list(HELD_OUT_PROMPTS)}  # fmt: skip
        return train_feature_head(model, train, held, config, checkpoint, data, log)

    record = session.measure("feature_head", key, train_head, log)
    log(f"feature head: held-out acceptance of its first draft {record['untrained_acceptance']:.3f} "
        f"untrained -> {record['held_out_acceptance']:.3f} trained ({record['train_positions']} positions, "
        f"{record['seconds']:.0f} s)")  # fmt: skip
    return tune(target, session_dir, draft=f"{KIND}:{checkpoint}", prompts=prompts, max_seq_len=max_seq_len,
                prefix=prefix, max_new_tokens=max_new_tokens, threads=threads, log=log,
                draft_vocab=setup.size,
                extra={"feature_head": record, "vocab_coverage": setup.coverage})  # fmt: skip
