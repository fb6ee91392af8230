"""`skiptree serve --replicas 2`: the same app as a Ray Serve deployment of two engines, on a local Ray
instance bound to loopback; requests through Ray's proxy answer as one engine does."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import openai
import pytest
import transformers
from conftest import TINY_LLAMA, write_tiny_model, write_word_tokenizer
from http_clients import complete_concurrently, free_port

import skiptree

pytest.importorskip("ray", reason="Ray is the optional `ray` extra (installed with `.[test]`)")


def test_two_replicas_serve_the_same_tokens(tmp_path):
    write_tiny_model(tmp_path / "target", transformers.LlamaConfig(**dict(TINY_LLAMA, hidden_size=64)))
    write_word_tokenizer(tmp_path / "target")
    art = skiptree.compile(tmp_path / "target", tmp_path / "tiny", max_seq_len=64, draft="prompt-lookup",
                           tree="k-ary:2x3", max_tree=16, max_batch=4)  # fmt: skip
    plain = skiptree.load(art, speculative=False)
    port = free_port()
    command = [sys.executable, "-m", "skiptree", "serve", str(art), "--port", str(port), "--replicas", "2",
               "--threads", "1"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        pids, deadline = set(), time.time() + 300
        while len(pids) < 2 and time.time() < deadline:  # both replicas up and reachable through the proxy
            assert process.poll() is None, process.stdout.read()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    pids.add(json.loads(answer.read())["pid"])
            except OSError:
                time.sleep(0.5)
        assert len(pids) == 2
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        prompts = [f"t{a} t{a + 1} t{a + 2} t{a}" for a in range(10, 50, 5)]
        answers = complete_concurrently(client, "tiny", prompts, 20)
        assert answers == {p: plain.generate(p, max_new_tokens=20).text for p in prompts}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
