"""The drafter part of a speculative artifact: prompt lookup (nothing to build), a self-draft or a
trained feature head (graphs made by passes), or a draft model compiled next to the target
("draft_step.onnx"), which must share the target's tokenizer. A draft model's step graph goes
through the pass manager like the target's (build_draft_model_pipeline), so --verify, --dump-ir
(its own subfolder) and the pass record in the manifest cover it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from skiptree.compiler.ir.pass_manager import PassManager
from skiptree.compiler.ir.trace import trace_model
from skiptree.compiler.lower.quantize import quantize_onnx_file
from skiptree.compiler.lower.to_onnx import export_onnx
from skiptree.compiler.options import CompileOptions
from skiptree.compiler.pipeline import build_draft_model_pipeline
from skiptree.compiler.specs import CompileOptionError, FeatureHeadDraft, FreeDraft, SelfDraftSpec
from skiptree.models.config import ModelConfig
from skiptree.models.exit_adapter import load_trained
from skiptree.models.feature_head import KIND
from skiptree.models.loader import load_model
from skiptree.models.source import resolve_model_dir
from skiptree.runtime.manifest import (
    DrafterEntry,
    DraftModelEntry,
    FeatureHeadEntry,
    GraphName,
    PassEntry,
    SelfDraftEntry,
    TreeEntry,
)
from skiptree.runtime.tokenizer import Tokenizer


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, draft_source: str) -> None:
    if target.backend.get_vocab(with_added_tokens=True) != draft.backend.get_vocab(with_added_tokens=True):
        raise CompileOptionError(
            f"draft model {draft_source} has a different tokenizer than the target "
            f"({draft.vocab_size} vs {target.vocab_size} tokens, or different ids)",
            "pick a draft model from the target's family (same tokenizer), or --draft prompt-lookup",
        )


def build_drafter(options: CompileOptions, target_tokenizer: Tokenizer, target_config: ModelConfig,
                  building: Path, log: Callable[[str], None], draft_vocab: tuple[int, ...] = ()
                  ) -> DrafterEntry:  # fmt: skip
    """Compile the drafter into the artifact folder; returns its manifest entry (a free drafter's
    state, the verify cost and the draft vocabulary are added by compile)."""
    tree = TreeEntry(options.tree.spec, options.tree.parents, options.tree.depth, options.tree_provenance)
    entry = DrafterEntry(drafter="", tree=tree, max_tree=options.max_tree)
    draft = options.draft
    if isinstance(draft, FreeDraft):  # their state (a warm table, a corpus) is added by compile
        return replace(entry, drafter="+".join(draft.sources), sources=tuple(draft.sources))
    if isinstance(draft, FeatureHeadDraft):  # the graph came from the InsertFeatureHead pass
        _, record = load_trained(draft.weights, KIND)
        head = FeatureHeadEntry(GraphName.FEATURE_DRAFT, record)
        if draft.free:  # one merged tree: the head among the free drafters
            sources = tuple(draft.free.sources)
            return replace(entry, drafter="+".join((KIND, *sources)), sources=sources, feature_head=head)
        return replace(entry, drafter=KIND, feature_head=head)
    if isinstance(draft, SelfDraftSpec):  # the graph itself came from the SkipLayers pass
        layers, num_layers = tuple(draft.kept(target_config.num_layers)), target_config.num_layers
        return replace(entry, drafter="self", self_draft=SelfDraftEntry(
            str(draft), draft.kind, layers, len(layers) / num_layers))  # fmt: skip
    folder = resolve_model_dir(draft.source)
    check_same_tokenizer(target_tokenizer, Tokenizer.from_folder(folder), draft.source)
    dtype = getattr(torch, options.dtype)
    model = load_model(folder, dtype)
    if model.config.max_position_embeddings < options.max_seq_len:
        raise CompileOptionError(
            f"draft model context {model.config.max_position_embeddings} < max_seq_len {options.max_seq_len}",
            "lower --max-seq-len",
        )
    pipeline = build_draft_model_pipeline(draft_vocab)
    log(f"         draft model {draft.source}: tracing, {len(pipeline)} passes, lowering its step graph")
    ir = trace_model(model, options.max_seq_len)
    dump = None if options.dump_ir is None else Path(options.dump_ir) / "draft-model"
    ir = PassManager(pipeline, verify=options.verify, dump_dir=dump, log=log).run(ir)
    path = export_onnx(ir.graphs[GraphName.STEP], building / "draft_step.onnx")
    quantization = None
    if options.draft_quantize:  # a draft model's graph is all draft: quantise it whole
        quantization = quantize_onnx_file(path, options.draft_quantize, model.config.vocab_size)
    return replace(entry, drafter="draft-model", draft_model=DraftModelEntry(
        source=draft.source, model_type=model.config.model_type, config=model.config.to_json(),
        file=path.name, quantization=quantization,
        signature=ir.graphs[GraphName.STEP].signature_json(),
        pipeline=tuple(PassEntry(r.name, r.options, r.modified) for r in ir.passes_run)))  # fmt: skip
