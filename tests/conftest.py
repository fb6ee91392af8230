"""Shared fixtures: tiny random checkpoints written by transformers itself (safetensors), random draft
trees (hypothesis), and the IR verifier after every pass (in every PassManager, and in `run_pass` for
passes run by hand)."""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import strategies as st

from skiptree.runtime.tree import TreeShape

TINY_LLAMA = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2)  # fmt: skip


@pytest.fixture(autouse=True, scope="session")
def verify_after_every_pass():
    """Every PassManager in the tests verifies the IR after each pass, whatever its `verify` says.
    Session-wide and autouse, so it is on before any (session- or module-scoped) fixture compiles."""
    from skiptree.compiler.ir.pass_manager import PassManager

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PassManager, "always_verify", True)
        yield


def run_pass(pass_, ir):
    """Run one pass outside a PassManager, record it as the manager would, and verify the result."""
    from skiptree.compiler.ir.graph import PassRecord, verify_ir

    result = pass_.run(ir)
    result.ir.passes_run.append(PassRecord(pass_.name, pass_.options(), result.modified))
    verify_ir(result.ir, after_pass=pass_.name)
    return result


def write_tiny_model(folder, config, seed: int = 0, dtype=torch.float32):
    """Save a random model (perturbed norms and biases) and return transformers' instance of it."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
            else:
                param.mul_(8.0)  # sharper logits: fewer near-ties in greedy comparisons
    model.save_pretrained(folder)
    return model.to(dtype)


def write_word_tokenizer(folder, vocab_size: int = 97) -> None:
    """A real (tiny) tokenizer.json: word i is "t<i>", so ids and text map one to one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """(model folder, artifact folder) of a tiny Llama compiled for ONNX Runtime (session-wide)."""
    from skiptree.compiler.compile import compile_model
    from skiptree.compiler.options import CompileOptions

    root = tmp_path_factory.mktemp("tiny-artifact")
    folder = root / "model"
    write_tiny_model(folder, transformers.LlamaConfig(**TINY_LLAMA))
    write_word_tokenizer(folder)
    artifact = compile_model(folder, root / "artifact", CompileOptions(max_seq_len=48, verify=True),
                             log=lambda message: None)  # fmt: skip
    return folder, artifact


@pytest.fixture
def tiny_llama(tmp_path):
    """(folder, transformers model) of a tiny random Llama."""
    folder = tmp_path / "tiny-llama"
    return folder, write_tiny_model(folder, transformers.LlamaConfig(**TINY_LLAMA))


def ops_by_block(ir, graph: str) -> dict[str, int]:
    """How many ATen ops (call_function nodes) each block owns in step graph `graph` (top level)."""
    counts: dict[str, int] = {}
    for node in ir.graphs[graph].graph.nodes:
        if node.op == "call_function":
            counts[node.meta["block"]] = counts.get(node.meta["block"], 0) + 1
    return counts


def ops_by_layer(ir, graph: str) -> dict[int, int]:
    """How many ops of `graph` each decoder layer owns (its layer block and its attn / mlp parts)."""
    counts: dict[int, int] = {}
    for block, count in ops_by_block(ir, graph).items():
        if block.startswith("layers."):
            layer = int(block.split(".")[1])
            counts[layer] = counts.get(layer, 0) + count
    return counts


def count_calls(ir, graph: str, target) -> int:
    """How many calls of ATen op `target` the top level of `graph` makes."""
    nodes = ir.graphs[graph].graph.nodes
    return sum(1 for node in nodes if node.op == "call_function" and node.target == target)


def random_trees(max_nodes: int = 32):
    """Random trees of 1..max_nodes draft nodes: each node's parent is the root or an earlier node."""
    return st.integers(1, max_nodes).flatmap(
        lambda n: st.tuples(*[st.integers(-1, i - 1) for i in range(n)]).map(
            lambda parents: TreeShape(tuple(parents)))
    )
