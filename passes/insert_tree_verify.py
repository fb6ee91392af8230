"""InsertTreeVerify: a graph that verifies a whole draft tree in one target step, and KV compaction.

The verify graph takes the tree itself, not a mask: `tokens [1, T]` (node 0 is the root, the last
accepted token, whose K/V are not cached yet; nodes 1..T-1 are drafts), `parents [T]` (the parent
of each node in the same numbering; the root's entry is ignored) and `prefix_len [1]` (tokens
already cached). In-graph it derives

    ancestors   A = closure of (I + parent edges)  by repeated squaring (no value-dependent loop)
    positions   prefix_len + depth,  depth[i] = |ancestors of i| - 1
    write slots prefix_len + i
    attn bias   slot s visible from node i  iff  s < prefix_len  or  A[i, s - prefix_len]

and returns `next_ids [T]` (the target's argmax after each node: all that greedy verification
needs), `logits [1, T, V]` (bound only by sampling verification, which needs the target's
distribution at every node) and `features [1, T, H]`, the last layer's output before the final
norm (bound only by a feature-level draft head, which drafts from them). With an EAGLE-3 head on the
IR (put there by InsertFeatureHead), `features` is instead its fused input u = fuse([h^low ; h^mid ;
h^high]) of the streams after its `feature_layers` (models/feature_head.py): one [T, 3H] x [3H, H]
product more, next to the target's L layers, and the drafter's contract stays [1, T, H].

The compact graph moves accepted K/V into contiguous slots: `cache[:, :, to] = cache[:, :, from]`
for each layer, in place (one ScatterND per cache, aliased like the step graph's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from skiptree.compiler.ir.graph import ModelIR, TensorSpec, build_block_view
from skiptree.compiler.ir.pass_manager import Pass, PassResult
from skiptree.compiler.ir.trace import example_caches, export_with_caches
from skiptree.models.base import CausalLM, mask_value
from skiptree.models.feature_head import FeatureHead
from skiptree.models.fused_ops import rotary_tables
from skiptree.runtime.manifest import GraphName


def tree_ancestors(parents: torch.Tensor, squarings: int) -> torch.Tensor:
    """[..., T, T] float, A[i, j] = 1 iff j is i or an ancestor of i, for parents [..., T] (one tree,
    or a batch of trees). parents[0] (the root) is ignored."""
    steps = parents.shape[-1]
    nodes = torch.arange(steps)
    # where(), not clamp(min=0): TVM legalises an int clamp's open bound as an infinite int
    edges = (torch.where(parents > 0, parents, 0)[..., :, None] == nodes[None, :]) & (nodes[:, None] > 0)
    reach = (edges | (nodes[:, None] == nodes[None, :])).float()
    for _ in range(squarings):  # after k squarings, paths of length up to 2^k are covered
        reach = (reach @ reach).clamp(max=1.0)
    return reach


class TreeVerifyModule(nn.Module):
    """verify(tokens, parents, prefix_len, *caches) -> (next_ids, logits, features, *caches).

    With `first_layer` E > 0 it runs layers E..L-1 only and its first input is `hidden [1, T, H]`,
    the residual stream after layer E-1 (from a prefix-exit self-draft that ran layers < E for these
    tokens and cached their K/V): verification does not compute those layers again (LayerSkip).
    With `feature_head` (an EAGLE-3 head), `features` is its fused input (`fuse_streams` of the
    streams after its `layers`); the logits and next_ids do not depend on it.
    """

    def __init__(self, model: CausalLM, max_seq_len: int, max_tree: int, first_layer: int = 0,
                 fused_attention: bool = False, causal: bool = False, batched: bool = False,
                 feature_head: FeatureHead | None = None):  # fmt: skip
        super().__init__()
        # only the fuse: the head's block is the "feature_draft" graph's (the attribute's name puts
        # the product in the head block, compiler/ir/graph.py's DRAFT_HEAD_PARTS)
        self.feature_head = feature_head.fuse if feature_head is not None else None
        self.streams = feature_head.layers if feature_head is not None else ()
        if self.streams and min(self.streams) < first_layer:
            raise ValueError(f"the feature head fuses streams {self.streams}; verification starts at "
                             f"layer {first_layer}")
        self.batched = batched  # a batch of trees: tokens [B, T], parents [B, T], prefix_len [B]
        self.model = model
        self.fused_attention = fused_attention
        self.max_seq_len = max_seq_len
        self.squarings = max(1, math.ceil(math.log2(max_tree)))
        self.causal = causal  # plain decoding: every call is a chain, `parents` is not read
        self.layers = list(range(first_layer, model.config.num_layers))

    def forward(self, tokens, parents, prefix_len, *caches):
        if self.batched:
            return self.forward_batch(tokens, parents, prefix_len, caches)
        steps = tokens.shape[1]
        if self.causal:  # a chain's closure, without the squarings (O(T^3): prefill runs long chunks)
            nodes = torch.arange(steps)
            ancestors = (nodes[None, :] <= nodes[:, None]).float()
        else:
            ancestors = tree_ancestors(parents, self.squarings)  # [T, T]
        depth = ancestors.sum(-1).to(torch.int64) - 1
        positions = (prefix_len + depth)[None]  # [1, T]
        write_slots = prefix_len + torch.arange(steps)
        slots = torch.arange(self.max_seq_len)
        visible = (slots < prefix_len)[None, :].expand(steps, -1).float()  # cached prefix
        visible = visible.index_put((torch.arange(steps)[:, None], write_slots[None, :]), ancestors)
        dtype = caches[0].dtype
        # where(), not (1 - visible) * min: min(float64) is -inf in float32, and 0 * -inf is NaN
        zero = torch.zeros((), dtype=dtype)
        bias = torch.where(visible > 0, zero, torch.full((), mask_value(dtype), dtype=dtype))[None, None]
        count = len(self.layers)
        if self.layers[0] == 0:
            x, context = self.model.embed_step(tokens, positions)
        else:
            x, context = tokens, self.model.layer_context(positions, dtype)
        if self.fused_attention:
            logits, streams, caches = self.fused_layers(x, positions, prefix_len, bias, caches)
        else:
            streams = {self.layers[0]: x}
            for j, layer in enumerate(self.layers):
                x = self.model.run_layer(layer, x, context, bias, caches[j], caches[count + j], write_slots)
                streams[layer + 1] = x
            logits = self.model.finish(x)
        return (logits.argmax(-1)[0], logits, self.features(streams), *caches)

    def features(self, streams: dict) -> torch.Tensor:
        """`features` from the streams after i layers (i -> [B, T, H]): the last one, or the head's u."""
        if self.feature_head is None:
            return streams[self.model.config.num_layers]
        return self.feature_head(torch.cat([streams[i] for i in self.streams], dim=-1))

    def forward_batch(self, tokens, parents, prefix_len, caches):
        """A batch of trees, one per cache row: every row computed as it would be alone, so a
        request's tokens do not depend on its batch. Decomposed attention: ORT's GroupQueryAttention
        takes a batch only one token per row. Returns next_ids [B, T]."""
        steps = tokens.shape[1]
        if self.causal:  # chains (plain decoding): the triangle, as `forward`
            nodes = torch.arange(steps)
            ancestors = (nodes[None, :] <= nodes[:, None]).float().expand(tokens.shape[0], -1, -1)
        else:
            ancestors = tree_ancestors(parents, self.squarings)  # [B, T, T]
        positions = prefix_len[:, None] + ancestors.sum(-1).to(torch.int64) - 1  # [B, T]
        write_slots = prefix_len[:, None] + torch.arange(steps)
        slots = torch.arange(self.max_seq_len)
        visible = (slots[None, None, :] < prefix_len[:, None, None]).expand(-1, steps, -1).float()
        visible = visible.scatter(2, write_slots[:, None, :].expand(-1, steps, -1), ancestors)
        dtype = caches[0].dtype
        zero = torch.zeros((), dtype=dtype)
        bias = torch.where(visible > 0, zero, torch.full((), mask_value(dtype), dtype=dtype))[:, None]
        x, context = self.model.embed_step(tokens, positions)
        count, streams = len(self.layers), {0: x}
        for j, layer in enumerate(self.layers):
            x = self.model.run_layer(layer, x, context, bias, caches[j], caches[count + j], write_slots)
            streams[layer + 1] = x
        logits = self.model.finish(x)
        return (logits.argmax(-1), logits, self.features(streams), *caches)

    def fused_layers(self, x, positions, prefix_len, bias, caches):
        """The layers and the head through the model's fused ops (ONNX Runtime): attention appends at
        slots prefix_len + i (the write slots above) and rotates by `positions` itself. Returns the
        logits, the streams `features` needs (layers run -> [1, T, H]) and the new caches."""
        total = prefix_len + x.shape[1]
        cos, sin = rotary_tables(self.model.inv_freq, self.max_seq_len)
        lengths = ((total - 1).to(torch.int32), total.to(torch.int32).reshape(()))
        attention = (*lengths, cos, sin, positions, bias)
        count, keys, values, pending = len(self.layers), [], [], None
        streams = {self.layers[0]: x}
        for j, layer in enumerate(self.layers):
            x, pending, key, value = self.model.run_layer_fused(layer, x, pending, attention, caches[j],
                                                                caches[j + count])  # fmt: skip
            keys.append(key)
            values.append(value)
            if layer + 1 in self.streams and layer + 1 < self.model.config.num_layers:
                streams[layer + 1] = x + pending  # one add, for the features only: the logits' ops are kept
        logits, streams[self.model.config.num_layers] = self.model.finish_fused(x, pending)
        return logits, streams, (*keys, *values)


class CompactModule(nn.Module):
    """compact(from_slots, to_slots, *caches) -> caches with slots `to` overwritten by slots `from`."""

    def forward(self, from_slots, to_slots, *caches):
        batch, heads = caches[0].shape[:2]
        dim = caches[0].shape[3]
        index = (torch.arange(batch).view(batch, 1, 1, 1), torch.arange(heads).view(1, heads, 1, 1),
                 to_slots.view(1, 1, -1, 1), torch.arange(dim).view(1, 1, 1, dim))  # fmt: skip
        for cache in caches:
            cache.index_put_(index, cache.index_select(2, from_slots))
        return caches


@dataclass(frozen=True)
class InsertTreeVerify(Pass):
    """Add the "verify" and "compact" graphs for trees of up to `max_tree` tokens (root included).

    Requires: the IR of a model (any family). Guarantees: the "step" graph is untouched; "verify"
    and "compact" share its cache layout, so one set of cache buffers serves all three.
    With `first_layer` E > 0 (a prefix-exit self-draft), "verify" takes `hidden` instead of `tokens`
    and has caches for layers E..L-1 only (see `TreeVerifyModule`). With `fused_attention`, a model
    that supports it attends through `skiptree.models.fused_ops` (ONNX Runtime lowering only:
    TVM has no such op), same inputs, outputs and cache slots. With `plain_decoding` (an artifact
    without a drafter), only a fused verify graph is added, to run prefill and plain steps in place
    of "step" (a chain tree is a causal step; its ancestors are then a triangle, not a closure, so
    prefill can run long chunks); a model that cannot fuse keeps its step graph alone.
    An EAGLE-3 feature head on the IR (`ir.draft_adapters["feature_draft"]`, from InsertFeatureHead,
    which runs before) makes `features` its fused input; without one (or with an EAGLE-1 head) it
    is the last layer's stream, as before.
    """

    max_tree: int = 64
    first_layer: int = 0
    fused_attention: bool = False  # ONNX Runtime: one GroupQueryAttention per layer where the model allows
    plain_decoding: bool = False
    max_batch: int = 1  # > 1: "verify" takes a batch of trees, one per cache row (attention unfused)
    name = "InsertTreeVerify"

    def run(self, ir: ModelIR) -> PassResult:
        model, max_len = ir.model, ir.max_seq_len
        max_tree = min(self.max_tree, max_len)
        layers = list(range(self.first_layer, ir.config.num_layers))
        batched = self.max_batch > 1
        if batched and self.first_layer:
            raise ValueError("a batched verify graph verifies from layer 0 (no prefix-exit self-draft)")
        caches = example_caches(model, max_len, layers, batch=2 if batched else 1)
        dtype = str(caches[0].dtype).removeprefix("torch.")
        if batched:  # a batch of two trees, B and T dynamic
            example = [("tokens", torch.zeros(2, 3, dtype=torch.int64), {0: "B", 1: "T"}),
                       ("parents", torch.tensor([[0, 0, 1], [0, 0, 0]]), {0: "B", 1: "T"}),
                       ("prefix_len", torch.tensor([1, 2]), {0: "B"})]  # fmt: skip
        else:
            if self.first_layer:
                first = ("hidden", torch.zeros(1, 3, ir.config.hidden_size, dtype=caches[0].dtype), {1: "T"})
            else:
                first = ("tokens", torch.zeros(1, 3, dtype=torch.int64), {1: "T"})
            example = [first,
                       ("parents", torch.tensor([0, 0, 1]), {0: "T"}),
                       ("prefix_len", torch.tensor([1]), {})]  # fmt: skip
        rows = "B" if batched else 1
        outputs = [TensorSpec("next_ids", "int64", ("B", "T") if batched else ("T",)),
                   TensorSpec("logits", dtype, (rows, "T", ir.config.vocab_size)),
                   TensorSpec("features", dtype, (rows, "T", ir.config.hidden_size))]  # fmt: skip
        # ORT's GroupQueryAttention takes a batch of one-token rows only: a batch of trees attends unfused
        fused = self.fused_attention and model.supports_fused_attention() and not batched
        if self.plain_decoding and not fused:
            return PassResult(ir, False)  # unfused, the verify graph is no faster than "step"
        head = ir.draft_adapters.get(GraphName.FEATURE_DRAFT)
        head = head if head is not None and head.fuse is not None else None  # EAGLE-1: the last layer
        verify = TreeVerifyModule(model, max_len, max_tree, self.first_layer, fused, self.plain_decoding,
                                  batched, head)  # fmt: skip
        name = GraphName.VERIFY
        ir.graphs[name] = export_with_caches(name, verify, example, caches, outputs, max_tree, layers,
                                             self.max_batch if batched else None)  # fmt: skip
        if not self.plain_decoding:  # compaction moves every layer's K/V after a tree
            caches = example_caches(model, max_len)
            moves = [("from_slots", torch.tensor([3, 4, 5]), {0: "T"}),
                     ("to_slots", torch.tensor([1, 2, 3]), {0: "T"})]
            name = GraphName.COMPACT
            ir.graphs[name] = export_with_caches(name, CompactModule(), moves, caches, [], max_tree)
        ir.blocks = build_block_view(ir.config, ir.graphs)
        return PassResult(ir, True)
