"""Render a checkpoint's chat template exactly as transformers' apply_chat_template does:
jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, a `tojson` filter
that keeps non-ASCII text (ensure_ascii=False), raise_exception / strftime_now globals, and the
tokenizer's special-token strings as variables. A template that reaches for Python internals
fails in the sandbox with a TemplateError-derived InputError instead of running.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from .errors import ArtifactError, InputError

BUILTIN = Path(__file__).resolve().parent / "templates"
ROLES = ("system", "user", "assistant", "observation")


def read_template(folder: Path, source: str | None) -> str | None:
    """The template text from chat_template.jinja or tokenizer_config.json's chat_template."""
    if source is None:
        return None
    path = folder / source
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text)["chat_template"] if source.endswith(".json") else text
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: cannot read the chat template ({e})") from None


def builtin_template(name: str) -> str:
    """'glm4' (GLM-4-0414) or 'glm-z1' (GLM-Z1-0414): reconstructions used only as a fallback."""
    return (BUILTIN / f"{name}.jinja").read_text(encoding="utf-8")


@lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ArtifactError(f"chat template: syntax error line {e.lineno}: {e.message}") from None


def message_list(messages) -> list[dict]:
    """The messages as a list of dicts, or an error naming what is not."""
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}] must be a dict, got {type(m).__name__}")
    return list(messages)


def check_messages(messages) -> list[dict]:
    """OpenAI-style messages -> plain dicts; a clear error naming the bad message otherwise."""
    out = []
    for i, m in enumerate(message_list(messages)):
        if m.get("role") not in ROLES:
            raise InputError(f"messages[{i}].role is {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"messages[{i}].content is not valid UTF-8 text "
                             f"(an unpaired surrogate at position {e.start})") from None
        out.append({**m, "content": content})
    return out


def render(source: str, messages, *, tools=None, add_generation_prompt: bool = True,
           special_tokens: dict | None = None) -> str:
    import jinja2
    msgs = check_messages(messages)
    if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, dict) for t in tools)):
        raise InputError("tools must be a list of dicts in OpenAI form "
                         "({'type': 'function', 'function': {...}})")
    try:
        # plain JSON round trip: the template sees only dicts, lists, strings and numbers
        msgs, tools = json.loads(json.dumps(msgs)), json.loads(json.dumps(tools))
    except (TypeError, ValueError) as e:
        raise InputError(f"messages and tools must be JSON-serializable ({e})") from None
    try:
        return _compile(source).render(messages=msgs, tools=tools, documents=None,
                                       add_generation_prompt=add_generation_prompt,
                                       **(special_tokens or {}))
    except jinja2.exceptions.SecurityError as e:
        raise InputError(f"chat template refused by the sandbox: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"chat template failed: {e}") from None
