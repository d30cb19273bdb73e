"""`vllm serve --attention-backend mesa` end to end, with the official `openai` client.

One server for the module, started with the command users type (``vllm serve MODEL
--attention-backend mesa --max-model-len 32768``, plus loopback host/port and a served name)
on the embedded SmolLM2-135M-Instruct (T = 8192), and stopped by its PID at the end.

Passkey prompts: SmolLM2-135M is a very small model and does not find every key past T
(about 2 in 3 at 9k-16k). The seeds below are ones where it does, with mesa, on this
server; greedy decoding and mesa's exactness (prefix caching, batch invariance) make the
answers reproducible, so a miss means a regression, not bad luck.

Cost on 2 busy cores: start 40-170 s (compile cache cold/warm), the two 16k passkey
requests ~2 min, the 8-request load ~75k prompt tokens, 3-5 min. KV cache: 4 GiB
(~124k tokens at mesa's ~34.6 KB per token), enough for the load to run at once.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from mesa_vllm.serving import (
    ServerProcess,
    free_port,
    http_get,
    http_post_json,
    passkey_chat_messages,
    serve_command,
)
from mesa_vllm.tasks.passkey import make_passkey_sample, score_passkey

pytestmark = [pytest.mark.cpu, pytest.mark.e2e]

T = 8192
MAX_MODEL_LEN = 32768
SERVED_NAME = "smollm2-mesa"
KV_CACHE_GIB = "4"
# (target prompt tokens, seed): 5 under T, 3 past it; ~75k prompt tokens in all.
LOAD_MIX = [(1000, 3), (2000, 4), (3000, 16), (4000, 5), (7000, 6), (12000, 14), (16000, 9),
            (30000, 15)]
REQUEST_TIMEOUT = 1500.0  # seconds, per request, on a loaded 2-core machine


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    port = free_port()
    command = serve_command(
        smollm2_dir, "--attention-backend", "mesa", "--max-model-len", str(MAX_MODEL_LEN),
        # The window of the earlier default (T/8), pinned: these checks are about serving, and
        # their prompts were chosen with it. With the default T/2 two of the three 16k prompts
        # here miss the key (digit slips); its accuracy is measured by `mesa-vllm eval`
        # (README: 0.90 at 16k and 0.95 at 32k in a 32k engine, against 0.80 and 0.45).
        "--additional-config", '{"mesa": {"R": 1024}}',
        "--served-model-name", SERVED_NAME, port=port,
    )
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc = ServerProcess(command, port=port, env={"VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB},
                         log_path=log)
    proc.start()
    try:
        started = proc.wait_ready(timeout=900)
        print(f"\nvllm serve (mesa) ready in {started:.0f} s: {' '.join(command)}")
        yield proc
    finally:
        code = proc.stop()
        print(f"server pid {proc.pid} stopped (exit code {code}); log {log}")


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client(timeout=REQUEST_TIMEOUT)


def _sample(tokenizer, length, seed):
    return make_passkey_sample(tokenizer, length, seed=seed)


def _finite(logprobs) -> bool:
    return all(lp is not None and math.isfinite(lp) for lp in logprobs)


def _assert_serving(server, client):
    """The server still answers: /health, and a small request."""
    assert server.alive(), server.log_tail()
    assert server.health() == 200
    reply = client.completions.create(model=SERVED_NAME, prompt="The sky is", max_tokens=3,
                                      temperature=0)
    assert reply.choices[0].finish_reason == "length"


def test_server_uses_mesa(server):
    log = server.log_text()
    assert "Resolved architecture: MesaLlamaForCausalLM" in log
    assert f"max_seq_len={MAX_MODEL_LEN}" in log


def test_health_and_metrics(server):
    assert http_get(server.base_url + "/health")[0] == 200
    metrics = server.metrics()
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                 "vllm:prompt_tokens_total"):
        assert name in metrics, name
    status, body = http_get(server.base_url + "/v1/models")
    assert status == 200 and SERVED_NAME in body


def test_passkey_16k_completion_and_streamed_chat(server, client, smollm2_tokenizer):
    """A completion and a streamed chat completion at ~16k tokens (2x T) find the key."""
    completion_sample = _sample(smollm2_tokenizer, 16000, seed=5)
    chat_sample = _sample(smollm2_tokenizer, 16000, seed=6)

    def completion():
        reply = client.completions.create(
            model=SERVED_NAME, prompt=completion_sample.prompt, max_tokens=10, temperature=0,
            logprobs=1,
        )
        return reply

    def streamed_chat():
        stream = client.chat.completions.create(
            model=SERVED_NAME, messages=passkey_chat_messages(chat_sample.prompt),
            max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        return pieces, usage

    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        done_completion = pool.submit(completion)
        done_chat = pool.submit(streamed_chat)
        reply = done_completion.result(timeout=REQUEST_TIMEOUT)
        pieces, usage = done_chat.result(timeout=REQUEST_TIMEOUT)
    print(f"\n16k completion + streamed chat: {time.monotonic() - start:.0f} s")

    text = reply.choices[0].text
    assert reply.usage.prompt_tokens > T, reply.usage
    assert score_passkey(text, completion_sample.answer), (completion_sample.answer, text)
    assert _finite(reply.choices[0].logprobs.token_logprobs)

    chat_text = "".join(pieces)
    assert len(pieces) > 1, pieces  # streamed, not one blob
    assert usage is not None and usage.prompt_tokens > T, usage
    assert score_passkey(chat_text, chat_sample.answer), (chat_sample.answer, chat_text)


def test_streaming_matches_non_streaming(server, client, smollm2_tokenizer):
    sample = _sample(smollm2_tokenizer, 1500, seed=7)
    whole = client.completions.create(model=SERVED_NAME, prompt=sample.prompt, max_tokens=16,
                                      temperature=0)
    stream = client.completions.create(model=SERVED_NAME, prompt=sample.prompt, max_tokens=16,
                                       temperature=0, stream=True)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(pieces) > 1
    assert "".join(pieces) == whole.choices[0].text


def test_concurrent_mixed_lengths(server, client, smollm2_tokenizer):
    """8 requests at once, 1k-30k tokens, under and past T: all right, no NaN, server fine."""
    samples = [_sample(smollm2_tokenizer, n, seed) for n, seed in LOAD_MIX]
    assert sum(s.num_tokens for s in samples) < 90_000
    assert any(s.num_tokens < T for s in samples) and any(s.num_tokens > T for s in samples)

    def ask(sample):
        began = time.monotonic()
        reply = client.completions.create(
            model=SERVED_NAME, prompt=sample.token_ids, max_tokens=10, temperature=0,
            logprobs=1,
        )
        return reply, time.monotonic() - began

    start = time.monotonic()
    with ThreadPoolExecutor(len(samples)) as pool:
        futures = [pool.submit(ask, s) for s in samples]
        done, pending = wait(futures, timeout=REQUEST_TIMEOUT + 60)
        assert not pending, f"{len(pending)} of {len(futures)} requests did not finish in time"
        results = [f.result() for f in futures]
    elapsed = time.monotonic() - start

    failures = []
    for sample, (reply, took) in zip(samples, results, strict=True):
        choice = reply.choices[0]
        print(f"  {sample.num_tokens:>6} tokens: {choice.text!r} (key {sample.answer}) "
              f"{took:.0f} s")
        assert reply.usage.prompt_tokens == sample.num_tokens
        assert choice.finish_reason == "length"
        assert _finite(choice.logprobs.token_logprobs), f"NaN/inf at {sample.num_tokens} tokens"
        if not score_passkey(choice.text, sample.answer):
            failures.append((sample.num_tokens, sample.answer, choice.text))
    print(f"8 concurrent requests, {sum(s.num_tokens for s in samples)} prompt tokens: "
          f"{elapsed:.0f} s")
    assert not failures, failures
    _assert_serving(server, client)
    server.wait_idle(timeout=60)


def test_disconnect_mid_stream_frees_kv(server, client, smollm2_tokenizer):
    """A client that drops a stream: the request is aborted and its KV blocks come back."""
    server.wait_idle(timeout=120)
    sample = _sample(smollm2_tokenizer, 4000, seed=21)
    stream = client.completions.create(
        model=SERVED_NAME, prompt=sample.token_ids, max_tokens=4000, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    for received, _chunk in enumerate(stream, 1):
        if received == 5:
            break
    busy = server.metrics()
    assert busy["vllm:num_requests_running"] >= 1 and busy["vllm:kv_cache_usage_perc"] > 0, busy
    stream.close()  # disconnect mid-stream

    idle = server.wait_idle(timeout=60)
    assert idle["vllm:kv_cache_usage_perc"] == 0
    # Full capacity again: a fresh request runs and answers as before.
    reply = client.completions.create(model=SERVED_NAME, prompt=sample.token_ids, max_tokens=8,
                                      temperature=0)
    assert reply.choices[0].finish_reason == "length"
    _assert_serving(server, client)


def test_disconnect_during_prefill_frees_kv(server, client, smollm2_tokenizer):
    """A client that gives up while its long prompt is still being read."""
    server.wait_idle(timeout=120)
    impatient = server.openai_client(timeout=5.0)
    sample = _sample(smollm2_tokenizer, 24000, seed=22)  # > 60 s of prefill here
    with pytest.raises(Exception) as error:
        impatient.completions.create(model=SERVED_NAME, prompt=sample.token_ids, max_tokens=8,
                                     temperature=0)
    timed_out = str(error.value).lower()
    assert "timed out" in timed_out or "timeout" in type(error.value).__name__.lower(), timed_out
    # Well before the prefill could have finished: the server aborted it.
    idle = server.wait_idle(timeout=30)
    assert idle["vllm:kv_cache_usage_perc"] == 0
    _assert_serving(server, client)


@pytest.mark.parametrize(
    ("endpoint", "body", "message"),
    [
        pytest.param("/v1/completions", {"prompt": [11] * (MAX_MODEL_LEN + 100), "max_tokens": 4},
                     "maximum context length is 32768", id="prompt-over-max-model-len"),
        pytest.param("/v1/completions", {"prompt": "hello " * (MAX_MODEL_LEN + 10),
                                         "max_tokens": 4},
                     "maximum context length is 32768", id="text-prompt-over-max-model-len"),
        pytest.param("/v1/chat/completions",
                     {"messages": [{"role": "user", "content": "hello " * (MAX_MODEL_LEN + 10)}],
                      "max_tokens": 4},
                     "maximum context length is 32768", id="chat-over-max-model-len"),
        pytest.param("/v1/completions", {"prompt": "", "max_tokens": 4}, "non-empty",
                     id="empty-prompt"),
        pytest.param("/v1/completions", {"prompt": [], "max_tokens": 4}, "at least one prompt",
                     id="empty-token-list"),
        pytest.param("/v1/chat/completions", {"messages": [], "max_tokens": 4},
                     "empty conversation", id="empty-chat"),
    ],
)
def test_bad_requests_get_400_and_server_keeps_serving(server, client, endpoint, body, message):
    status, reply = http_post_json(server.base_url + endpoint, {"model": SERVED_NAME, **body},
                                   timeout=300)
    assert status == 400, (status, reply)
    text = reply["error"]["message"] if isinstance(reply, dict) else str(reply)
    assert message in text, text
    _assert_serving(server, client)
