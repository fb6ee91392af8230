"""`TextGenerator`: text in, text out, with the option names of transformers' `generate`.

It joins a `StepModel` (torch reference or compiled artifact), a `Tokenizer` and the model's EOS
ids; the decoding itself is `skiptree.runtime.generation.generate_tokens`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skiptree.runtime.generation import GenerationResult, StepModel, generate_tokens
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.tokenizer import StreamDecoder, Tokenizer

Streamer = Callable[[int, str], None]  # called with (token_id, new_text) for every new token


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def read_eos_token_ids(folder: Path, tokenizer: Tokenizer) -> list[int]:
    """EOS ids as transformers uses them: generation_config.json, else config.json, else tokenizer."""
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            ids = _as_ids(json.loads(path.read_text()).get("eos_token_id"))
            if ids:
                return ids
    eos = tokenizer.token_id(tokenizer.special_tokens.get("eos_token"))
    return [] if eos is None else [eos]


@dataclass
class GenerationOutput:
    """What `generate` returns: ids, text and timings (see `GenerationResult`)."""

    result: GenerationResult
    text: str

    @property
    def prompt_ids(self) -> list[int]:
        return self.result.prompt_ids

    @property
    def token_ids(self) -> list[int]:
        return self.result.token_ids

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_ids": self.result.prompt_ids,
            "token_ids": self.result.token_ids,
            "text": self.text,
            "stop_reason": self.result.stop_reason,
            "tokens_per_second": round(self.result.tokens_per_second, 3),
            "prefill_seconds": round(self.result.prefill_seconds, 6),
            "mean_accepted": round(getattr(self.result, "mean_accepted", 1.0), 4),
            **({"tokens_by_source": self.result.tokens_by_source}
               if hasattr(self.result, "tokens_by_source") else {}),  # fmt: skip
            **({"lossy": True, "mean_layers": round(self.result.mean_layers or 0.0, 3)}
               if self.result.layers_run is not None else {}),  # fmt: skip
        }


class TextGenerator:
    """A model that generates text; subclasses provide `step_model`, `tokenizer`, `eos_token_ids`."""

    step_model: StepModel
    tokenizer: Tokenizer
    eos_token_ids: list[int]

    def encode_prompt(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt: ids pass through; text is encoded raw or via the chat template."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        seed: int | None = None,
        streamer: Streamer | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        chat: bool = False,
    ) -> GenerationOutput:
        """Continue `prompt` (text or ids); greedy unless `do_sample`. EOS defaults to the model's."""
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
        prompt_ids = self.encode_prompt(prompt, chat)
        eos = self.eos_token_ids if eos_token_id is None else _as_ids(eos_token_id)
        stream = StreamDecoder(self.tokenizer)

        def on_token(token: int) -> None:
            streamer(token, stream.push(token))

        on_token = None if streamer is None else on_token
        result = self.decode_tokens(prompt_ids, max_new_tokens, sampling, eos, seed, on_token)
        return GenerationOutput(result, self.tokenizer.decode(result.token_ids))

    def decode_tokens(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig,
                      eos: Sequence[int], seed: int | None,
                      on_token: Callable[[int], None] | None) -> GenerationResult:  # fmt: skip
        """The decoding loop; plain autoregressive here, speculative in artifacts that draft."""
        return generate_tokens(self.step_model, prompt_ids, max_new_tokens, sampling, eos, seed, on_token)
