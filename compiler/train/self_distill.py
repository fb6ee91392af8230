"""Training data from the target itself: its greedy answers to many prompts, generated in batches.

A draft is judged on the target's own outputs, so its training data should come from them; one
sequence at a time the target writes ~36 tokens/s here, a batch of 32 rows several times that (a
decode step reads the weights once for every row). Prompts are made offline from the standard
library: each public function with a docstring gives a coding request or a question about it.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from skiptree.models.base import CausalLM, mask_value

TEMPLATES = (
    "Write a Python {kind} `{name}` that does this: {doc}",
    "Explain what `{module}.{name}` in Python's standard library does, with a short example.",
    "{doc} How would I do that in Python?",
)


def documented(node: ast.AST) -> str | None:
    """A public definition's docstring summary when it makes a request (20-200 characters)."""
    doc = (ast.get_docstring(node) or "").strip().split("\n")[0].strip()  # type: ignore[arg-type]
    return doc if 20 <= len(doc) <= 200 and not node.name.startswith("_") else None  # type: ignore[attr-defined]


def docstring_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` requests made from the standard library's documented public definitions (seeded
    order): its top-level functions first (701 on Python 3.11), then its classes and their methods
    (1,732 more), so a larger count extends a smaller one's requests instead of reshuffling them."""
    functions: list[tuple[str, str, str, str]] = []
    others: list[tuple[str, str, str, str]] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and (doc := documented(node)):
                functions.append((path.stem, node.name, doc, "function"))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                if doc := documented(node):
                    others.append((path.stem, node.name, doc, "class"))
                for method in node.body:
                    if isinstance(method, ast.FunctionDef) and (doc := documented(method)):
                        others.append((path.stem, f"{node.name}.{method.name}", doc, "method"))
    found = []
    for group in (functions, others):
        random.Random(seed).shuffle(group)
        found += group
    return [TEMPLATES[i % len(TEMPLATES)].format(module=m, name=n, doc=d, kind=k) for i, (m, n, d, k) in
            enumerate(found[:count])]  # fmt: skip


def argmax_tokens(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def batched_greedy(model: CausalLM, prompts: Sequence[list[int]], new_tokens: int, eos: Sequence[int] = ()
                   ) -> list[tuple[int, list[int]]]:  # fmt: skip
    """Greedy continuations of all `prompts` at once (left-padded): [(prompt length, prompt +
    continuation up to and including an EOS)], the same tokens as one-by-one greedy decoding."""
    return batched_decode(model, prompts, new_tokens, eos, argmax_tokens)


@torch.no_grad()
def batched_decode(model: CausalLM, prompts: Sequence[list[int]], new_tokens: int, eos: Sequence[int],
                   choose: Callable[[torch.Tensor], torch.Tensor]
                   ) -> list[tuple[int, list[int]]]:  # fmt: skip
    """Continuations of all `prompts` at once, each next token `choose(last logits [B, V])` [B]."""
    batch, longest = len(prompts), max(len(p) for p in prompts)
    slots = longest + new_tokens
    pads = torch.tensor([longest - len(p) for p in prompts])
    ids = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts])
    k_cache, v_cache = model.new_kv_cache(batch, slots)
    dtype = k_cache.dtype
    columns = torch.arange(slots)

    def step(tokens: torch.Tensor, first: int) -> torch.Tensor:
        rows = first + torch.arange(tokens.shape[1])
        positions = (rows[None, :] - pads[:, None]).clamp(min=0)
        # row b sees its own slots pads[b]..row (a pad row sees itself only: no empty softmax)
        column, row = columns[None, None, :], rows[None, :, None]
        allowed = ((column <= row) & (column >= pads[:, None, None])) | (column == row)
        bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, mask_value(dtype))[:, None]
        logits = model(tokens, positions, bias, k_cache, v_cache, rows)
        return choose(logits[:, -1])

    stops = set(eos)
    stop_ids = torch.tensor(sorted(stops), dtype=torch.int64)
    outputs = [step(ids, 0)]
    ended = torch.isin(outputs[-1], stop_ids)
    for i in range(new_tokens - 1):
        if bool(ended.all()):  # every row has ended: the rest would be cut anyway
            break
        outputs.append(step(outputs[-1][:, None], longest + i))
        ended |= torch.isin(outputs[-1], stop_ids)
    generated = torch.stack(outputs, dim=1).tolist()
    sequences = []
    for prompt, row in zip(prompts, generated, strict=True):
        cut = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        sequences.append((len(prompt), list(prompt) + row[:cut]))
    return sequences


def distill(model: CausalLM, prompts: Sequence[list[int]], new_tokens: int, batch: int = 32,
            eos: Sequence[int] = ()) -> list[tuple[int, list[int]]]:  # fmt: skip
    """`batched_greedy` over `prompts` in batches of similar length (less padding), with progress."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    result: dict[int, tuple[int, list[int]]] = {}
    progress = tqdm(range(0, len(order), batch), desc="    the target answers training prompts", leave=False)
    for start in progress:
        chunk = order[start : start + batch]
        answers = batched_greedy(model, [prompts[i] for i in chunk], new_tokens, eos)
        result.update(zip(chunk, answers, strict=True))
    return [result[i] for i in range(len(prompts))]
