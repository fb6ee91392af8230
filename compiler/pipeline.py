"""The compile pipeline: which passes run, in which order, as data.

Phases, top to bottom (later issues fill them):
  1. structure   — drafts cut from or added to the target (SkipLayers, InsertFeatureHead, InsertEarlyExit)
  2. verification — the tree-verify step graph and KV compaction (InsertTreeVerify)
  3. cleanup     — dead ops left by the phases above (EliminateDeadCode)
  4. precision   — weights marked for int8 / int4 quantisation at lowering (QuantizeWeights)
A pass that is off keeps its place as nothing: the list is built, never branched around.
"""

from __future__ import annotations

from skiptree.compiler.ir.pass_manager import Pass
from skiptree.compiler.options import CompileOptions
from skiptree.compiler.specs import FeatureHeadDraft, SelfDraftSpec
from skiptree.passes.eliminate_dead_code import EliminateDeadCode
from skiptree.passes.insert_early_exit import InsertEarlyExit
from skiptree.passes.insert_feature_head import InsertFeatureHead
from skiptree.passes.insert_tree_verify import InsertTreeVerify
from skiptree.passes.quantize_weights import QuantizeWeights
from skiptree.passes.shrink_draft_vocab import ShrinkDraftVocab
from skiptree.passes.skip_layers import SkipLayers
from skiptree.runtime.manifest import GraphName


def build_pipeline(options: CompileOptions, draft_vocab: tuple[int, ...] = ()) -> list[Pass]:
    """The passes a compile with these options runs, in order (`draft_vocab`: the token ids a shrunk
    draft head keeps, counted by compiler/drafters/vocab.py)."""
    self_draft = options.draft if isinstance(options.draft, SelfDraftSpec) else None
    adapter = str(options.draft_adapter) if options.draft_adapter else None
    structure: list[Pass] = [SkipLayers(self_draft, adapter)] if self_draft else []
    if self_draft and draft_vocab:
        structure.append(ShrinkDraftVocab(draft_vocab, GraphName.SELF_DRAFT))
    if isinstance(options.draft, FeatureHeadDraft):
        structure.append(InsertFeatureHead(str(options.draft.weights), draft_vocab))
    if options.early_exit:
        structure.append(InsertEarlyExit(options.early_exit, draft_vocab))
    # A prefix exit's K/V and hidden states feed verification, which then starts at the exit layer.
    first_layer = self_draft.exit_layer if self_draft and self_draft.kind == "exit" else 0
    fused = options.backend == "onnxruntime"  # ORT's GroupQueryAttention; TVM keeps the decomposed ops
    plain = options.plain_decoding  # early exit needs the step graph
    verify = InsertTreeVerify(options.verify_tokens, first_layer, fused, plain, options.max_batch)
    verification: list[Pass] = [verify] if options.draft or plain else []
    cleanup: list[Pass] = [EliminateDeadCode()]
    roles = (("target", options.quantize), ("draft", options.draft_quantize))
    precision: list[Pass] = [QuantizeWeights.of(spec, role) for role, spec in roles if spec]
    return [*structure, *verification, *cleanup, *precision]


def build_draft_model_pipeline(draft_vocab: tuple[int, ...] = ()) -> list[Pass]:
    """The passes a separate draft model's step graph runs (its weights are quantised whole at
    lowering, compiler/drafters/build.py): its head shrunk to the target's frequent tokens (the same
    tokenizer, so the same ids), then cleanup."""
    structure: list[Pass] = [ShrinkDraftVocab(draft_vocab, GraphName.STEP)] if draft_vocab else []
    return [*structure, EliminateDeadCode()]
