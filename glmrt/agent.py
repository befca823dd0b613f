"""GLM-4-0414's agent features on top of Model.chat: a tool loop that runs Python callables
until the model answers in text, and search-grounded answers with resolved citations.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re

from .errors import InputError

# Our own wording of the guidance GLM-4-0414's model card gives for search-based writing
# (answer from the results, use them critically, cite them as 【n†source】). The model was
# tuned on a Chinese prompt, so this one is in Chinese too; pass system= to use another.
SEARCH_SYSTEM_PROMPT = (
    "请依据下面提供的搜索结果回答用户的问题。\n"
    "## 要求\n"
    "1. 综合整理搜索结果中的信息，给出有深度、符合用户需求的回答，不要照搬原文。\n"
    "2. 搜索结果并不都与问题相关，请甄别后再使用。\n"
    "3. 引用某条结果时，在相应句子后用【编号†source】标注，例如【0†source】。\n"
    "4. 回答应结构清晰、便于阅读；回答语言与用户提问的语言一致。")

CITATION = re.compile(r"【(\d+)†[^】]*】")
JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string",
              list: "array", dict: "object"}


def tool_spec(fn) -> dict:
    """An OpenAI tool spec from a Python callable: its name, docstring and parameters."""
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        props[p.name] = {"type": JSON_TYPES[p.annotation]} if p.annotation in JSON_TYPES else {}
        if p.default is p.empty:
            required.append(p.name)
    return {"type": "function", "function": {
        "name": fn.__name__, "description": inspect.getdoc(fn) or "",
        "parameters": {"type": "object", "properties": props, "required": required}}}


@dataclasses.dataclass
class ToolRun:
    message: dict          # the last assistant message (text, or calls when rounds ran out)
    messages: list         # the whole conversation, calls and results included
    rounds: int            # how many rounds of calls were run


def run_tools(chat, messages: list, functions: dict, tools: list | None, max_rounds: int,
              **kwargs) -> ToolRun:
    """Loop: chat -> run each call -> add results as tool messages, until a text answer or
    `max_rounds` rounds of calls. A call that cannot run (unknown function, bad arguments,
    cut off, or the function raised) gets an error result the model sees, never an exception."""
    if not isinstance(functions, dict) or not all(callable(f) for f in functions.values()):
        raise InputError("functions must map tool names to callables")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 0:
        raise InputError(f"max_rounds={max_rounds!r} must be a non-negative integer")
    specs = tools if tools is not None else [
        {**tool_spec(f), "function": {**tool_spec(f)["function"], "name": n}} for n, f in functions.items()]
    history = list(messages)
    for rounds in range(max_rounds + 1):
        reply = chat(history, tools=specs, **kwargs)
        history.append(reply)
        if not reply.get("tool_calls") or rounds == max_rounds:
            return ToolRun(reply, history, rounds)
        for call in reply["tool_calls"]:
            history.append({"role": "tool", "tool_call_id": call["id"],
                            "content": _call(functions, call)})
    raise AssertionError("unreachable")


def _call(functions: dict, call: dict) -> str:
    name = call["function"]["name"]
    if call.get("error"):
        return json.dumps({"error": call["error"]}, ensure_ascii=False)
    if name not in functions:
        return json.dumps({"error": f"unknown function {name!r}"}, ensure_ascii=False)
    try:
        result = functions[name](**json.loads(call["function"]["arguments"]))
    except Exception as e:  # the tool's own failure goes back to the model as its result
        return json.dumps({"error": f"{type(e).__name__}: {e}"}, ensure_ascii=False)
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


def document_messages(documents) -> list[dict]:
    """Documents -> observation messages `【id†title†url】\\ncontent` (docs/GLM4.md, "Chat format")."""
    out = []
    for i, d in enumerate(documents):
        if not isinstance(d, dict) or not {"title", "url", "content"} <= d.keys():
            raise InputError(f"documents[{i}] needs title, url and content (and optionally id)")
        out.append({"role": "observation",
                    "content": f"【{d.get('id', i)}†{d['title']}†{d['url']}】\n{d['content']}"})
    return out


def resolve_citations(text: str, documents) -> list[dict]:
    """Every 【n†...】 in the answer, with the document it names (None when n is unknown)."""
    by_id = {str(d.get("id", i)): d for i, d in enumerate(documents)}
    cites = []
    for m in CITATION.finditer(text):
        d = by_id.get(m.group(1))
        cites.append({"marker": m.group(0), "start": m.start(), "end": m.end(),
                      "id": m.group(1), "document": None if d is None else
                      {"id": d.get("id", m.group(1)), "title": d["title"], "url": d["url"]}})
    return cites
