"""`skiptree serve` through the real `openai` client: a server process started on a free loopback
port, on a tiny random Llama compiled with --max-batch (a word-level tokenizer: word i is "t<i>")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest
import transformers
from conftest import TINY_LLAMA, write_tiny_model, write_word_tokenizer
from http_clients import complete_concurrently, free_port

import skiptree

KEY = "test-key"
CHAT_TEMPLATE = (
    "{% for m in messages %}t3 {{ m['content'] }} t4 {% endfor %}{% if add_generation_prompt %}t5{% endif %}"
)


def start_server(art, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "skiptree",
        "serve",
        str(art),
        "--port",
        str(port),
        "--threads",
        "1",
        *args,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as answer:
                if answer.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("server did not start")


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    write_tiny_model(root / "target", transformers.LlamaConfig(**dict(TINY_LLAMA, hidden_size=64)))
    write_word_tokenizer(root / "target")
    (root / "target" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    art = skiptree.compile(root / "target", root / "tiny", max_seq_len=64, draft="prompt-lookup",
                           tree="k-ary:2x3", max_tree=16, max_batch=4)  # fmt: skip
    return art


@pytest.fixture(scope="module")
def server(artifact):
    process, url = start_server(artifact, "--api-key", KEY)
    yield url, openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def plain(artifact):
    return skiptree.load(artifact, speculative=False)


def words(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def test_models_lists_the_artifact(server):
    _, client = server
    assert [model.id for model in client.models.list().data] == ["tiny"]


def test_completion_equals_plain_greedy(server, plain):
    _, client = server
    prompt = "t5 t6 t7 t5 t6 t7 t5"
    expected = plain.generate(prompt, max_new_tokens=20)
    answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert answer.choices[0].text == expected.text
    assert answer.usage.prompt_tokens == 7 and answer.usage.completion_tokens == len(expected.token_ids)


def test_chat_uses_the_chat_template(server, plain):
    _, client = server
    expected = plain.generate("t8 t9 t8 t9", max_new_tokens=12, chat=True)
    messages = [{"role": "user", "content": "t8 t9 t8 t9"}]
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].message.role == "assistant"


def test_streaming_sends_the_same_text_in_pieces(server, plain):
    _, client = server
    prompt = "t11 t12 t13 t11 t12"
    whole = (
        client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    )
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = plain.generate(prompt, max_new_tokens=16, chat=True)
    assert text == expected.text
    reason = "stop" if expected.result.stop_reason == "eos" else "length"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    pieces = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == whole


def test_stop_strings_cut_the_text(server, plain):
    _, client = server
    prompt = next(
        p
        for p in (f"t{a} t{a + 1} t{a + 2} t{a}" for a in range(20, 90))
        if len(plain.generate(p, max_new_tokens=20).token_ids) == 20
    )  # no EOS before the stop
    text = plain.generate(prompt, max_new_tokens=20).text
    stop = " ".join(text.split()[3:5])
    answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    assert answer.choices[0].text == text[: text.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stop=stop,
                                         stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_concurrent_requests_each_get_their_own_tokens(server, plain):
    _, client = server
    prompts = [f"t{a} t{a + 1} t{a + 2} t{a} t{a + 1}" for a in range(30, 66, 6)]
    answers = complete_concurrently(client, "tiny", prompts, 24)
    assert answers == {p: plain.generate(p, max_new_tokens=24).text for p in prompts}


def test_bad_requests_get_openai_errors(server):
    url, client = server
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="t5", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 64 tokens"):
        client.completions.create(model="tiny", prompt="t5 t6", max_tokens=63)
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        client.completions.create(model="tiny", prompt="t5", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="t5", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="t5", max_tokens=0)
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.models.list()
    try:
        client.completions.create(model="gpt-4", prompt="t5", max_tokens=2)
    except openai.NotFoundError as error:
        assert error.body["code"] == "model_not_found" and error.body["type"] == "invalid_request_error"


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    url, client = server
    stream = client.completions.create(
        model="tiny", prompt="t40 t41", max_tokens=60, temperature=0, stream=True
    )
    next(iter(stream))
    stream.close()
    deadline = time.time() + 10
    while health(url)["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert health(url)["active"] == 0


def test_metrics_count_requests_and_steps(server):
    url, client = server
    client.completions.create(model="tiny", prompt="t50 t51", max_tokens=5, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="t50", max_tokens=5)
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    for name in ("skiptree_requests_total", "skiptree_generated_tokens_total", "skiptree_target_steps_total",
                 "skiptree_queue_length", "skiptree_time_to_first_token_seconds_bucket",
                 "skiptree_tokens_per_target_step"):  # fmt: skip
        assert name in text
    assert 'skiptree_requests_total{endpoint="completions",status="200"}' in text
    assert 'skiptree_requests_total{endpoint="completions",status="404"}' in text  # errors count too


def test_sigterm_drains_requests_in_flight(artifact, plain):
    """SIGTERM while streams run: every stream the server had begun still gets its whole text (a
    request that had not connected yet may be refused, never cut), then the server exits with 0."""
    process, url = start_server(artifact)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    prompts = [f"t{a} t{a + 1}" for a in range(60, 76, 2)]
    texts: dict[str, str] = {}
    cut: list[str] = []
    started = threading.Event()

    def stream(prompt: str) -> None:
        text, chunks = "", 0
        try:
            pieces = client.completions.create(model="tiny", prompt=prompt, max_tokens=50, temperature=0,
                                               stream=True)  # fmt: skip
            for chunk in pieces:
                started.set()
                chunks += 1
                text += chunk.choices[0].text
        except openai.APIConnectionError:
            if chunks:  # cut mid-stream: what draining must never do
                cut.append(prompt)
            return  # refused before it began: allowed while draining
        texts[prompt] = text

    threads = [threading.Thread(target=stream, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    assert started.wait(timeout=30)
    process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=60)
    assert texts and not cut  # the stream that had begun, and none cut
    assert texts == {p: plain.generate(p, max_new_tokens=50).text for p in texts}
    assert process.wait(timeout=30) == 0


def test_binding_beyond_loopback_needs_a_key(artifact):
    result = subprocess.run([sys.executable, "-m", "skiptree", "serve", str(artifact), "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=60, env={**os.environ})  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "skiptree: error: --host 0.0.0.0 would serve beyond this machine without a key; add --api-key KEY "
        "(clients send 'Authorization: Bearer KEY'), or bind 127.0.0.1."
    ]


def test_serving_a_single_request_artifact_is_refused_with_the_fix(tmp_path):
    write_tiny_model(tmp_path / "target", transformers.LlamaConfig(**TINY_LLAMA))
    write_word_tokenizer(tmp_path / "target")
    art = skiptree.compile(tmp_path / "target", tmp_path / "single", max_seq_len=32)
    command = [sys.executable, "-m", "skiptree", "serve", str(art)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "was not compiled for batching" in result.stderr and "--max-batch 8" in result.stderr
