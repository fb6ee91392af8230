"""Text <-> token ids at run time with the `tokenizers` library (no transformers, no torch).

A raw prompt is encoded as transformers' `AutoTokenizer` does by default (special tokens added
as the tokenizer.json post-processor says); a chat prompt is rendered with the model's own chat
template (jinja2, as transformers renders it) and encoded without adding special tokens again.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from skiptree.errors import GenerationError, ModelSourceError


def _raise_exception(message: str) -> None:
    raise GenerationError(f"the chat template refused the conversation: {message}", "fix the messages")


def _special_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value


class Tokenizer:
    """A model's tokenizer: `encode`, `decode`, `apply_chat_template`, and its special tokens."""

    def __init__(self, tokenizer_json: Path, tokenizer_config: dict[str, Any]):
        self.backend = _HFTokenizer.from_file(str(tokenizer_json))
        self.config = tokenizer_config
        self.chat_template: str | None = tokenizer_config.get("chat_template")
        self.special_tokens = {
            key: _special_text(tokenizer_config.get(key))
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelSourceError(
                f"{folder} has no tokenizer.json",
                "copy the checkpoint's tokenizer files into the folder (skiptree fetch writes them)",
            )
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = folder / "chat_template.jinja"  # transformers 5 saves templates separately
        if "chat_template" not in config and template_path.is_file():
            config["chat_template"] = template_path.read_text()
        return cls(path, config)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.backend.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Render the conversation with the model's chat template and encode it."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it (text, not yet encoded)."""
        if not self.chat_template:
            raise GenerationError(
                "this model's tokenizer has no chat template", "drop --chat and pass a raw prompt"
            )
        import jinja2.sandbox  # only chat prompts need jinja2

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in self.special_tokens.items() if v is not None},
        )


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for more
            return ""
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else text
        self.emitted = text
        return delta
