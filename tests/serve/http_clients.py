"""Helpers of the serve tests: a free loopback port, and completions asked concurrently."""

from __future__ import annotations

import socket
import threading

import openai


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def complete_concurrently(client: openai.OpenAI, model: str, prompts: list[str], max_tokens: int) -> dict:
    """Greedy completions of every prompt, one thread each, all at once: {prompt: text}."""
    answers: dict[str, str] = {}

    def ask(prompt: str) -> None:
        answers[prompt] = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                    temperature=0).choices[0].text  # fmt: skip

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers
