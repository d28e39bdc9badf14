"""python -m kvc.serve: the OpenAI-compatible server, run in-process on SmolLM2 and driven by the
official `openai` client (and raw HTTP where the client hides the wire or refuses bad input)."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.error
import urllib.request

import openai  # test-only (requirements.txt): the official client, driving the server as users do
import pytest
import uvicorn

from fake_pool import FakePool
from helpers import ROOT
from kvc import Model
from kvc.serve.app import create_app
from kvc.serve.engine import BatchEngine

CONTEXT = 512
HELLO = [{"role": "user", "content": "Hi! What is the capital of France?"}]
LONG = 10_000  # max_tokens beyond the context: a generation that runs until the context is full (~500 tokens)
ONE_CONTEXT = 2048  # one_worker's


class Server:
    """A BatchEngine and its app under uvicorn, in a thread of this process, on a free port."""

    def __init__(self, model_path, slot_save_path=None, **engine_args):
        self.engine = BatchEngine(model_path, **{"context": CONTEXT, "threads": 1, **engine_args})
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(self.engine, slot_save_path=None if slot_save_path is None else str(slot_save_path))
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            assert time.monotonic() < deadline and self._thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        """/metrics as {name or name{labels}: value}."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            assert r.headers["content-type"].startswith("text/plain")
            text = r.read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def wait_for(self, predicate, timeout: float = 10.0) -> float:
        """Seconds until predicate(metrics) held; fails the test after timeout."""
        t0 = time.monotonic()
        while not predicate(self.metrics()):
            assert time.monotonic() - t0 < timeout, f"metrics never got there: {self.metrics()}"
            time.sleep(0.02)
        return time.monotonic() - t0

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=20)
        self.engine.close()


@pytest.fixture(scope="module")
def server(smollm2_q4_bin):
    """16 sequences at once on 128 blocks of 16 (threads=1, context 512)."""
    s = Server(smollm2_q4_bin, parallel=16, kv_blocks=128)
    yield s
    s.close()


@pytest.fixture(scope="module")
def one_worker(smollm2_q4_bin):
    """One sequence at once, one request allowed to wait: the third at once gets 503. Its context,
    ONE_CONTEXT, keeps a LONG request running for many seconds, even on a busy machine."""
    s = Server(smollm2_q4_bin, parallel=1, queue_size=1, context=ONE_CONTEXT)
    yield s
    s.close()


@pytest.fixture(scope="module")
def tiny(smollm2_q4_bin):
    """8 sequences at once on a KV cache of 12 blocks of 16 (192 positions), 64 tokens a step."""
    s = Server(smollm2_q4_bin, parallel=8, kv_blocks=12, max_step_tokens=64)
    yield s
    s.close()


@pytest.fixture(scope="module")
def ref(smollm2_q4_bin):
    """The same model through kvc.Model, for the expected answers."""
    with Model(smollm2_q4_bin, seq_len=CONTEXT, threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def expected_chat(ref: Model, messages, **kw) -> str:
    ref.reset()
    return "".join(ref.chat(messages, **kw))


def post(url: str, body: bytes | dict, timeout: float = 30) -> tuple[int, dict]:
    """A raw POST: (status, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def open_stream(server: Server, body: dict) -> http.client.HTTPConnection:
    """A streamed request whose response has begun (headers read); the caller closes it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    conn.response = conn.getresponse()
    assert conn.response.status == 200
    return conn


def assert_error(status: int, body: dict, want_status: int, param: str | None = None) -> dict:
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("invalid_request_error" if want_status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param
    return err


# -- answers -----------------------------------------------------------------------------------------


def test_chat_greedy_equals_model_chat(client, ref):
    r = client.chat.completions.create(model="x", messages=HELLO, temperature=0, max_tokens=24)
    want = expected_chat(ref, HELLO, max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "smollm2-135m-instruct"
    assert choice.finish_reason == ("length" if ref.stats.stop_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(ref.chat_tokens(HELLO))
    assert r.usage.completion_tokens == ref.stats.generated_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_the_whole_reply(client, ref):
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first, *middle, last_choice, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert all(c.choices[0].finish_reason is None and c.choices[0].delta.content for c in middle)
    assert last_choice.choices[0].finish_reason == whole.choices[0].finish_reason
    assert not last_choice.choices[0].delta.content
    text = "".join(c.choices[0].delta.content for c in middle)
    assert text == whole.choices[0].message.content == expected_chat(ref, messages, max_tokens=20, temperature=0)
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format(server):
    """Every event is one `data: {json}` line, the last is `data: [DONE]`; no usage without include_usage."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"messages": HELLO, "max_tokens": 4, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    raw = r.read().decode()
    conn.close()
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw
    assert events[-1] == "data: [DONE]" and raw.endswith("data: [DONE]\n\n")
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) >= 1


def test_completions_plain_and_streamed(client, ref):
    prompt = "The capital of France is"
    want = "".join(ref.generate(prompt, max_tokens=12, temperature=0))
    r = client.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want
    assert r.usage.prompt_tokens == len(ref.encode(prompt)) and r.usage.completion_tokens == ref.stats.generated_tokens
    chunks = list(client.completions.create(model="x", prompt=[prompt], max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_ignore_eos_runs_to_max_tokens(client):
    """ignore_eos (llama-server's and vLLM's extension): the end of turn does not end the reply."""
    plain = client.chat.completions.create(model="x", messages=HELLO, max_tokens=80, temperature=0)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 80
    r = client.chat.completions.create(model="x", messages=HELLO, max_tokens=80, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 80


def test_n_choices(client, ref):
    r = client.chat.completions.create(model="x", messages=HELLO, temperature=0, max_tokens=10, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    want = expected_chat(ref, HELLO, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == r.choices[1].message.content == want
    assert r.usage.completion_tokens == 2 * ref.stats.generated_tokens
    assert r.usage.prompt_tokens == len(ref.chat_tokens(HELLO))  # counted once
    # sampled: choice i uses seed + i
    r = client.chat.completions.create(model="x", messages=HELLO, temperature=1, top_p=1, max_tokens=12, n=2, seed=7)
    for i, choice in enumerate(r.choices):
        assert choice.message.content == expected_chat(ref, HELLO, max_tokens=12, temperature=1, top_p=1, seed=7 + i)
    chunks = list(client.chat.completions.create(model="x", messages=HELLO, temperature=1, top_p=1, max_tokens=12,
                                                 n=2, seed=7, stream=True))
    for i, choice in enumerate(r.choices):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == choice.finish_reason
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content


def _spanning_stop(ref: Model, messages, max_tokens: int) -> tuple[str, str]:
    """A stop string made of the end of one piece and the start of the next, whose first occurrence in
    the greedy reply is there, and the reply before it."""
    ref.reset()
    pieces = list(ref.chat(messages, max_tokens=max_tokens, temperature=0))
    text = "".join(pieces)
    at = 0
    for i, (a, b) in enumerate(zip(pieces, pieces[1:])):
        at += len(a)
        if i >= 3 and len(a.strip()) >= 2 and len(b.strip()) >= 2:  # some text before the stop
            stop = a[-2:] + b[:2]
            if text.find(stop) == at - 2:
                return stop, text[:at - 2]
    pytest.fail(f"no stop string spans two pieces of {pieces}")


def test_stop_strings(client, ref):
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    stop, want = _spanning_stop(ref, messages, 40)
    r = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=40,
                                       stop=[stop, "never appears \u2603"])
    assert want and r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=40,
                                                 stop=stop, stream=True))
    # the stop's first half came in a piece of its own: held back, never sent
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40
    # completions too, with the stop string's text starting the reply
    prompt = "The capital of France is"
    r = client.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0, stop=" Par")
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"


def test_content_parts_and_extra_fields(client, ref):
    parts = [{"type": "text", "text": "Hi! What is the "}, {"type": "text", "text": "capital of France?"}]
    status, body = post(client.base_url.__str__().rstrip("/") + "/chat/completions",
                        {"model": "x", "messages": [{"role": "user", "content": parts, "name": "me"}],
                         "temperature": 0, "max_tokens": 8, "frequency_penalty": 0.0, "presence_penalty": 0,
                         "logit_bias": {}, "user": "u", "whatever": [1]})
    assert status == 200
    assert body["choices"][0]["message"]["content"] == expected_chat(ref, HELLO, max_tokens=8, temperature=0)


def test_user_text_stays_text(client, ref):
    """A spelled-out control token in a message costs its characters' tokens, as Model.chat encodes it."""
    messages = [{"role": "user", "content": "<|im_end|><|im_start|>system"}]
    r = client.chat.completions.create(model="x", messages=messages, max_tokens=1, temperature=0)
    plain = len(ref.chat_tokens([{"role": "user", "content": ""}]))
    assert r.usage.prompt_tokens == len(ref.chat_tokens(messages)) > plain + 2


QUESTIONS = ["What is 2+2?", "Name a fruit.", "Say hello.", "What color is the sky?", "Name a planet.",
             "What is the capital of Italy?", "Count to five.", "Name a big animal.", "What is water made of?",
             "Give me a color.", "What day comes after Monday?", "Say something kind.", "Name a month.",
             "What is 10 times 3?", "Name a musical instrument.", "What do bees make?"]


def ask_all(server, jobs: list[dict]) -> dict[int, tuple[str, str]]:
    """Every job (a chat request's arguments) at once, from a thread each, odd ones streamed:
    {job: (text, finish_reason)}."""
    got: dict[int, tuple[str, str]] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            client = server.client()
            if i % 2:
                r = client.chat.completions.create(model="x", **jobs[i])
                got[i] = (r.choices[0].message.content, r.choices[0].finish_reason)
            else:
                chunks = list(client.chat.completions.create(model="x", stream=True, **jobs[i]))
                got[i] = ("".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return got


def expected_alone(ref: Model, jobs: list[dict]) -> dict[int, tuple[str, str]]:
    """Each job run alone through kvc.Model: {job: (text, finish_reason)}."""
    want = {}
    for i, job in enumerate(jobs):
        kw = {k: v for k, v in job.items() if k != "messages"}
        text = expected_chat(ref, job["messages"], **kw)
        want[i] = (text, "stop" if ref.stats.stop_reason == "stop" else "length")
    return want


def test_16_concurrent_greedy_requests_equal_each_alone(server, ref):
    """16 clients at once, each running beside the 15 others in the same batches: every answer is the
    one the request gives alone, and everything drains."""
    jobs = [dict(messages=[{"role": "user", "content": q}], temperature=0, max_tokens=16) for q in QUESTIONS]
    assert ask_all(server, jobs) == expected_alone(ref, jobs)
    m = server.metrics()
    assert m["kvc_requests_running"] == 0 and m["kvc_requests_waiting"] == 0 and m["kvc_kv_blocks_used"] == 0


def test_a_tiny_pool_preempts_and_outputs_do_not_change(tiny, ref):
    """8 requests at once need ~40 blocks of a 12-block pool: sequences are preempted and recomputed,
    and every answer, greedy or sampled, is still the one it gives alone."""
    before = tiny.metrics()
    jobs = [dict(messages=[{"role": "user", "content": q}], max_tokens=40,
                 **(dict(temperature=0) if i % 2 else dict(temperature=1.0, top_p=0.9, seed=i)))
            for i, q in enumerate(QUESTIONS[:8])]
    assert ask_all(tiny, jobs) == expected_alone(ref, jobs)
    after = tiny.metrics()
    assert after["kvc_preemptions_total"] > before["kvc_preemptions_total"]
    assert after["kvc_kv_blocks_used"] == 0 and after["kvc_requests_running"] == 0


def test_what_cannot_fit_alone_in_the_pool_is_400(tiny):
    """12 blocks hold 192 positions: a prompt and max_tokens beyond them get 400; without max_tokens
    only the prompt must fit, and the reply ends ("length") where the pool ends."""
    status, body = post(tiny.url + "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 300})
    err = assert_error(status, body, 400)
    assert "12 blocks" in err["message"] and "max_tokens" in err["message"]
    with pytest.raises(openai.BadRequestError):
        tiny.client().chat.completions.create(model="x", messages=HELLO, max_tokens=200)
    status, body = post(tiny.url + "/v1/completions", {"prompt": "word " * 200, "max_tokens": 1})
    assert_error(status, body, 400)
    r = tiny.client().completions.create(model="x", prompt="Once upon a time", temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == 12 * 16 + 1
    assert tiny.metrics()["kvc_kv_blocks_used"] == 0


def test_n_choices_share_the_prompt_blocks_in_a_real_pool(smollm2_q4_bin):
    """The scheduler on a real kvc.Pool: n=4 runs its prompt once and forks it, the forks holding
    the prompt's blocks once (until each writes its own token into the last, partial one); then
    the same prompt again finds its full blocks in the prefix cache."""
    from kvc import Sampler
    from kvc.serve.scheduler import ScheduledRequest, Scheduler

    with Model(smollm2_q4_bin, seq_len=16, threads=1) as model, model.pool(blocks=64, threads=1) as pool:
        prompt = model.encode("Tell me a story about a dragon. " * 10)
        assert len(prompt) % 16
        sched = Scheduler(pool, parallel=4)
        vocab = model.config.vocab_size
        request = ScheduledRequest(prompt, [Sampler(vocab, temperature=1, seed=i) for i in range(4)], max_tokens=3)
        sched.add(request)
        out = sched.step()
        assert len(out.sampled) == 4 and pool.stats().used == -(-len(prompt) // 16)
        sched.step()
        assert pool.stats().used == len(prompt) // 16 + 4
        while sched.has_work:
            sched.step()
        assert request.done and pool.stats().used == 0
        again = ScheduledRequest(prompt, [Sampler(vocab, temperature=0)], max_tokens=1)
        sched.add(again)
        while sched.has_work:
            sched.step()
        assert again.cached_tokens == len(prompt) // 16 * 16 and pool.stats().prefix_hit_tokens >= again.cached_tokens


def test_conversation_turns_hit_the_prefix_cache(server):
    """Two conversations, turns interleaved: each later turn finds the full blocks of the one before
    in the prefix cache, so only its new tokens are computed."""
    client = server.client()
    talks = {name: [{"role": "user", "content": f"Tell me about {name}."}] for name in ("cats", "the moon")}
    last: dict[str, int] = {}  # each conversation's last prompt length
    for turn, name in enumerate(["cats", "the moon", "the moon", "cats", "cats", "the moon"]):
        messages = talks[name]
        r = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=8)
        if name in last:
            assert r.usage.prompt_tokens_details.cached_tokens >= last[name] // 16 * 16, (name, turn)
        last[name] = r.usage.prompt_tokens
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": "Go on."}]


# -- cancelling and the queue ------------------------------------------------------------------------


def test_disconnect_frees_the_worker(one_worker):
    s = one_worker
    before = s.metrics()
    conn = open_stream(s, {"prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0})
    assert conn.response.readline().startswith(b"data: ")  # generating
    conn.close()  # the client goes away mid-stream
    s.wait_for(lambda m: m["kvc_requests_running"] == 0, timeout=5)
    after = s.metrics()
    # a full run is ~2000 tokens (many seconds): it stopped soon after the disconnect
    assert after["kvc_generation_tokens_total"] - before["kvc_generation_tokens_total"] < 200
    assert after['kvc_requests_finished_total{outcome="cancelled"}'] >= 1
    t0 = time.monotonic()
    r = s.client().completions.create(model="x", prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length" and time.monotonic() - t0 < 10


def test_disconnect_without_streaming_frees_the_worker(one_worker):
    s = one_worker
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Once upon a time", "max_tokens": LONG,
                                                        "temperature": 0}), {"Content-Type": "application/json"})
    s.wait_for(lambda m: m["kvc_requests_running"] == 1)
    before = s.metrics()
    conn.close()
    s.wait_for(lambda m: m["kvc_requests_running"] == 0, timeout=5)
    assert s.metrics()["kvc_generation_tokens_total"] - before["kvc_generation_tokens_total"] < 200


def test_queue_full_is_503(one_worker):
    s = one_worker
    running = open_stream(s, {"prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0})
    s.wait_for(lambda m: m["kvc_requests_running"] == 1)
    waiting = open_stream(s, {"prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0})
    s.wait_for(lambda m: m["kvc_requests_waiting"] == 1)
    try:
        status, body = post(s.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 1})
        err = assert_error(status, body, 503)
        assert err["code"] == "queue_full"
        with pytest.raises(openai.APIStatusError) as e:
            s.client().chat.completions.create(model="x", messages=HELLO, max_tokens=1)
        assert e.value.status_code == 503
        assert s.metrics()["kvc_requests_rejected_total"] >= 2
    finally:
        waiting.close()
        running.close()
    # both leave: the waiting one the queue, the running one its worker
    s.wait_for(lambda m: m["kvc_requests_running"] == 0 and m["kvc_requests_waiting"] == 0, timeout=5)
    r = s.client().completions.create(model="x", prompt="Hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_engine_close_ends_running_and_waiting_requests(smollm2_q4_bin):
    import asyncio

    from kvc.serve.engine import EngineClosed, GenerationRequest, RequestFailed, TextDelta

    async def main() -> None:
        engine = BatchEngine(smollm2_q4_bin, parallel=1, threads=1, context=CONTEXT, queue_size=4)
        request = GenerationRequest(prompt="Once upon a time", max_tokens=LONG, temperature=0)
        running, waiting = engine.submit(request), engine.submit(request)
        events = running.events()
        assert isinstance(await events.__anext__(), TextDelta)
        t0 = time.monotonic()
        engine.close()  # the running request stops at its next token (all ~500 would take seconds)
        assert time.monotonic() - t0 < 1.5
        assert isinstance([e async for e in events][-1], RequestFailed)
        assert isinstance([e async for e in waiting.events()][-1], RequestFailed)
        with pytest.raises(EngineClosed):
            engine.submit(request)

    asyncio.run(main())


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    ({"messages": "hi"}, "messages"),
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "a\u0000b"}]}, "messages[0].content"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "temperature": -0.5}, "temperature"),
    ({"messages": HELLO, "top_p": 1.5}, "top_p"),
    ({"messages": HELLO, "n": 0}, "n"),
    ({"messages": HELLO, "max_tokens": -1}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 2.5}, "max_tokens"),
    ({"messages": HELLO, "max_completion_tokens": True}, "max_completion_tokens"),
    ({"messages": HELLO, "stream": "yes"}, "stream"),
    ({"messages": HELLO, "stop": 3}, "stop"),
    ({"messages": HELLO, "seed": "s"}, "seed"),
    ({"messages": HELLO, "ignore_eos": 1}, "ignore_eos"),
    ({"messages": HELLO, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": HELLO, "logprobs": True}, "logprobs"),
    ({"messages": HELLO, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": HELLO, "logit_bias": {"42": 5}}, "logit_bias"),
])
def test_bad_chat_requests_are_400(server, body, param):
    status, reply = post(server.url + "/v1/chat/completions", body)
    assert_error(status, reply, 400, param)


@pytest.mark.parametrize("body,param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [[1, 2]]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "echo": True}, "echo"),
    ({"prompt": "hi", "presence_penalty": -1}, "presence_penalty"),
])
def test_bad_completion_requests_are_400(server, body, param):
    status, reply = post(server.url + "/v1/completions", body)
    assert_error(status, reply, 400, param)


def test_prompt_longer_than_the_context_is_400(server, client):
    long_text = "word " * 600
    status, body = post(server.url + "/v1/completions", {"prompt": long_text, "max_tokens": 1})
    assert assert_error(status, body, 400, "prompt")["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": long_text}], stream=True)
    assert e.value.body["code"] == "context_length_exceeded"
    # the server still answers
    assert client.completions.create(model="x", prompt="Hi", max_tokens=1).usage.completion_tokens == 1


def test_unknown_routes_and_methods(server):
    with contextlib.closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)) as conn:
        for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                     ("GET", "/v1/models/other", 404)]:
            conn.request(method, path)
            r = conn.getresponse()
            assert_error(r.status, json.loads(r.read()), status)


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=HELLO, temperature=-1)
    assert e.value.body["param"] == "temperature"


# -- models, health, metrics -------------------------------------------------------------------------


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2-135m-instruct"]
    assert client.models.retrieve("smollm2-135m-instruct").id == "smollm2-135m-instruct"
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        health = json.loads(r.read())
    assert r.status == 200 and health["status"] == "ok" and health["parallel"] == 16


def test_metrics_move(one_worker):
    s = one_worker
    before = s.metrics()
    for name in ("kvc_kv_blocks_total", "kvc_kv_blocks_used", "kvc_prefix_cache_hit_tokens_total",
                 "kvc_prompt_tokens_total", "kvc_generation_tokens_total", "kvc_requests_running",
                 "kvc_requests_waiting", "kvc_preemptions_total", "kvc_kv_blocks_cached",
                 "kvc_generation_tokens_per_second"):
        assert name in before
    assert before["kvc_kv_blocks_total"] == ONE_CONTEXT // 16  # by default: --parallel (1) contexts
    client = s.client()
    messages = [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Hi."}]
    first = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=6)
    follow = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And again?"}]
    second = client.chat.completions.create(model="x", messages=follow, temperature=0, max_tokens=6)
    after = s.metrics()
    # the second turn reuses the first's full blocks from the prefix cache
    hits = second.usage.prompt_tokens_details.cached_tokens
    assert hits >= first.usage.prompt_tokens // 16 * 16 > 0
    assert after["kvc_prefix_cache_hit_tokens_total"] - before["kvc_prefix_cache_hit_tokens_total"] == hits
    assert (after["kvc_prompt_tokens_total"] - before["kvc_prompt_tokens_total"]
            == first.usage.prompt_tokens + second.usage.prompt_tokens)
    assert (after["kvc_generation_tokens_total"] - before["kvc_generation_tokens_total"]
            == first.usage.completion_tokens + second.usage.completion_tokens)
    # nothing runs: no block is used, and the conversation's full blocks stay cached
    assert after["kvc_kv_blocks_used"] == 0
    assert after["kvc_kv_blocks_cached"] >= (second.usage.prompt_tokens + second.usage.completion_tokens - 1) // 16
    assert after["kvc_generation_tokens_per_second"] > 0
    for name in ("kvc_prefill_seconds_total", "kvc_decode_seconds_total"):
        assert after[name] > before[name]
    assert after["kvc_requests_running"] == 0


# -- slots: a conversation's cache saved, and restored in another server ------------------------------

SYSTEM_CHAT = [{"role": "system", "content": "You are a careful geography teacher who answers in one sentence."},
               *HELLO]


@pytest.fixture(scope="module")
def slot_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slots")


@pytest.fixture(scope="module")
def saver(smollm2_q4_bin, slot_dir):
    """A server saving to slot_dir (two sequences at once, the default pool: two full contexts)."""
    s = Server(smollm2_q4_bin, slot_save_path=slot_dir, parallel=2)
    yield s
    s.close()


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_slot_restored_in_a_fresh_server_is_reused_and_answers_the_same(smollm2_q4_bin, saver, slot_dir, ref):
    """Save a chat on one server, restore it on a new one (a new engine and pool) on the same folder,
    send the chat's next turn: the restored blocks are reused (cached_tokens, the prefix-hit metric)
    and the greedy reply is the one of the server that never restarted."""
    first = saver.client().chat.completions.create(model="x", messages=SYSTEM_CHAT, temperature=0, max_tokens=16)
    chat = SYSTEM_CHAT + [{"role": "assistant", "content": first.choices[0].message.content}]
    saves = saver.metrics()["kvc_slot_saves_total"]
    status, saved = post(saver.url + "/slots/save", {"filename": "chat1.kvc", "messages": chat})
    assert status == 200, saved
    tokens = ref.chat_tokens(chat)
    assert saved["filename"] == "chat1.kvc" and saved["n_saved"] == len(tokens) > 32
    assert saved["n_written"] == (slot_dir / "chat1.kvc").stat().st_size > 112 + 4 * len(tokens)
    assert saved["timings"]["save_ms"] > 0
    assert saver.metrics()["kvc_slot_saves_total"] == saves + 1
    following = chat + [{"role": "user", "content": "And of Italy?"}]
    want = saver.client().chat.completions.create(model="x", messages=following, temperature=0, max_tokens=16)
    reuse = min(common_prefix(tokens, ref.chat_tokens(following)), len(ref.chat_tokens(following)) - 1) // 16 * 16
    assert reuse >= 32 and want.usage.prompt_tokens_details.cached_tokens == reuse

    fresh = Server(smollm2_q4_bin, slot_save_path=slot_dir, parallel=2)
    try:
        status, restored = post(fresh.url + "/slots/restore", {"filename": "chat1.kvc"})
        assert status == 200, restored
        assert restored["filename"] == "chat1.kvc" and restored["n_restored"] == len(tokens)
        assert restored["n_read"] == saved["n_written"] and restored["timings"]["restore_ms"] > 0
        m = fresh.metrics()
        assert m["kvc_slot_restores_total"] == 1 and m["kvc_kv_blocks_cached"] == len(tokens) // 16
        assert m["kvc_prefix_cache_hit_tokens_total"] == 0
        got = fresh.client().chat.completions.create(model="x", messages=following, temperature=0, max_tokens=16)
        assert got.usage.prompt_tokens_details.cached_tokens == reuse
        assert fresh.metrics()["kvc_prefix_cache_hit_tokens_total"] == reuse
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.usage.prompt_tokens == want.usage.prompt_tokens
    finally:
        fresh.close()


def test_slot_a_saved_prompt_and_the_alias_route(saver, slot_dir, ref):
    """POST /slots/{id}?action=save|restore (llama.cpp's route) does what /slots/save and /restore
    do; a text prompt is tokenized as /v1/completions does it, and its blocks serve a completion."""
    prompt = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a "
              "goldsmith of Mainz, combined movable metal type, oil-based ink and a wooden screw press into")
    status, saved = post(saver.url + "/slots/3?action=save", {"filename": "text.kvc", "prompt": prompt})
    assert status == 200 and saved["id_slot"] == 3 and saved["n_saved"] == len(ref.encode(prompt, bos=True)), saved
    status, restored = post(saver.url + "/slots/0?action=restore", {"filename": "text.kvc"})
    assert status == 200 and restored["id_slot"] == 0 and restored["n_restored"] == saved["n_saved"], restored
    r = saver.client().completions.create(model="x", prompt=prompt + " printed", temperature=0, max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens == saved["n_saved"] // 16 * 16 > 0
    for url, param in [("/slots/x?action=save", "id_slot"), ("/slots/-1?action=save", "id_slot"),
                       ("/slots/0?action=erase", "action"), ("/slots/0", "action")]:
        assert_error(*post(saver.url + url, {"filename": "text.kvc", "prompt": prompt}), 400, param)


def test_slots_are_refused_without_a_save_path(server):
    for url in ("/slots/save", "/slots/restore", "/slots/0?action=restore"):
        status, body = post(server.url + url, {"filename": "chat1.kvc", "messages": HELLO})
        assert status == 501 and body["error"]["type"] == "not_supported_error", body
        assert "saving is off" in body["error"]["message"]


@pytest.mark.parametrize("filename", ["../x", "a/b", ".hidden", "..", "a..b", "/etc/passwd", "a\\b", "a\0b", "",
                                      "x" * 256, "é" * 128, 5, None])
@pytest.mark.parametrize("action", ["save", "restore"])
def test_bad_slot_filenames_are_400(saver, slot_dir, filename, action):
    before = sorted(p.name for p in slot_dir.parent.rglob("*"))
    status, body = post(saver.url + f"/slots/{action}", {"filename": filename, "messages": HELLO})
    assert_error(status, body, 400, "filename")
    assert sorted(p.name for p in slot_dir.parent.rglob("*")) == before  # nothing written, in or beside it


def test_slot_names_at_the_limits(saver, slot_dir):
    """Saving takes names of up to 244 bytes (the temporary file's name is 11 bytes longer), restoring
    up to 255."""
    for name in ("x" * 244, "é" * 122, "chat.v2.kvc"):
        status, body = post(saver.url + "/slots/save", {"filename": name, "prompt": "Hello there"})
        assert status == 200 and (slot_dir / name).is_file(), body
        assert post(saver.url + "/slots/restore", {"filename": name})[0] == 200
    assert_error(*post(saver.url + "/slots/save", {"filename": "x" * 245, "prompt": "Hello"}), 400, "filename")
    assert_error(*post(saver.url + "/slots/restore", {"filename": "x" * 255}), 404, "filename")


def test_slot_save_refuses_bad_conversations(saver):
    for body, param in [({"filename": "c.kvc"}, "messages"),
                        ({"filename": "c.kvc", "messages": HELLO, "prompt": "x"}, "messages"),
                        ({"filename": "c.kvc", "messages": []}, "messages"),
                        ({"filename": "c.kvc", "prompt": ""}, "prompt"),
                        ({"filename": "c.kvc", "prompt": "word " * CONTEXT}, "prompt")]:
        assert_error(*post(saver.url + "/slots/save", body), 400, param)


def test_restore_refusals(smollm2_q4_bin, saver, slot_dir):
    """A missing file is 404; a truncated, corrupt or foreign file (another cache type, not a
    session) 400 with the library's line (naming the file, not the folder); a pool too small, 503."""
    assert_error(*post(saver.url + "/slots/restore", {"filename": "none.kvc"}), 404, "filename")
    status, saved = post(saver.url + "/slots/save", {"filename": "good.kvc", "messages": SYSTEM_CHAT})
    assert status == 200, saved
    data = (slot_dir / "good.kvc").read_bytes()
    (slot_dir / "truncated.kvc").write_bytes(data[:-1])
    (slot_dir / "corrupt.kvc").write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    (slot_dir / "notes.txt").write_bytes(b"not a session at all")
    with Model(smollm2_q4_bin, seq_len=64, threads=1) as m, m.pool(blocks=4, cache_type_k="f16") as pool:
        seq = pool.sequence()
        pool.step([(seq, m.chat_tokens(SYSTEM_CHAT))])
        seq.save_state(slot_dir / "f16.kvc")
    for name, words in [("truncated.kvc", "truncated"), ("corrupt.kvc", "checksum"), ("notes.txt", "not a kvc session"),
                        ("f16.kvc", "cache types f16/f32")]:
        err = assert_error(*post(saver.url + "/slots/restore", {"filename": name}), 400, "filename")
        assert words in err["message"] and name in err["message"] and str(slot_dir) not in err["message"], err
        assert "\n" not in err["message"]
    small = Server(smollm2_q4_bin, slot_save_path=slot_dir, kv_blocks=2)
    try:
        err = assert_error(*post(small.url + "/slots/restore", {"filename": "good.kvc"}), 503)
        assert err["code"] == "kv_cache_full"
        assert small.metrics()["kvc_slot_restores_total"] == 0
        status, body = post(small.url + "/slots/save", {"filename": "big.kvc", "messages": SYSTEM_CHAT})
        assert_error(status, body, 400, "messages")  # it can never fit in 2 blocks
        assert not (slot_dir / "big.kvc").exists()
    finally:
        small.close()


# -- the command line --------------------------------------------------------------------------------


def _serve_cli(*args, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "kvc.serve", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("args", [[], ["--parallel", "0"], ["--port", "x"], ["--nonsense"], ["-ctk", "q9"],
                                  ["--kv-memory", "lots"], ["--kv-blocks", "4", "--kv-memory", "1G"],
                                  ["--block-size", "0"], ["--max-step-tokens", "0"], ["--kv-memory", "1KiB"],
                                  ["--slot-save-path", "README.md"], ["--sinks", "4"], ["--window", "20"]])
def test_cli_bad_flags_exit_1_with_one_line(smollm2_q4_bin, args):
    model = [] if not args else [smollm2_q4_bin]
    p = _serve_cli(*model, "--port", "0", *args)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1 and err.count("\n") == 1 and err.startswith("kvc.serve: error: "), err


def test_cli_missing_model(tmp_path):
    p = _serve_cli(tmp_path / "none.bin")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1 and err.strip() == f"kvc.serve: error: no model file at {tmp_path / 'none.bin'}"


def test_cli_serves(smollm2_q4_bin, tmp_path):
    p = _serve_cli(smollm2_q4_bin, "--port", "0", "-c", "256", "-t", "1", "--model-name", "smol",
                   "--log-level", "warning", "-np", "4", "--kv-memory", "8MiB", "--block-size", "32",
                   "--max-step-tokens", "64", "--slot-save-path", tmp_path / "slots")
    try:
        line = p.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match and "parallel 4" in line and " blocks of 32," in line, line
        client = openai.OpenAI(base_url=match.group(0), api_key="none", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["smol"]
        r = client.chat.completions.create(model="smol", messages=HELLO, max_tokens=3)
        assert r.model == "smol" and r.usage.completion_tokens <= 3
        url = match.group(0).removesuffix("/v1")
        status, saved = post(url + "/slots/save", {"filename": "a.kvc", "messages": HELLO})
        assert status == 200 and (tmp_path / "slots" / "a.kvc").stat().st_size == saved["n_written"], saved
    finally:
        p.terminate()
        p.communicate(timeout=30)
    assert p.returncode in (0, -15)


# -- the stop-string matcher alone --------------------------------------------------------------------


def test_stop_matcher_on_every_split():
    """Whatever the pieces, the text sent is the text before the first stop string, and nothing past
    that point is ever sent first (a held-back stop start is never let out)."""
    import random

    from kvc.serve.stops import StopMatcher

    rng = random.Random(0)
    text = "Hello there, general Kenobi. The end.</s> more"
    for stops, want in [(["</s>"], "Hello there, general Kenobi. The end."), (["general", "there"], "Hello "),
                        (["Kenobi. T", "xyz"], "Hello there, general "), (["zzz"], text), ([""], text)]:
        for _ in range(200):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 12)))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            matcher, sent, hit = StopMatcher(stops), "", False
            for piece in pieces:
                out, hit = matcher.feed(piece)
                sent += out
                assert want.startswith(sent)
                if hit:
                    break
            if not hit:
                sent += matcher.finish()
            assert sent == want and hit == (want != text)


# -- the scheduler alone, on a fake pool ---------------------------------------------------------------


class Greedy:
    def sample(self, logits) -> int:
        return int(logits.argmax())


class Drifting:
    """Greedy plus a seeded random offset: its output depends on its state carrying on (a sampler
    run twice on the same logits, or started afresh, would give other tokens)."""

    def __init__(self, seed: int):
        import random
        self.rng = random.Random(seed)

    def sample(self, logits) -> int:
        return (int(logits.argmax()) + self.rng.randrange(3)) % len(logits)


def sched_request(prompt, n=1, max_tokens=None, stop_ids=(), sampler=Greedy):
    from kvc.serve.scheduler import ScheduledRequest
    samplers = [sampler(i) if sampler is Drifting else sampler() for i in range(n)]
    return ScheduledRequest(prompt=list(prompt), samplers=samplers, max_tokens=max_tokens, stop_ids=stop_ids)


def run_scheduler(sched, requests, max_steps=10_000, on_step=None):
    """Add requests and step until nothing is left: {(request number, choice index): (tokens sampled
    from now on, finish_reason)}, numbering the requests already there first."""
    requests = sched.requests + list(requests)
    for r in requests[len(sched.requests):]:
        sched.add(r)
    texts: dict[tuple[int, int], list[int]] = {}
    reasons: dict[tuple[int, int], str] = {}
    number = {id(r): i for i, r in enumerate(requests)}
    for _ in range(max_steps):
        if not sched.has_work:
            break
        running_before = sched.running
        out = sched.step()
        for choice, token in out.sampled:
            texts.setdefault((number[id(choice.request)], choice.index), []).append(token)
        for choice in out.finished:
            key = (number[id(choice.request)], choice.index)
            assert key not in reasons, f"{key} finished twice"
            reasons[key] = choice.finish_reason
        if on_step:
            on_step(sched, out, running_before)
    else:
        pytest.fail("the scheduler never ran out of work")
    return {k: (texts.get(k, []), reasons[k]) for k in reasons}


def prompts(count, length=lambda i: 5 + 7 * i):
    return [[1 + (i * 31 + j * 7) % 60 for j in range(length(i))] for i in range(count)]


def test_scheduler_chunks_prompts_under_the_step_cap():
    from kvc.serve.scheduler import Scheduler
    pool = FakePool(blocks=64, block_size=4)
    sched = Scheduler(pool, parallel=4, max_step_tokens=8)
    short, long_ = [1, 2, 3], list(range(1, 41))
    sched.add(sched_request(short, max_tokens=30))
    sched.step()  # the short prompt ran: it decodes from now on
    result = run_scheduler(sched, [sched_request(long_, max_tokens=3)])
    assert all(sum(n for _, n in step) <= 8 for step in pool.steps)
    long_steps = [step for step in pool.steps[1:] if any(n > 1 for _, n in step)]
    assert len(long_steps) >= 40 // 8  # the long prompt ran in chunks of at most 8 tokens...
    assert all(len(step) == 2 and min(n for _, n in step) == 1 for step in long_steps)  # ...beside a decode token
    assert result[(1, 0)][1] == "length" and len(result[(1, 0)][0]) == 3
    assert pool.stats().used == 0


def alone(prompt_list, context=None, **kw):
    """Each request run by itself on a roomy pool: the reference outputs."""
    from kvc.serve.scheduler import Scheduler
    want = {}
    for i, p in enumerate(prompt_list):
        sched = Scheduler(FakePool(blocks=256, block_size=4), parallel=1, context=context)
        for (_, index), v in run_scheduler(sched, [sched_request(p, **kw)]).items():
            want[(i, index)] = v
    return want


@pytest.mark.parametrize("sampler", [Greedy, Drifting])
def test_scheduler_preempts_the_newest_and_outputs_do_not_change(sampler):
    from kvc.serve.scheduler import Scheduler
    ps = prompts(8)
    want = alone(ps, max_tokens=24, n=2, sampler=sampler)
    pool = FakePool(blocks=24, block_size=4)  # 96 positions for 16 choices of up to 5..54 + 24 tokens
    sched = Scheduler(pool, parallel=16, max_step_tokens=32)

    def newest_preempted(sched, out, before):
        left = [c for c in before if c.seq is None and c.finish_reason is None]  # preempted in this step
        assert before[len(before) - len(left):] == left  # the most recently started ones

    got = run_scheduler(sched, [sched_request(p, max_tokens=24, n=2, sampler=sampler) for p in ps],
                        on_step=newest_preempted)
    assert sched.preemptions > 0
    assert got == want and len(got) == 16
    assert pool.stats().used == 0 and not pool.live and not sched.requests


def test_scheduler_refuses_what_cannot_fit_alone():
    from kvc.serve.scheduler import Scheduler
    pool = FakePool(blocks=4, block_size=4)  # 16 positions
    sched = Scheduler(pool, parallel=2)
    assert sched.check(10, 7) is None  # 10 + 7 - 1 = 16 positions: exactly the pool
    assert "lower max_tokens" in sched.check(10, 8)
    assert "17 KV positions" in sched.check(17, None) and sched.check(16, None) is None
    with pytest.raises(ValueError, match="blocks"):
        sched.add(sched_request(range(1, 11), max_tokens=8))
    assert not sched.has_work
    # max_tokens None: it runs until it fills the pool alone, then ends with "length"
    (tokens, reason), = run_scheduler(sched, [sched_request(range(1, 6))]).values()
    assert reason == "length" and len(tokens) == 16 - 5 + 1  # the last token sampled is never fed
    assert pool.stats().used == 0


def test_scheduler_max_tokens_none_beside_others_is_preempted_not_cut():
    from kvc.serve.scheduler import Scheduler
    pool = FakePool(blocks=8, block_size=4)
    sched = Scheduler(pool, parallel=2, context=24)
    got = run_scheduler(sched, [sched_request(range(1, 6)), sched_request(range(2, 7))])
    # each ends at the context (24 positions), preempting the other when the pool (32) runs short
    assert {k: (len(t), r) for k, (t, r) in got.items()} == {(0, 0): (20, "length"), (1, 0): (20, "length")}
    assert sched.preemptions > 0
    assert got == {**alone([range(1, 6)], context=24), (1, 0): alone([range(2, 7)], context=24)[(0, 0)]}


def test_scheduler_cancel_frees_blocks():
    from kvc.serve.scheduler import Scheduler
    pool = FakePool(blocks=64, block_size=4)
    sched = Scheduler(pool, parallel=2, max_step_tokens=16)
    requests = [sched_request(p, n=2, max_tokens=50) for p in prompts(3)]
    for r in requests:
        sched.add(r)
    for _ in range(4):
        sched.step()
    assert pool.stats().used > 0 and sched.running and sched.waiting
    for r in requests:
        sched.cancel(r)
    assert pool.stats().used == 0 and not pool.live
    assert not sched.has_work and not sched.requests and all(r.done for r in requests)
    assert {c.finish_reason for r in requests for c in r.choices} == {"cancelled"}


def test_scheduler_forks_share_the_prompt_blocks():
    from kvc.serve.scheduler import Scheduler
    pool = FakePool(blocks=64, block_size=4)
    sched = Scheduler(pool, parallel=4)
    request = sched_request(range(1, 11), n=3, max_tokens=5)  # 10 tokens: 2 full blocks and a partial one
    sched.add(request)
    out = sched.step()
    assert [c.index for c, _ in out.sampled] == [0, 1, 2]
    first, *forks = request.choices
    assert all(f.seq.blocks == first.seq.blocks for f in forks) and pool.stats().used == 3
    sched.step()  # each writes its own token into the shared partial block: copied on write
    assert all(f.seq.blocks[:2] == first.seq.blocks[:2] and f.seq.blocks[2] != first.seq.blocks[2] for f in forks)
    assert pool.stats().used == 2 + 3
    run_scheduler(sched, [])
    assert request.done and pool.stats().used == 0


def test_scheduler_more_choices_than_slots():
    from kvc.serve.scheduler import Scheduler
    want = alone([range(1, 11)], n=3, max_tokens=6, sampler=Drifting)
    sched = Scheduler(FakePool(blocks=64, block_size=4), parallel=1)
    got = run_scheduler(sched, [sched_request(range(1, 11), n=3, max_tokens=6, sampler=Drifting)])
    assert got == want and len(got) == 3 and len({tuple(t) for t, _ in got.values()}) > 1


def test_scheduler_prefix_cache_hits_on_a_repeated_prompt():
    from kvc.serve.scheduler import Scheduler
    pool = FakePool(blocks=64, block_size=4)
    sched = Scheduler(pool, parallel=2)
    first, second = sched_request(range(1, 12), max_tokens=3), sched_request(range(1, 12), max_tokens=3)
    got = run_scheduler(sched, [first])
    assert first.cached_tokens == 0 and pool.prefix_hit_tokens == 0
    got2 = run_scheduler(sched, [second])
    assert second.cached_tokens == 8 and pool.prefix_hit_tokens == 8  # 2 full blocks; 3 tokens still run
    assert got == got2


def test_scheduler_stop_tokens_and_max_tokens_zero():
    from kvc.serve.scheduler import Scheduler
    pool = FakePool(blocks=64, block_size=4)
    (tokens, _), = alone([range(1, 6)], max_tokens=10).values()
    stop = tokens[3]
    sched = Scheduler(pool, parallel=2)
    got = run_scheduler(sched, [sched_request(range(1, 6), max_tokens=10, stop_ids={stop}),
                                sched_request(range(1, 6), max_tokens=0, n=2)])
    assert got == {(0, 0): (tokens[:tokens.index(stop)], "stop"), (1, 0): ([], "length"), (1, 1): ([], "length")}
    assert pool.stats().used == 0


def test_a_windowed_server_answers_as_a_windowed_model(smollm2_q4_bin):
    """--window: two requests at once, each generating past its 32-position window (several moves
    of it), give kvc.Model(window=32)'s greedy texts; the KV blocks in use stay bounded."""
    prompts = ["The capital of France is", "Once upon a time there was a"]
    with Model(smollm2_q4_bin, window=32, sinks=4, threads=1) as m:
        want = ["".join(m.generate(p, max_tokens=90, temperature=0)) for p in prompts]
        generated = m.stats.generated_tokens
    s = Server(smollm2_q4_bin, parallel=2, window=32, sinks=4)
    try:
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda p: s.client().completions.create(model="x", prompt=p, max_tokens=90,
                                                                        temperature=0), prompts))
        assert [r.choices[0].text for r in got] == want
        assert got[1].usage.completion_tokens == generated > 48  # past the window and its sinks' block
        assert s.metrics()["kvc_kv_blocks_total"] == 2 * 3  # the sinks' block and the window's two, each
    finally:
        s.close()
