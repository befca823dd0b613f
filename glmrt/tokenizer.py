"""The checkpoint's byte-level BPE tokenizer (HF tokenizers, no transformers) and a streaming
decoder that only emits text once it decodes cleanly at a UTF-8 boundary."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import ArtifactError


_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


class Tokenizer:
    def __init__(self, folder: Path, tokenizer_file: str = "tokenizer.json"):
        from tokenizers import Tokenizer as HfTokenizer
        path = folder / tokenizer_file
        try:
            self.tok = HfTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on a bad file
            raise ArtifactError(f"{path}: cannot load the tokenizer ({e})") from None
        self.special = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()
                        if t.special}
        self.special_ids = set(self.special.values())
        self.special_sorted = sorted(self.special, key=len, reverse=True)   # longest first
        self._literal = None
        tc = folder / "tokenizer_config.json"
        self.config = {}
        if tc.is_file():
            try:
                self.config = json.loads(tc.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise ArtifactError(f"{tc}: not valid JSON") from None

    def template_tokens(self) -> dict:
        """Special-token strings transformers passes to chat templates (eos_token, ...)."""
        out = {}
        for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
            v = self.config.get(k)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                out[k] = v
        return out

    def encode(self, text: str) -> list[int]:
        """Encode rendered prompt text; special-token strings in it become control tokens."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_literal(self, text: str) -> list[int]:
        """Encode text in which special-token strings are plain characters (user input)."""
        if self._literal is None:
            from tokenizers import Tokenizer as HfTokenizer
            self._literal = HfTokenizer.from_str(self.tok.to_str())
            self._literal.encode_special_tokens = True
        return self._literal.encode(text, add_special_tokens=False).ids

    # -- keeping user-typed special-token text out of the control channel ------------------
    # Before rendering, each special-token string inside message or tool text is swapped for
    # a private-use placeholder; after rendering, the template's own special tokens are
    # encoded as control tokens and the placeholders as the literal characters they stand for.
    def shield(self, value):
        """Replace special-token strings in every string of a JSON-like value."""
        if isinstance(value, str):
            for i, tok in enumerate(self.special_sorted):
                if tok in value:
                    value = value.replace(tok, f"\ue000{i}\ue001")
            return value
        if isinstance(value, list):
            return [self.shield(v) for v in value]
        if isinstance(value, dict):
            return {k: self.shield(v) for k, v in value.items()}
        return value

    def unshield(self, text: str) -> str:
        return _PLACEHOLDER.sub(lambda m: self.special_sorted[int(m.group(1))], text)

    def encode_shielded(self, text: str) -> list[int]:
        ids, pos = [], 0
        for m in _PLACEHOLDER.finditer(text):
            ids += self.encode(text[pos:m.start()])
            ids += self.encode_literal(self.special_sorted[int(m.group(1))])
            pos = m.end()
        return ids + self.encode(text[pos:])

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def id_of(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def stream(self, skip_special: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)


class StreamDecoder:
    """Feed ids one at a time; get back the new text that is complete so far.

    Byte-level BPE splits multi-byte characters across tokens: decoding a prefix can end in
    U+FFFD. Text is held back until it does not, and re-decoded from a short window so the
    cost per token stays constant."""

    def __init__(self, tok: Tokenizer, skip_special: bool):
        self.tok, self.skip = tok, skip_special
        self.ids: list[int] = []
        self.prefix = 0          # window start
        self.read = 0            # ids [prefix, read) are already emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        now = self.tok.decode(self.ids[self.prefix:], self.skip)
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """Whatever is held back at the end (may contain U+FFFD for truly broken bytes)."""
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        now = self.tok.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
