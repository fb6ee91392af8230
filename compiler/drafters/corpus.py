"""Build the corpus lookup datastore at compile time (`--draft corpus:PATH`).

PATH is a text file or a folder: every non-hidden file under it that decodes as UTF-8 text is one
document (binary files are skipped and counted). The documents are tokenized with the target's
tokenizer and indexed by a suffix array (`skiptree.runtime.corpus`), saved with safetensors as
`corpus.safetensors` (no pickle; its sha256 is in the manifest like every artifact file).

Limits, stated and enforced: at most `MAX_CORPUS_BYTES` of text and `MAX_CORPUS_TOKENS` tokens
(8 bytes per token in the artifact and in memory: 128 MB at the limit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from safetensors.numpy import save_file

from skiptree.compiler.specs import CompileOptionError
from skiptree.runtime.corpus import CORPUS_FILE, MAX_CORPUS_TOKENS, CorpusIndex
from skiptree.runtime.manifest import CorpusEntry
from skiptree.runtime.tokenizer import Tokenizer

MAX_CORPUS_BYTES = 64 << 20


def corpus_files(path: Path) -> list[Path]:
    """The candidate documents: PATH itself, or the non-hidden files under it, sorted."""
    if path.is_file():
        return [path]
    return sorted(
        file for file in path.rglob("*")
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
    )  # fmt: skip


def check_corpus_size(path: Path) -> None:
    """Refuse a corpus over the byte limit before any work is done (file sizes only)."""
    total = sum(file.stat().st_size for file in corpus_files(path))
    if total > MAX_CORPUS_BYTES:
        raise CompileOptionError(f"corpus {path} holds {total:,} bytes, more than the limit of "
                                 f"{MAX_CORPUS_BYTES:,}", "point --draft corpus: at a smaller file or folder")


def read_documents(path: Path) -> tuple[list[str], int]:
    """(texts of the UTF-8 text files, how many files were skipped as binary)."""
    check_corpus_size(path)
    texts, skipped = [], 0
    for file in corpus_files(path):
        data = file.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        if "\x00" in text:
            skipped += 1
            continue
        if text.strip():
            texts.append(text)
    if not texts:
        raise CompileOptionError(f"corpus {path} holds no UTF-8 text", "point --draft corpus: at text files")
    return texts, skipped


def write_corpus(path: Path, tokenizer: Tokenizer, folder: Path, log: Callable[[str], None]
                 ) -> CorpusEntry:  # fmt: skip
    """Tokenize and index the corpus into `folder`; returns the manifest's `corpus` entry."""
    start = time.perf_counter()
    texts, skipped = read_documents(path)
    documents = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    tokens = sum(len(document) + 1 for document in documents)
    if tokens > MAX_CORPUS_TOKENS:
        raise CompileOptionError(f"corpus {path} has {tokens:,} tokens, more than the limit of "
                                 f"{MAX_CORPUS_TOKENS:,}", "point --draft corpus: at less text")  # fmt: skip
    tokenized = time.perf_counter()
    index = CorpusIndex.build(documents)
    save_file({"tokens": index.tokens, "suffix_array": index.suffixes}, str(folder / CORPUS_FILE))
    seconds = time.perf_counter() - start
    log(f"         {len(documents)} documents ({skipped} binary files skipped), {len(index):,} tokens; "
        f"tokenized in {tokenized - start:.1f} s, indexed in {seconds - (tokenized - start):.1f} s")
    return CorpusEntry(file=CORPUS_FILE, source=str(path), documents=len(documents), skipped_files=skipped,
                       tokens=len(index), bytes=int(index.tokens.nbytes + index.suffixes.nbytes),
                       build_seconds=round(seconds, 3))  # fmt: skip
