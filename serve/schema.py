"""The OpenAI request bodies `skiptree serve` accepts, and OpenAI's error object.

Fields OpenAI defines that skiptree does not implement (logprobs, n > 1, tools, ...) are refused with
a 400 naming the field, never ignored silently; unknown fields are ignored, as OpenAI's API does.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class OpenAIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields both endpoints share. temperature 0 is greedy (and speculates); OpenAI's default is 1."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not stop for stop in stops):
            raise OpenAIError(400, "stop takes at most 4 non-empty strings", param="stop")
        return stops

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise OpenAIError(
                400, f"n={self.n} is not supported: skiptree returns one choice (n=1)", param="n"
            )
        if self.logprobs:
            raise OpenAIError(400, "logprobs are not supported by skiptree serve", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise OpenAIError(400, f"{name} is not supported (it would change the model's "
                                       "distribution): drop it", param=name)  # fmt: skip


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False

    def prompt_value(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and all(isinstance(p, str) for p in self.prompt):
            if len(self.prompt) != 1:
                raise OpenAIError(400, "a batch of prompts is not supported: send one prompt per request",
                                  param="prompt")  # fmt: skip
            return self.prompt[0]
        if not self.prompt:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        if self.echo:
            raise OpenAIError(400, "echo is not supported by skiptree serve", param="echo")
        return self.prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
