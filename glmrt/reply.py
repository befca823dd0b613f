"""What the model wrote, taken apart: reasoning, content and tool calls (a pure function), and
OpenAI-shaped messages turned back into the history GLM's template expects.

GLM-4-0414's tool-call format has no markers (docs/GLM4.md, "Chat format"): the generation
prompt ends in `<|assistant|>`; a text answer starts with "\\n", a call starts with the
function name on the first line and its JSON arguments after it. Several calls in one turn
are separated by `<|assistant|>`, and the turn stops on `<|observation|>`. GLM-Z1's prompt ends
in `<|assistant|>\\n<think>`, so its output starts inside the reasoning: `reasoning</think>answer`.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re

from .errors import InputError
from .template import message_list

ASSISTANT = "<|assistant|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
NAME = re.compile(r"[A-Za-z_][\w.\-]*")


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str                 # JSON text of an object ("{}" when unparseable; see error)
    id: str
    error: str | None = None       # why the call cannot be run as written, else None
    raw: str = ""                  # the call as the model wrote it

    def as_openai(self) -> dict:
        d = {"id": self.id, "type": "function",
             "function": {"name": self.name, "arguments": self.arguments}}
        if self.error:
            d["error"] = self.error
        return d


@dataclasses.dataclass
class Reply:
    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)

    def as_message(self) -> dict:
        """The assistant message in OpenAI form (reasoning under 'reasoning_content')."""
        m = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            m["reasoning_content"] = self.reasoning
        if self.tool_calls:
            m["tool_calls"] = [c.as_openai() for c in self.tool_calls]
        return m


def parse_reply(text: str, tools=None, *, thinking: bool = False, truncated: bool = False) -> Reply:
    """Split generated text (decoded with special tokens kept, stop token excluded).

    thinking: the prompt ended inside `<think>` (GLM-Z1), so the text starts with reasoning.
    Without it, text before a lone `</think>` (one with no `<think>` before it) is reasoning
    too, as the servers users know treat it (vLLM's DeepSeek-R1-style parser): GLM-Z1 answers
    begin inside the reasoning, and the prompt that made them may not be at hand.
    truncated: generation hit the length limit; a call in progress is reported as cut off.
    tools: OpenAI tool specs; a call to a name not among them carries an error."""
    reasoning = None
    rest = text
    lone_close = THINK_CLOSE in rest and THINK_OPEN not in rest.split(THINK_CLOSE, 1)[0]
    if thinking or lone_close or rest.lstrip().startswith(THINK_OPEN):
        body = rest.lstrip()[len(THINK_OPEN):] if rest.lstrip().startswith(THINK_OPEN) else rest
        if THINK_CLOSE in body:
            reasoning, rest = body.split(THINK_CLOSE, 1)
        else:                                  # cut off (or never closed) while thinking
            reasoning, rest = body, ""
        reasoning = reasoning.strip()
    known = _tool_names(tools)
    content, calls = [], []
    segments = rest.split(ASSISTANT)
    for i, seg in enumerate(segments):
        call = _as_call(seg, known, truncated and i == len(segments) - 1, len(calls))
        if call is None:
            content.append(seg)
        else:
            calls.append(call)
    return Reply("".join(content).strip(), reasoning, calls)


def _tool_names(tools) -> set[str] | None:
    if tools is None:
        return None
    names = set()
    for t in tools:
        f = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(f, dict) and isinstance(f.get("name"), str):
            names.add(f["name"])
    return names


def _as_call(seg: str, known: set[str] | None, cut: bool, index: int) -> ToolCall | None:
    """A segment is a call when it starts (no leading whitespace) with a name alone on its
    first line and then either a known function's name, arguments that parse, or an attempt
    at an object ("{..."). Anything else is text."""
    if not seg or seg[0].isspace():
        return None
    first, newline, args = seg.partition("\n")
    name, args = first.strip(), args.strip()
    if not NAME.fullmatch(name):
        return None
    is_known = known is not None and name in known
    parsed, error = _parse_arguments(args)
    if cut and not newline:            # stopped while writing the name itself
        if not (known and any(k.startswith(name) for k in known)):
            return None
    elif not (is_known or (args and parsed is not None) or args.startswith("{")):
        return None
    if cut:
        parsed, error = None, "the call was cut off by the length limit"
    elif error is None and known is not None and not is_known:
        error = f"unknown function {name!r}; known: {', '.join(sorted(known)) or 'none'}"
    call_id = "call_" + hashlib.sha1(f"{index}:{seg}".encode()).hexdigest()[:12]
    arguments = json.dumps(parsed, ensure_ascii=False) if parsed is not None else "{}"
    return ToolCall(name, arguments, call_id, error, seg)


def _parse_arguments(text: str):
    """JSON object, or a Python-literal dict (the model sometimes writes those)."""
    if not text:
        return {}, None
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None, f"arguments are not valid JSON or a Python literal: {text[:200]!r}"
    if not isinstance(value, dict):
        return None, f"arguments must be an object, got {type(value).__name__}: {text[:200]!r}"
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None, f"arguments hold values JSON cannot carry: {text[:200]!r}"
    return value, None


def to_glm_messages(messages) -> list[dict]:
    """OpenAI-shaped history -> what GLM's template expects.

    assistant + tool_calls -> one {"role": "assistant", "metadata": name, "content": args}
    per call (after any text), role "tool" -> {"role": "observation"}, reasoning_content
    dropped (the template keeps only answers in history)."""
    out = []
    for i, m in enumerate(message_list(messages)):
        role = m.get("role")
        if role == "tool":
            out.append({"role": "observation", "content": _text(m.get("content"), i)})
        elif role == "assistant" and m.get("tool_calls"):
            if (m.get("content") or "").strip():
                out.append({"role": "assistant", "content": m["content"]})
            for j, c in enumerate(m["tool_calls"]):
                try:
                    f = c["function"]
                    name, args = f["name"], f.get("arguments", "{}")
                except (TypeError, KeyError):
                    raise InputError(f"messages[{i}].tool_calls[{j}] needs function.name") from None
                if not isinstance(args, str):
                    args = json.dumps(args, ensure_ascii=False)
                out.append({"role": "assistant", "metadata": name, "content": args})
        else:
            out.append({k: v for k, v in m.items() if k != "reasoning_content"})
    return out


def _text(content, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    try:
        return json.dumps(content, ensure_ascii=False)
    except (TypeError, ValueError):
        raise InputError(f"messages[{i}].content is neither text nor JSON-serializable") from None
