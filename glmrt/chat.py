"""Chat on top of the generation loop: the prompt the model's own template makes (with user-typed
special-token text kept as text, and truncation that says what it dropped), and the reply
streamed as reasoning and content deltas that become certain as tokens arrive, then parsed
(glmrt/reply.py) into an OpenAI-shaped message.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Iterator

from .errors import InputError, TruncationWarning
from .generate import Generation
from .reply import ASSISTANT, THINK_CLOSE, THINK_OPEN, parse_reply, to_glm_messages
from .template import render


@dataclasses.dataclass
class Delta:
    kind: str                  # "reasoning", "content" or "done"
    text: str = ""
    message: dict | None = None    # done: the parsed assistant message and its finish_reason
    usage: dict | None = None      # done: prompt_tokens, completion_tokens (a stop token counts)


class Prompter:
    """Messages -> prompt text and ids, by the model's chat template and tokenizer."""

    def __init__(self, tokenizer, template: str, max_context: int):
        self.tokenizer, self.template, self.max_context = tokenizer, template, max_context

    def render(self, messages, tools=None, add_generation_prompt: bool = True) -> str:
        """The prompt with user-typed special-token text shielded (see Tokenizer.shield)."""
        tok = self.tokenizer
        return render(self.template, tok.shield(to_glm_messages(messages)), tools=tok.shield(tools),
                      add_generation_prompt=add_generation_prompt, special_tokens=tok.template_tokens())

    def prompt(self, messages, tools, truncate: bool, room: int) -> tuple[str, list[int]]:
        """(shielded prompt text, its token ids); see Model.prompt_ids."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InputError("messages must be a non-empty list of {'role', 'content'} dicts")
        messages, dropped = list(messages), 0
        while True:
            text = self.render(messages, tools)
            ids = self.tokenizer.encode_shielded(text)
            if not truncate or len(ids) + room <= self.max_context:
                break                  # too long without truncate: Model.stream says so
            drop = next((i for i, m in enumerate(messages[:-1]) if m.get("role") != "system"), None)
            if drop is None:
                messages[-1] = self._cut_last(messages[-1], len(ids) + room - self.max_context)
                continue
            del messages[drop]
            dropped += 1
        if dropped:
            warnings.warn(f"dropped the {dropped} oldest message(s) to fit the context "
                          f"({self.max_context} tokens)", TruncationWarning, stacklevel=4)
        return text, ids

    def _cut_last(self, message: dict, excess: int) -> dict:
        """The message with the oldest tokens of its content cut so the prompt shrinks by at
        least `excess` tokens (re-rendering checks the result)."""
        content = message.get("content")
        tokens = self.tokenizer.encode_literal(content) if isinstance(content, str) else []
        keep = len(tokens) - excess
        if keep <= 0:
            raise InputError(f"the system message, tools and template leave no room in the context "
                             f"({self.max_context} tokens) for the last message; shorten them")
        warnings.warn(f"the last message was cut to its newest {keep} of {len(tokens)} tokens to fit "
                      f"the context ({self.max_context} tokens)", TruncationWarning, stacklevel=5)
        return {**message, "content": self.tokenizer.decode(tokens[-keep:], skip_special=False)}


def stream_reply(model, messages, tools=None, **kwargs) -> Iterator[Delta]:
    """Model.chat_stream: the reply's deltas, then Delta("done") with the parsed message.
    stop: strings that end the reply where the model writes one (it is not kept; the
    finish_reason is "stop"); text that may be the start of one is held back until it is not."""
    truncate = kwargs.pop("truncate", False)
    stop = stop_strings(kwargs.pop("stop", None))
    new = kwargs.get("max_new_tokens", model.default_max_new_tokens)
    room = min(new, 64) if isinstance(new, int) and not isinstance(new, bool) and new > 0 else 1
    text, ids = model.prompter.prompt(messages, tools, truncate, room)
    thinking = text.rstrip().endswith(THINK_OPEN)
    res = Generation([])
    dec = model.tokenizer.stream(skip_special=False)
    split = _Splitter(thinking, hold=max(map(len, stop), default=1) - 1)
    tokens = model.stream(ids, result=res, **kwargs)
    try:                       # closing this generator early closes (cancels) the token stream
        for token in tokens:
            piece = dec.push(token)
            cut = find_stop(split.text, piece, stop)
            if cut is not None:
                yield from split.end(split.text + piece, cut)
                res.finish_reason = "stop"
                break
            yield from split.feed(piece)
        else:
            piece = dec.flush()
            yield from split.end(split.text + piece, find_stop(split.text, piece, stop))
    finally:
        tokens.close()
    reply = parse_reply(split.text, tools, thinking=thinking, truncated=res.finish_reason == "length")
    yield from split.finish(reply)
    yield Delta("done", message={**reply.as_message(), "finish_reason": res.finish_reason},
                usage={"prompt_tokens": len(ids), "completion_tokens": len(res.tokens)
                       + (res.stop_token is not None)})


class _Splitter:
    """Turns the growing reply text into reasoning and content deltas as they become certain.

    Reasoning runs until </think> (held back while a tag may be forming). Content that does
    not start with whitespace may be a marker-less tool call, so it is held until the end;
    leading and trailing whitespace is held so the deltas join to the parsed content."""

    def __init__(self, thinking: bool, hold: int = 0):
        self.text = ""
        self.thinking = thinking
        self.hold = hold           # trailing characters that may begin a stop string
        self.sent = {"reasoning": 0, "content": 0}

    def _views(self, body: str):
        content = ""
        reasoning = None
        if self.thinking:
            if body.lstrip().startswith(THINK_OPEN):
                body = body.lstrip()[len(THINK_OPEN):]
            if THINK_CLOSE in body:
                reasoning, content = body.split(THINK_CLOSE, 1)
            else:
                reasoning = _hold_partial_tag(body, THINK_CLOSE)
        else:
            content = body
        return reasoning, content

    def feed(self, piece: str):
        if piece:
            self.text += piece
            yield from self._show(self.text[:len(self.text) - self.hold])

    def end(self, text: str, cut: int | None):
        """The whole reply is known: `text`, cut at `cut` (a stop string's start) if given."""
        self.text = text if cut is None else text[:cut]
        yield from self._show(self.text)

    def _show(self, text: str):
        reasoning, content = self._views(text)
        if reasoning is not None:
            yield from self._emit("reasoning", reasoning.strip())
        if content[:1].isspace():
            visible = _hold_partial_tag(content.split(ASSISTANT, 1)[0], ASSISTANT).strip()
            yield from self._emit("content", visible)

    def _emit(self, kind: str, visible: str):
        if len(visible) > self.sent[kind]:
            yield Delta(kind, visible[self.sent[kind]:])
            self.sent[kind] = len(visible)

    def finish(self, reply):
        if reply.reasoning is not None:
            yield from self._emit("reasoning", reply.reasoning)
        yield from self._emit("content", reply.content)


def stop_strings(stop) -> list[str]:
    """The `stop` keyword as a list: None, one string, or a list of non-empty strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InputError("stop must be a non-empty string or a list of them")
    return list(stop)


def find_stop(text: str, piece: str, stop: list[str]) -> int | None:
    """Where in text + piece the first stop string that ends inside `piece` begins, else None
    (`text` alone holds none: it was checked as it grew)."""
    if not stop or not piece:
        return None
    start = max(0, len(text) - max(map(len, stop)) + 1)
    window = text[start:] + piece
    found = [i for i in (window.find(s) for s in stop) if i >= 0]
    return start + min(found) if found else None


def _hold_partial_tag(text: str, tag: str) -> str:
    """text without a trailing prefix of `tag` (it may be the start of the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return text[:-n]
    return text
