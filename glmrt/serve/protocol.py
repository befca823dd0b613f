"""The OpenAI API in glmrt's terms, with no web framework: a request body is checked and turned
into one glmrt generation (a Job), the generation's deltas become OpenAI's response objects and
stream chunks, and every refusal is an ApiError that renders as OpenAI's error object.
glmrt/serve/app.py puts this on HTTP; any other host (a Ray Serve replica) can reuse it.

GLM semantics in OpenAI's shape (docs/GLM4.md, "Chat format"):
  - the model's marker-less calls come back as `tool_calls` (ids, JSON string arguments,
    finish_reason "tool_calls"); a call the parser rejects keeps its "error" key, never dropped;
  - `role: tool` results go back to the model as observations (glmrt.reply.to_glm_messages);
  - GLM-Z1's reasoning, which starts without <think>, is `reasoning_content`;
  - tool_choice "required" or a named function makes the reply start with a tool's name
    (GLM's call format), by masking every other token while the name is written.
"""
from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Callable, Iterator

import numpy as np

from ..chat import Delta, find_stop, stop_strings
from ..errors import ContextOverflowError, GlmrtError, InputError, QueueFullError
from ..generate import Generation
from ..reply import NAME

ROLES = {"system", "developer", "user", "assistant", "tool"}
# fields we read; others (user, metadata, store, service_tier, ...) change nothing here
UNSUPPORTED = {"logprobs": "logprobs", "top_logprobs": "logprobs", "echo": "echo",
               "suffix": "suffix", "best_of": "best_of"}
RETRY_AFTER_S = 1


class ApiError(Exception):
    """A refusal in OpenAI's error shape: {"error": {message, type, param, code}}."""
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def as_api_error(e: BaseException) -> ApiError:
    """Any failure of a generation, as the error a client should see."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(429, f"the server is busy: {e}", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, ContextOverflowError):
        return ApiError(400, str(e).split(";")[0], param="messages", code="context_length_exceeded")
    if isinstance(e, InputError):
        return ApiError(400, str(e))
    if isinstance(e, GlmrtError):
        return ApiError(500, str(e), code="runtime_error")
    return ApiError(500, f"{type(e).__name__}: {e}", code="internal_error")


# ---- a served model ----------------------------------------------------------------------
@dataclasses.dataclass
class Served:
    """What the protocol needs from a loaded glmrt Model, and the server's name for it."""
    model: object                   # glmrt.model.Model
    name: str                       # the id clients send as "model"
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    default_max_tokens: int | None = None   # chat, when the request gives none (None: the model's)

    @property
    def max_context(self) -> int:
        return self.model.max_context

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "glmrt",
                "max_model_len": self.max_context}

    def models(self) -> dict:
        return {"object": "list", "data": [self.card()]}


Processor = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass
class Job:
    """One request, checked: what to run (`open()` yields Deltas, in a worker thread) and how
    its Deltas look to the client (`chunks`, `response`)."""
    kind: str                       # "chat" | "completion"
    served: Served
    stream: bool
    include_usage: bool
    call: dict                      # keyword arguments for the glmrt call
    tool_choice: str | dict = "none"
    id: str = ""
    created: int = 0
    # filled as the job runs (the worker thread writes, the response reads after "done")
    t_first: float | None = None
    t_done: float | None = None
    usage: dict | None = None

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    # -- running ------------------------------------------------------------------------------
    def open(self) -> Iterator[Delta]:
        """The generation's deltas, ending in Delta("done", message={..., finish_reason}, usage).
        Closing the iterator early cancels the generation."""
        m = self.served.model
        if self.kind == "chat":
            return m.chat_stream(**self.call)
        return _completion_stream(m, **self.call)

    # -- what the client sees ------------------------------------------------------------------
    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.served.name}

    def first_chunks(self) -> list[dict]:
        if self.kind != "chat":
            return []
        return [{**self._base("chat.completion.chunk"), "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]}]

    def chunks(self, d: Delta) -> list[dict]:
        """Stream chunks for one delta (the last one: calls, finish_reason, usage)."""
        if self.kind == "completion":
            return self._completion_chunks(d)
        base = self._base("chat.completion.chunk")

        def chunk(delta, finish=None):
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]}
        if d.kind == "reasoning":
            return [chunk({"reasoning_content": d.text})]
        if d.kind == "content":
            return [chunk({"content": d.text})]
        message, finish = self._final(d)
        out = []
        if self.tool_choice == "none" and d.message.get("tool_calls"):
            out.append(chunk({"content": message["content"][len(d.message.get("content") or ""):]}))
        for i, c in enumerate(message.get("tool_calls", [])):
            out.append(chunk({"tool_calls": [{"index": i, **c}]}))
        out.append(chunk({}, finish))
        if self.include_usage:
            out.append({**base, "choices": [], "usage": self.usage})
        return out

    def response(self, d: Delta) -> dict:
        """The whole (not streamed) response from the final delta."""
        message, finish = self._final(d)
        if self.kind == "completion":
            return {**self._base("text_completion"), "choices": [
                {"index": 0, "text": d.message["text"], "logprobs": None, "finish_reason": finish}],
                "usage": self.usage}
        if message.get("tool_calls") and not message["content"]:
            message["content"] = None
        return {**self._base("chat.completion"), "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": self.usage}

    def _final(self, d: Delta) -> tuple[dict, str]:
        self.usage = {**d.usage, "total_tokens": d.usage["prompt_tokens"] + d.usage["completion_tokens"]}
        msg = dict(d.message)
        finish = msg.pop("finish_reason")
        msg.pop("text", None)
        calls = msg.get("tool_calls")
        if calls and self.tool_choice == "none":       # the client asked for text: calls are text
            written = "\n".join(f"{c['function']['name']}\n{c['function']['arguments']}" for c in calls)
            msg["content"] = "\n".join(x for x in (msg.get("content"), written) if x)
            del msg["tool_calls"]
        elif calls and finish == "stop":
            finish = "tool_calls"
        return msg, finish

    def _completion_chunks(self, d: Delta) -> list[dict]:
        base = self._base("text_completion")
        if d.kind == "content":
            return [{**base, "choices": [{"index": 0, "text": d.text, "logprobs": None,
                                          "finish_reason": None}]}]
        if d.kind != "done":
            return []
        _, finish = self._final(d)
        out = [{**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish}]}]
        if self.include_usage:
            out.append({**base, "choices": [], "usage": self.usage})
        return out


# ---- requests ---------------------------------------------------------------------------
def chat_job(served: Served, body, processor: Processor | None = None) -> Job:
    """POST /v1/chat/completions body -> Job (ApiError 400/404 when it cannot be served)."""
    body = _common(served, body)
    messages = _messages(body.get("messages"))
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), tools)
    for key in ("max_completion_tokens", "max_tokens"):     # the newer name wins
        if body.get(key) is not None:
            max_tokens = _int(body, key, 1, None)
            break
    else:
        max_tokens = served.default_max_tokens or served.model.default_max_new_tokens
    _context_bound(served, max_tokens, "max_tokens")
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise ApiError(400, "response_format: only {\"type\": \"text\"} is supported", param="response_format")
    processors = [processor, _logit_bias(served, body)]
    if choice not in ("none", "auto"):
        names = [t["function"]["name"] for t in tools] if choice == "required" else [choice["function"]["name"]]
        processors.append(StartWith([served.model.tokenizer.encode(n + "\n") for n in names]))
    call = dict(messages=messages, tools=tools if choice != "none" else None,
                max_new_tokens=max_tokens, stop=_stop(body), **_sampling(body),
                logits_processor=_chain(processors))
    return Job("chat", served, _bool(body, "stream"), _include_usage(body), call, choice)


def completion_job(served: Served, body, processor: Processor | None = None) -> Job:
    """POST /v1/completions body -> Job. The prompt is text (special-token strings in it are
    control tokens, as in a rendered prompt) or token ids; one prompt per request."""
    body = _common(served, body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = served.model.tokenizer.encode(prompt)
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool)
                                                      for i in prompt):
        ids = prompt
    else:
        raise ApiError(400, "prompt must be one string or one list of token ids", param="prompt")
    max_tokens = _int(body, "max_tokens", 0, None) if body.get("max_tokens") is not None else 16
    _context_bound(served, max_tokens, "max_tokens")
    if len(ids) + max(max_tokens, 1) > served.max_context:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({max_tokens}) do not fit the "
                            f"model's context ({served.max_context} tokens)", param="prompt",
                       code="context_length_exceeded")
    call = dict(ids=ids, max_new_tokens=max_tokens, stop=_stop(body), **_sampling(body),
                logits_processor=_chain([processor, _logit_bias(served, body)]))
    return Job("completion", served, _bool(body, "stream"), _include_usage(body), call)


def _completion_stream(model, *, ids, stop, **kwargs) -> Iterator[Delta]:
    """Raw text continuation as Deltas (content pieces, then done with "text" and usage);
    stop strings end it, held back while they may be forming."""
    res = Generation([])
    dec = model.tokenizer.stream(skip_special=False)
    hold = max(map(len, stop), default=1) - 1
    text, sent = "", 0
    tokens = model.stream(ids, result=res, **kwargs)
    try:
        for token in tokens:
            piece = dec.push(token)
            cut = find_stop(text, piece, stop)
            text += piece
            if cut is not None:
                text, res.finish_reason = text[:cut], "stop"
                break
            if len(text) - hold > sent:
                yield Delta("content", text[sent:len(text) - hold])
                sent = len(text) - hold
        else:
            piece = dec.flush()
            cut = find_stop(text, piece, stop)
            text = (text + piece)[:cut]
    finally:
        tokens.close()
    if len(text) > sent:
        yield Delta("content", text[sent:])
    yield Delta("done", message={"text": text, "finish_reason": res.finish_reason},
                usage={"prompt_tokens": len(ids), "completion_tokens": len(res.tokens)
                       + (res.stop_token is not None)})


class StartWith:
    """A logits processor that makes the reply begin with one of several token sequences
    (each a tool's `name\\n`, GLM's call format), then leaves the model free. One instance
    serves one generation."""

    def __init__(self, options: list[list[int]]):
        self.options = [list(o) for o in options if o]
        self.start = None

    def __call__(self, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if self.start is None:
            self.start = len(ids)                  # the first call sees the prompt alone
        written = list(ids[self.start:])
        k = len(written)
        live = [o for o in self.options if len(o) > k and o[:k] == written]
        if not live or any(o[:k] == written and len(o) == k for o in self.options):
            return logits
        allowed = sorted({o[k] for o in live})
        out = np.full_like(logits, -np.inf)
        out[allowed] = logits[allowed]
        return out


# ---- field checks (each names the field) --------------------------------------------------
def _common(served: Served, body) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served.name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served.name!r}",
                       param="model", code="model_not_found")
    for key, what in UNSUPPORTED.items():
        if body.get(key) not in (None, False, 0):
            raise ApiError(400, f"{key}: {what} is not supported by this server", param=key)
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n: only one choice per request is supported", param="n")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise ApiError(400, f"{key}: only 0 is supported (use repetition_penalty)", param=key)
    return body


def _sampling(body: dict) -> dict:
    out = {"temperature": _num(body, "temperature", 0.0, 2.0, 1.0),
           "top_p": _num(body, "top_p", 0.0, 1.0, 1.0, lo_open=True)}
    if body.get("top_k") is not None:
        out["top_k"] = _int(body, "top_k", 0, None)
    if body.get("repetition_penalty") is not None:
        out["repetition_penalty"] = _num(body, "repetition_penalty", 0.0, 100.0, 1.0, lo_open=True)
    if body.get("seed") is not None:
        out["seed"] = _int(body, "seed", 0, None)
    return out


def _num(body, key, lo, hi, default, lo_open=False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo \
            or v > hi or (lo_open and v == lo):
        raise ApiError(400, f"{key}={v!r} is out of range ({'(' if lo_open else '['}{lo}, {hi}])", param=key)
    return float(v)


def _int(body, key, lo, hi) -> int:
    v = body.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise ApiError(400, f"{key}={v!r} must be an integer >= {lo}" + (f" and <= {hi}" if hi else ""),
                       param=key)
    return v


def _bool(body, key) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"{key} must be true or false", param=key)
    return v


def _include_usage(body) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return _bool(opts, "include_usage")


def _context_bound(served: Served, max_tokens: int, key: str):
    if max_tokens > served.max_context:
        raise ApiError(400, f"{key}={max_tokens} is more than the model's context "
                            f"({served.max_context} tokens)", param=key)


def _stop(body):
    try:
        return stop_strings(body.get("stop"))
    except InputError as e:
        raise ApiError(400, str(e), param="stop") from None


def _logit_bias(served: Served, body) -> Processor | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ApiError(400, "logit_bias must map token ids to numbers in [-100, 100]", param="logit_bias")
    ids, values = [], []
    for k, v in bias.items():
        try:
            i = int(k)
        except (TypeError, ValueError):
            i = -1
        if not 0 <= i < served.model.config.vocab_size:
            raise ApiError(400, f"logit_bias: {k!r} is not a token id of this model", param="logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise ApiError(400, f"logit_bias[{k}]={v!r} must be a number in [-100, 100]", param="logit_bias")
        ids.append(i)
        values.append(float(v))
    ids_a, values_a = np.array(ids, np.int64), np.array(values, np.float32)

    def add(_ids, logits):
        logits[ids_a] += values_a
        return logits
    return add


def _chain(processors) -> Processor | None:
    ps = [p for p in processors if p is not None]
    if not ps:
        return None
    if len(ps) == 1:
        return ps[0]

    def run(ids, logits):
        for p in ps:
            logits = p(ids, logits)
        return logits
    return run


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where} needs a role: one of {', '.join(sorted(ROLES))}", param=where)
        role = "system" if m["role"] == "developer" else m["role"]
        msg = {"role": role, "content": _content(m.get("content"), where)}
        if role == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = _tool_calls(m["tool_calls"], where)
        elif msg["content"] is None:
            raise ApiError(400, f"{where}.content is missing", param=f"{where}.content")
        if role == "tool" and m.get("tool_call_id") is not None:
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _content(content, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content[{j}]: only text parts are supported",
                               param=f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


def _tool_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise ApiError(400, f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) \
                or not isinstance(f.get("arguments", "{}"), str):
            raise ApiError(400, f"{where}.tool_calls[{j}] needs function.name and function.arguments "
                                "(a JSON string)", param=f"{where}.tool_calls")
    return calls


def _tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "tools must be a list of {\"type\": \"function\", \"function\": {...}}", param="tools")
    for j, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not NAME.fullmatch(f["name"]):
            raise ApiError(400, f"tools[{j}] needs type \"function\" and a function name made of letters, "
                                "digits, _ . -", param="tools")
        if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
            raise ApiError(400, f"tools[{j}].function.parameters must be a JSON schema object", param="tools")
    return tools or None


def _tool_choice(choice, tools) -> str | dict:
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise ApiError(400, "tool_choice \"required\" needs tools", param="tool_choice")
        return choice if tools else "none"
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) \
        and choice.get("type") == "function" and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise ApiError(400, "tool_choice must be none, auto, required or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", param="tool_choice")
    if name not in {t["function"]["name"] for t in tools or []}:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return {"type": "function", "function": {"name": name}}
