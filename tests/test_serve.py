"""`glmrt serve` against real clients: the official `openai` package (and httpx where a client
must send what openai's cannot, like broken JSON) talking to a live server on a loopback port.
The tiny model's replies are steered by forcing tokens (tests/steer.py) through the app's test
hook; nothing of the runtime is mocked. GLM-4-0414's tool calls, GLM-Z1's reasoning, streams,
usage, stop strings, every error status, a disconnect freeing its slot, SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import glmrt
from serving import live_server
from steer import Script

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time now",
                                         "parameters": {"type": "object", "properties": {}}}}
HELLO = "\nHello there, friend. How are you today?"


def weather(prompt):
    if "<|observation|>" not in prompt:
        return 'get_weather\n{"city": "Paris"}<|assistant|>get_time\n{}<|observation|>'
    return "\nIt is 20C at noon.<|user|>"


class Slow(Script):
    """A script that takes `delay` seconds per token (a generation that is still running)."""
    delay = 0.01

    def __call__(self, ids, logits):
        time.sleep(self.delay)
        return super().__call__(ids, logits)


REPLIES = {
    "hello": lambda p: HELLO + "<|user|>",
    "weather": weather,
    "bad-call": lambda p: 'get_weather\n{"city": Paris}<|observation|>',
    "call-shaped": lambda p: 'get_weather\n{"city": "Rome"}<|observation|>',
    "z1": lambda p: "First, 2 and 2.\nSo 4.</think>\nThe answer is 4.<|user|>",
    "long": lambda p: "\n" + "word " * 1500 + "<|user|>",
}


class Steering:
    """The app's test hook: the request's "x_steer" names the scripted reply (clients may send
    extra fields; without the hook the server ignores them). Keeps every script it made."""

    def __init__(self, model):
        self.model, self.scripts = model, []

    def __call__(self, body):
        key = body.get("x_steer")
        if key is None:
            return None
        script = (Slow if key == "long" else Script)(self.model.tokenizer, REPLIES[key])
        self.scripts.append(script)
        return script


@pytest.fixture(scope="module")
def tiny(exported):
    return glmrt.load(exported("tiny"))


@pytest.fixture(scope="module")
def server(tiny):
    steering = Steering(tiny)
    with live_server(tiny, model_name="tiny", logits_processor_for=steering) as url:
        yield url, steering


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def steer(key, **kw):
    return {"extra_body": {"x_steer": key, **kw.pop("extra_body", {})}, **kw}


def user(text="Hi"):
    return [{"role": "user", "content": text}]


# ---- chat ----------------------------------------------------------------------------------
def test_chat_reply_and_usage_counts(client, tiny):
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=user(), max_tokens=64,
                                                           **steer("hello"))
    r = raw.parse()
    assert raw.headers["x-glmrt-replica"]
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    c = r.choices[0]
    assert (c.message.role, c.message.content, c.finish_reason) == ("assistant", HELLO.strip(), "stop")
    assert c.message.tool_calls is None
    want_completion = len(tiny.tokenizer.encode(HELLO + "<|user|>"))       # the stop token counts
    assert r.usage.prompt_tokens == len(tiny.prompt_ids(user()))
    assert r.usage.completion_tokens == want_completion
    assert r.usage.total_tokens == r.usage.prompt_tokens + want_completion


def test_chat_streamed_with_usage(client, tiny):
    chunks = list(client.chat.completions.create(model="tiny", messages=user(), max_tokens=64, stream=True,
                                                 stream_options={"include_usage": True}, **steer("hello")))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3, "the answer came in one piece: it was not streamed"
    assert "".join(pieces) == HELLO.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        tiny.tokenizer.encode(HELLO + "<|user|>"))
    assert len({c.id for c in chunks}) == 1


def test_chat_without_include_usage_sends_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=user(), max_tokens=64, stream=True,
                                                 **steer("hello")))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_reply(client, stream):
    kw = dict(model="tiny", messages=user(), max_tokens=64, stop=["friend", "zzz"], **steer("hello"))
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        r = client.chat.completions.create(**kw)
        text, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
    assert text == "Hello there," and finish == ["stop"]


def test_library_stop_holds_back_what_may_become_a_stop_string(tiny):
    script = Script(tiny.tokenizer, REPLIES["hello"])
    deltas = list(tiny.chat_stream(user(), logits_processor=script, stop="How are", max_new_tokens=64))
    assert deltas[-1].message["content"] == "Hello there, friend." and deltas[-1].message["finish_reason"] == "stop"
    shown = "".join(d.text for d in deltas if d.kind == "content")
    assert shown == "Hello there, friend." and "How" not in shown


def test_concurrent_streams_each_get_their_own_reply(server):
    url = server[0]
    results = {}

    def ask(key):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        s = c.chat.completions.create(model="tiny", messages=user(), max_tokens=64, stream=True, **steer(key))
        deltas = [ch.choices[0].delta for ch in s if ch.choices]
        results[key] = ("".join(d.model_extra.get("reasoning_content", "") for d in deltas),
                        "".join(d.content or "" for d in deltas))
    threads = [threading.Thread(target=ask, args=(k,)) for k in ("hello", "z1", "weather", "call-shaped")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["hello"] == ("", HELLO.strip())
    assert results["z1"] == ("First, 2 and 2.\nSo 4.", "The answer is 4.")        # a lone </think>
    # no tools in the request: call-shaped replies come back as text
    assert results["weather"] == ("", 'get_weather\n{"city": "Paris"}\nget_time\n{}')
    assert results["call-shaped"] == ("", 'get_weather\n{"city": "Rome"}')


# ---- GLM-4-0414 tool calls ----------------------------------------------------------------
def _calls_from_stream(chunks):
    calls = {}
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            c = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": "", "error": None})
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
            c["error"] = (tc.model_extra or {}).get("error") or c["error"]
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_full_round_trip(client, server, stream):
    steering = server[1]
    messages = user("Weather in Paris, and the time?")
    kw = dict(model="tiny", tools=[WEATHER, TIME], max_tokens=64, **steer("weather"))
    if stream:
        chunks = list(client.chat.completions.create(messages=messages, stream=True, **kw))
        calls = _calls_from_stream(chunks)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["tool_calls"]
        assistant = {"role": "assistant", "content": None, "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls]}
    else:
        r = client.chat.completions.create(messages=messages, **kw)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments, "error": None}
                 for c in r.choices[0].message.tool_calls]
        assistant = r.choices[0].message.model_dump(exclude_none=True)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                        ("get_time", {})]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    results = [{"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"t": 20}'},
               {"role": "tool", "tool_call_id": calls[1]["id"], "content": "noon"}]
    final = client.chat.completions.create(messages=messages + [assistant] + results, **kw)
    assert final.choices[0].message.content == "It is 20C at noon."
    assert final.choices[0].finish_reason == "stop"
    # the model saw its calls and their results in GLM-4-0414's own form
    assert steering.scripts[-1].prompts[0].endswith(
        '<|assistant|>get_weather \n{"city": "Paris"}<|assistant|>get_time \n{}'
        '<|observation|>\n{"t": 20}<|observation|>\nnoon<|assistant|>')


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_the_parser_rejects_is_reported_not_dropped(client, stream):
    kw = dict(model="tiny", messages=user(), tools=[WEATHER], max_tokens=64, **steer("bad-call"))
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        (call,) = _calls_from_stream(chunks)
        error, finish = call["error"], chunks[-1].choices[0].finish_reason
    else:
        r = client.chat.completions.create(**kw)
        (tc,) = r.choices[0].message.tool_calls
        call = {"name": tc.function.name, "arguments": tc.function.arguments}
        error, finish = tc.model_extra["error"], r.choices[0].finish_reason
    assert (call["name"], call["arguments"], finish) == ("get_weather", "{}", "tool_calls")
    assert error.startswith("arguments are not valid JSON")


def test_tool_choice_none_leaves_tools_out_and_returns_text(client, server):
    r = client.chat.completions.create(model="tiny", messages=user(), tools=[WEATHER], tool_choice="none",
                                       max_tokens=64, **steer("call-shaped"))
    assert "get_weather" not in server[1].scripts[-1].prompts[0]
    m = r.choices[0].message
    assert m.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert m.content == 'get_weather\n{"city": "Rome"}'


@pytest.mark.parametrize("choice,names", [
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ("required", {"get_weather", "get_time"})])
def test_tool_choice_named_and_required_make_the_model_call(client, choice, names):
    # unsteered: the random model writes anything, except that the reply must open with a call
    r = client.chat.completions.create(model="tiny", messages=user(), tools=[WEATHER, TIME],
                                       tool_choice=choice, max_tokens=12, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name in names
    assert r.choices[0].finish_reason in ("tool_calls", "length")


# ---- GLM-Z1 reasoning ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def z1_client(exported):
    m = glmrt.load(exported("z1"))
    with live_server(m, model_name="z1", logits_processor_for=Steering(m)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_z1_reasoning_content(z1_client):
    r = z1_client.chat.completions.create(model="z1", messages=user("2+2?"), max_tokens=64, **steer("z1"))
    m = r.choices[0].message
    assert m.model_extra["reasoning_content"] == "First, 2 and 2.\nSo 4." and m.content == "The answer is 4."
    chunks = list(z1_client.chat.completions.create(model="z1", messages=user("2+2?"), max_tokens=64,
                                                    stream=True, **steer("z1")))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [d.model_extra.get("reasoning_content") for d in deltas if d.model_extra.get("reasoning_content")]
    assert len(reasoning) > 1 and "".join(reasoning) == "First, 2 and 2.\nSo 4."
    assert "".join(d.content or "" for d in deltas) == "The answer is 4."
    # reasoning streams before the answer
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not d.model_extra.get("reasoning_content") for d in deltas[first_content:])


# ---- completions ---------------------------------------------------------------------------
def test_completions_streamed_and_not(client, tiny):
    r = client.completions.create(model="tiny", prompt="Say hello", max_tokens=64, **steer("hello"))
    assert r.object == "text_completion" and r.choices[0].text == HELLO and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(tiny.tokenizer.encode("Say hello"))
    chunks = list(client.completions.create(model="tiny", prompt="Say hello", max_tokens=64, stream=True,
                                            stream_options={"include_usage": True}, **steer("hello")))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == HELLO
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    cut = client.completions.create(model="tiny", prompt="Say hello", max_tokens=64, stop=[","], **steer("hello"))
    assert cut.choices[0].text == "\nHello there" and cut.choices[0].finish_reason == "stop"
    short = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, **steer("hello"))
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


# ---- the rest of the surface ---------------------------------------------------------------
def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    h = httpx.get(server[0] + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    client.chat.completions.create(model="tiny", messages=user(), max_tokens=64, **steer("hello"))
    text = httpx.get(server[0] + "/metrics").text
    replica = h.headers["x-glmrt-replica"]
    assert f'glmrt_info{{replica="{replica}",model="tiny"}} 1' in text
    assert _metric(server[0], "glmrt_requests_total", 'route="/v1/chat/completions",status="200"') >= 1
    assert _metric(server[0], "glmrt_prompt_tokens_total") > 0
    assert _metric(server[0], "glmrt_generation_tokens_total") > 0
    assert _metric(server[0], "glmrt_time_to_first_token_seconds_count") >= 1
    for name in ("glmrt_queue_length", "glmrt_requests_running", "glmrt_decode_tokens_per_second_count"):
        assert f"\n{name}{{" in text


def test_chat_page_is_served_self_contained(server):
    r = httpx.get(server[0] + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "reasoning" in r.text.lower()
    assert "http://" not in r.text and "https://" not in r.text       # nothing fetched from elsewhere


def test_error_statuses(client, server, tiny):
    url = server[0]
    with pytest.raises(openai.BadRequestError) as e:                           # bad parameter
        client.chat.completions.create(model="tiny", messages=user(), temperature=5)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="context"):               # max_tokens over the context
        client.chat.completions.create(model="tiny", messages=user(), max_tokens=tiny.max_context + 1)
    with pytest.raises(openai.BadRequestError, match="context"):               # prompt over the context
        client.chat.completions.create(model="tiny", messages=user("word " * 3000), max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"content": "no role"}])
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="tiny", messages=user(), tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    r = httpx.post(url + "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]     # malformed JSON
    with pytest.raises(openai.NotFoundError) as e:                             # unknown model
        client.chat.completions.create(model="gpt-4o", messages=user())
    assert e.value.body["code"] == "model_not_found"
    r = httpx.get(url + "/v1/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_route"
    r = httpx.get(url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(openai.APIStatusError) as e:                            # body too large
        client.chat.completions.create(model="tiny", messages=user(), extra_body={"pad": "x" * (2 << 20)})
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"


def test_api_key_guards_every_route_but_health(tiny):
    with live_server(tiny, model_name="tiny", api_key="s3cret") as url:
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="tiny", messages=user(), max_tokens=2)
        for method, path in (("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/nope"),
                             ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
            r = httpx.request(method, url + path, json={})                      # no key at all
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert httpx.get(url + "/health").status_code == 200
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=user(), max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def _metric(url, name, labels=""):
    """The value of the series `name` whose labels include `labels`."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} missing")


def test_full_queue_is_429_and_a_disconnect_frees_the_slot(exported):
    one_slot = glmrt.load(exported("tiny"), slots=1, max_queue=0)
    steering = Steering(one_slot)
    with live_server(one_slot, model_name="tiny", logits_processor_for=steering) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = c.chat.completions.create(model="tiny", messages=user(), max_tokens=1500, stream=True,
                                           **steer("long"))
        got = [next(stream) for _ in range(4)]                      # the one slot is taken, mid-stream
        assert "".join(ch.choices[0].delta.content or "" for ch in got).startswith("word")
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="tiny", messages=user(), max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "queue_full"
        stream.close()                                              # the client goes away
        deadline = time.monotonic() + 10
        while _metric(url, "glmrt_requests_running") > 0:
            assert time.monotonic() < deadline, "the slot was not freed after the disconnect"
            time.sleep(0.05)
        assert _metric(url, "glmrt_generations_cancelled_total") == 1
        forced = steering.scripts[0]
        assert forced.last - forced.start < 1000, "the generation ran on after its client left"
        r = c.chat.completions.create(model="tiny", messages=user(), max_tokens=64, **steer("hello"))
        assert r.choices[0].message.content == HELLO.strip()


def test_import_glmrt_does_not_import_the_server_stack():
    code = ("import sys, glmrt, glmrt.model, glmrt.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'anyio', 'ray')"
            " or m.startswith('glmrt.serve')]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # plain `glmrt serve` (run.py, the app) does not import Ray either: only --ray does
    code = ("import sys, glmrt.serve.run, glmrt.serve.app; bad = [m for m in sys.modules if m.split('.')[0] == 'ray'"
            " or m == 'glmrt.serve.ray_app']; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- the command: SIGTERM --------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens,grace,want", [
    (100, 10, "length"),                          # the reply finishes within the grace period
    (1900, 0.5, "cut"),                           # it cannot: cut, with an error event, not dropped
])
def test_sigterm_drains_streams_and_exits_0(exported, tiny, max_tokens, grace, want):
    proc = subprocess.Popen([sys.executable, "-m", "glmrt.cli", "serve", str(exported("tiny")), "--port", "0",
                             "--grace", str(grace), "--name", "tiny"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "http://" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, f"no start line: {line!r}"
            line = proc.stderr.readline()
        url = line.split()[2]
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        ban_stops = {str(i): -100 for i in tiny.eos_ids}         # the reply runs to max_tokens
        stream = c.completions.create(model="tiny", prompt="Once upon", max_tokens=max_tokens, stream=True,
                                      logit_bias=ban_stops, temperature=0,
                                      stream_options={"include_usage": True})
        got = [next(stream)]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:                                   # no new work while draining: refused, or 503 until then
            assert httpx.get(url + "/health").status_code == 503
        except httpx.ConnectError:
            pass
        outcome = None
        try:
            for ch in stream:
                got.append(ch)
            outcome = [c.choices[0].finish_reason for c in got if c.choices and c.choices[0].finish_reason]
        except openai.APIError as e:                            # cut at the end of the grace period
            outcome = "cut: " + e.message
        if want == "cut":
            assert "shutting down" in outcome, outcome
        else:
            assert outcome == ["length"] and got[-1].usage.completion_tokens == max_tokens, outcome
        assert proc.wait(timeout=grace + 10) == 0
        assert time.monotonic() - t0 < grace + 10
        with pytest.raises(openai.APIConnectionError):              # nobody listens any more
            c.models.list()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stderr.close()


def test_command_errors_are_one_line(exported, tmp_path):
    import socket
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        for args, says in [([str(tmp_path / "nothing-here")], "nothing-here"),
                           ([str(exported("tiny")), "--port", str(busy.getsockname()[1])], "cannot listen on")]:
            r = subprocess.run([sys.executable, "-m", "glmrt.cli", "serve", *args], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 2 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        busy.close()


def test_queue_full_from_the_model_is_429_with_retry_after():
    # continuous batching raises glmrt's QueueFullError when a generation starts: same answer
    from glmrt.errors import QueueFullError
    from glmrt.serve.protocol import as_api_error
    e = as_api_error(QueueFullError("4 slots busy, 8 waiting"))
    assert (e.status, e.headers, e.body()["error"]["type"]) == (429, {"Retry-After": "1"}, "rate_limit_error")
