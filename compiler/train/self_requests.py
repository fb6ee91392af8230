"""Self-written requests (Magpie, Xu et al. 2024): the target writes the user turns its drafts train on.

An aligned chat model given only its chat template's text up to where a user message begins
(system turn, user-turn header) writes a plausible user message when sampled. Those requests, and
the target's own greedy answers to them, are the distribution a chat draft must predict, and no
corpus has to be fetched. Here:

  1. the user-turn prefix is cut from the template rendered around a marker message;
  2. chunks of `chunk` requests are sampled at once (one batch, seeded by (seed, chunk index)),
     each ending at the template's end-of-turn token or EOS;
  3. filters keep requests of `min_chars`..`max_chars` characters, at least `min_words` words, mostly
     Latin letters (`min_latin`: the answers' language is the template's), holding no template markup;
  4. deduplication drops a request sharing more than `max_overlap` of its word trigrams with a kept one.

Each sampled chunk is one JSON file in the cache folder (`skiptree_home()/requests/<weights sha256
prefix>/`, or a given one), written atomically: an interrupted synthesis resumes at the next chunk,
and the same model, seed and settings give the same requests on any rerun.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from skiptree.compiler.train.self_distill import batched_decode
from skiptree.errors import SkiptreeError
from skiptree.models.base import CausalLM
from skiptree.runtime.tokenizer import Tokenizer

MARKER = "\x00REQUEST\x00"  # stands in for the user's message when the template is rendered
MARKUP = ("<|", "|>", "[INST]", "</s>", "<s>")
WORDS = re.compile(r"[^\W\d_]+|\d+", re.UNICODE)


@dataclass(frozen=True)
class RequestSettings:
    """How requests are sampled and filtered (recorded with them: other settings, other cache files)."""

    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 96  # a request longer than this is cut, and then dropped (no end of turn)
    chunk: int = 32  # requests sampled in one batch (one cache file)
    seed: int = 0
    min_chars: int = 16
    max_chars: int = 600
    min_words: int = 4
    min_latin: float = 0.9  # share of letters that are ASCII
    max_overlap: float = 0.5  # share of a request's word trigrams already in a kept request

    @property
    def key(self) -> str:
        """What the sampled chunks depend on (the filters run on reading them)."""
        return (f"t{self.temperature}-p{self.top_p}-n{self.max_tokens}-c{self.chunk}-s{self.seed}")


class RequestSynthesisError(SkiptreeError):
    """A model that cannot write its own requests."""


def user_turn(tokenizer: Tokenizer) -> tuple[list[int], str]:
    """(the token ids up to where a user message begins, the template's text that ends a user turn)."""
    if not tokenizer.chat_template:
        raise RequestSynthesisError("this model's tokenizer has no chat template: it cannot write requests",
                                    "train on --distill-prompts docstring requests only (--self-requests 0)")
    text = tokenizer.render_chat([{"role": "user", "content": MARKER}], add_generation_prompt=False)
    prefix, found, suffix = text.partition(MARKER)
    if not found:
        raise RequestSynthesisError("the chat template does not place the user's message verbatim",
                                    "train on docstring requests only (--self-requests 0)")
    return tokenizer.encode(prefix, add_special_tokens=False), suffix


def end_of_turn(tokenizer: Tokenizer, suffix: str, eos: Sequence[int]) -> list[int]:
    """The token ids that end a sampled request: the template's end-of-turn token, and EOS."""
    ids = tokenizer.encode(suffix.lstrip(" "), add_special_tokens=False) if suffix.strip() else []
    return sorted({*eos, *ids[:1]})


Chooser = Callable[[torch.Tensor], torch.Tensor]


def top_p_sampler(settings: RequestSettings, generator: torch.Generator) -> Chooser:
    def choose(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
        ordered, order = probs.sort(dim=-1, descending=True)
        ordered[(ordered.cumsum(-1) - ordered) > settings.top_p] = 0.0  # keep the nucleus
        picked = torch.multinomial(ordered / ordered.sum(-1, keepdim=True), 1, generator=generator)
        return order.gather(-1, picked)[:, 0]

    return choose


def sample_chunk(model: CausalLM, prefix: list[int], stops: Sequence[int], settings: RequestSettings,
                 index: int) -> list[list[int]]:  # fmt: skip
    """`settings.chunk` sampled requests (token ids, each ending at its stop token or cut)."""
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
    rows = batched_decode(model, [prefix] * settings.chunk, settings.max_tokens, stops,
                          top_p_sampler(settings, generator))  # fmt: skip
    return [sequence[start:] for start, sequence in rows]


def clean(tokenizer: Tokenizer, ids: list[int], stops: Sequence[int], settings: RequestSettings
          ) -> str | None:  # fmt: skip
    """The request's text when it ended its turn and passes the filters (`acceptable`)."""
    if not ids or ids[-1] not in stops:
        return None  # cut at max_tokens: an unfinished request
    text = tokenizer.decode(ids[:-1], skip_special_tokens=False).strip()
    return text if acceptable(text, settings) else None


def acceptable(text: str, settings: RequestSettings) -> bool:
    """Length in characters and words, mostly Latin letters, and no chat-template markup."""
    if not settings.min_chars <= len(text) <= settings.max_chars:
        return False
    if len(WORDS.findall(text)) < settings.min_words:
        return False
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) / len(letters) < settings.min_latin:
        return False
    return not any(markup in text for markup in MARKUP)  # the model wrote template markup: not a request


def trigrams(text: str) -> set[tuple[str, ...]]:
    words = [w.lower() for w in WORDS.findall(text)]
    return {tuple(words[i : i + 3]) for i in range(max(len(words) - 2, 1))}


class Deduplicator:
    """Keeps texts in the order offered, but none sharing more than `max_overlap` of its trigrams
    with one already kept (an index from trigram to the kept texts holding it)."""

    def __init__(self, max_overlap: float):
        self.max_overlap, self.kept = max_overlap, []
        self.holders: dict[tuple[str, ...], list[int]] = {}

    def offer(self, text: str) -> None:
        grams = trigrams(text)
        shared = Counter(i for gram in grams for i in self.holders.get(gram, ()))
        if shared and max(shared.values()) > self.max_overlap * len(grams):
            return
        for gram in grams:
            self.holders.setdefault(gram, []).append(len(self.kept))
        self.kept.append(text)


def deduplicate(texts: Sequence[str], max_overlap: float) -> list[str]:
    """Texts in order, without those sharing more than `max_overlap` of their trigrams with one kept."""
    unique = Deduplicator(max_overlap)
    for text in texts:
        unique.offer(text)
    return unique.kept


def write_json(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def self_written_requests(model: CausalLM, tokenizer: Tokenizer, count: int, folder: Path,
                          settings: RequestSettings = RequestSettings(), max_chunks: int | None = None,
                          log: Callable[[str], None] = print
                          ) -> tuple[list[str], dict[str, object]]:  # fmt: skip
    """`count` distinct requests written by the target (fewer if `max_chunks`, default 8x the chunks
    `count` needs, runs out), and a record of how they were made (for the session and the artifact)."""
    prefix, suffix = user_turn(tokenizer)
    stops = end_of_turn(tokenizer, suffix, model.config.eos_token_ids)
    folder = Path(folder) / settings.key
    folder.mkdir(parents=True, exist_ok=True)
    limit = max_chunks if max_chunks is not None else 8 * -(-count // settings.chunk)
    sampled: list[str | None] = []
    unique = Deduplicator(settings.max_overlap)
    progress = tqdm(total=count, desc="    the target writes its own requests", leave=False)
    index = 0
    while len(unique.kept) < count and index < limit:
        path = folder / f"chunk-{index:05d}.json"
        if path.is_file():
            chunk = json.loads(path.read_text())
        else:
            chunk = sample_chunk(model, prefix, stops, settings, index)
            write_json(path, chunk)
        texts = [clean(tokenizer, ids, stops, settings) for ids in chunk]
        for text in texts:
            if text is not None:
                unique.offer(text)
        sampled += texts
        progress.update(min(len(unique.kept), count) - progress.n)
        index += 1
    progress.close()
    kept = unique.kept[:count]
    passed = sum(text is not None for text in sampled)
    record = {"written": len(sampled), "passed_filters": passed, "kept": len(kept), "chunks": index,
              "prefix_tokens": len(prefix), "stop_ids": stops, **asdict(settings)}  # fmt: skip
    log(f"self-written requests: {len(kept)} kept of {len(sampled)} sampled ({passed} passed the filters)")
    return kept, record
