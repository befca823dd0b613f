"""The IO contract of an exported GLM decoder: defined once, as data.

The exporter writes it into the graph and the manifest, the engine builder derives optimization
profiles from its symbolic dims, and the runtime binds buffers from it. One graph serves
prefill (seq > 1, past_seq = 0) and decode (seq = 1).

  input_ids                    int64   (batch, seq)
  attention_mask               int64   (batch, total_seq)    1 = attend, 0 = padding
  position_ids                 int64   (batch, seq)          RoPE positions
  logits_to_keep               int64   (1,)                  logits for the last k positions
  past_key_values.{i}.key      kv      (batch, kv_heads, past_seq, head_dim)   K after RoPE
  past_key_values.{i}.value    kv      (batch, kv_heads, past_seq, head_dim)
  logits                       float32 (batch, kept, vocab)
  present.{i}.key|value        kv      (batch, kv_heads, total_seq, head_dim)
total_seq = past_seq + seq.
"""
from __future__ import annotations

import dataclasses

from .config import GlmConfig


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                      # numpy dtype name: int64, float32, float16, bfloat16
    dims: tuple                     # ints or symbolic names

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"


def present_value(i: int) -> str:
    return f"present.{i}.value"


def io_contract(cfg: GlmConfig, kv_dtype: str) -> dict[str, list[TensorSpec]]:
    nkv, hd = cfg.num_key_value_heads, cfg.head_dim
    inputs = [TensorSpec("input_ids", "int64", ("batch", "seq")),
              TensorSpec("attention_mask", "int64", ("batch", "total_seq")),
              TensorSpec("position_ids", "int64", ("batch", "seq")),
              TensorSpec("logits_to_keep", "int64", (1,))]
    outputs = [TensorSpec("logits", "float32", ("batch", "kept", cfg.vocab_size))]
    for i in range(cfg.num_hidden_layers):
        inputs += [TensorSpec(past_key(i), kv_dtype, ("batch", nkv, "past_seq", hd)),
                   TensorSpec(past_value(i), kv_dtype, ("batch", nkv, "past_seq", hd))]
        outputs += [TensorSpec(present_key(i), kv_dtype, ("batch", nkv, "total_seq", hd)),
                    TensorSpec(present_value(i), kv_dtype, ("batch", nkv, "total_seq", hd))]
    return {"inputs": inputs, "outputs": outputs}


def contract_to_dict(c: dict[str, list[TensorSpec]]) -> dict:
    return {k: [t.to_dict() for t in v] for k, v in c.items()}


def contract_from_dict(d: dict) -> dict[str, list[TensorSpec]]:
    return {k: [TensorSpec(t["name"], t["dtype"], tuple(t["dims"])) for t in d[k]]
            for k in ("inputs", "outputs")}
