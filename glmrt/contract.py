"""The IO contract of an exported GLM decoder: defined once, as data.

The exporter writes it into the graph and the manifest, the engine builder derives optimization
profiles from its symbolic dims, and the runtime binds buffers from it. One graph serves
prefill (seq > 1) and decode (seq = 1). Two attention forms:

"concat" (standard ONNX ops; CPU and TensorRT): the cache grows by Concat.
  input_ids                    int64   (batch, seq)
  attention_mask               int64   (batch, total_seq)    1 = attend, 0 = padding
  position_ids                 int64   (batch, seq)          RoPE positions
  logits_index                 int64   (kept,)               positions of this step to score
  past_key_values.{i}.key      kv      (batch, kv_heads, past_seq, head_dim)   K after RoPE
  past_key_values.{i}.value    kv      (batch, kv_heads, past_seq, head_dim)
  logits                       float32 (batch, kept, vocab)
  present.{i}.key|value        kv      (batch, kv_heads, total_seq, head_dim)
  total_seq = past_seq + seq

"gqa" (ONNX Runtime's GroupQueryAttention; CUDA): past and present are one preallocated
buffer of max_seq positions, updated in place when bound to the same device memory.
  input_ids                    int64   (batch, seq)
  seqlens_k                    int32   (batch,)              tokens in the cache after this step - 1
  total_sequence_length        int32   ()                    on the host
  logits_index                 int64   (kept,)
  past_key_values.{i}.key|value kv     (batch, kv_heads, max_seq, head_dim)
  logits                       float32 (batch, kept, vocab)
  next_token                   int64   (batch, kept)         argmax of logits (greedy on the device)
  present.{i}.key|value        kv      (batch, kv_heads, max_seq, head_dim)
"""
from __future__ import annotations

import dataclasses

from .config import GlmConfig

FORMS = ("concat", "gqa")
# the contract's dtype names as numpy dtypes: the one map the runtime binds buffers with
NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32"}


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


def io_contract(cfg: GlmConfig, kv_dtype: str, form: str = "concat") -> dict:
    """{"form": form, "inputs": [TensorSpec], "outputs": [TensorSpec]}."""
    nkv, hd = cfg.num_key_value_heads, cfg.head_dim
    if form == "concat":
        inputs = [TensorSpec("input_ids", "int64", ("batch", "seq")),
                  TensorSpec("attention_mask", "int64", ("batch", "total_seq")),
                  TensorSpec("position_ids", "int64", ("batch", "seq")),
                  TensorSpec("logits_index", "int64", ("kept",))]
        past_len, present_len = "past_seq", "total_seq"
    elif form == "gqa":
        inputs = [TensorSpec("input_ids", "int64", ("batch", "seq")),
                  TensorSpec("seqlens_k", "int32", ("batch",)),
                  TensorSpec("total_sequence_length", "int32", ()),
                  TensorSpec("logits_index", "int64", ("kept",))]
        past_len = present_len = "max_seq"
    else:
        raise ValueError(f"attention form {form!r} is not one of {FORMS}")
    outputs = [TensorSpec("logits", "float32", ("batch", "kept", cfg.vocab_size))]
    if form == "gqa":           # greedy decoding copies one id to the host instead of the logits
        outputs.append(TensorSpec("next_token", "int64", ("batch", "kept")))
    for i in range(cfg.num_hidden_layers):
        inputs += [TensorSpec(past_key(i), kv_dtype, ("batch", nkv, past_len, hd)),
                   TensorSpec(past_value(i), kv_dtype, ("batch", nkv, past_len, hd))]
        outputs += [TensorSpec(present_key(i), kv_dtype, ("batch", nkv, present_len, hd)),
                    TensorSpec(present_value(i), kv_dtype, ("batch", nkv, present_len, hd))]
    return {"form": form, "inputs": inputs, "outputs": outputs}


def numpy_dtype(name: str):
    """The numpy dtype a contract dtype binds as, or None (bfloat16: numpy has none)."""
    import numpy as np
    return np.dtype(NUMPY_DTYPES[name]).type if name in NUMPY_DTYPES else None


def contract_to_dict(c: dict) -> dict:
    return {"form": c["form"], **{k: [t.to_dict() for t in c[k]] for k in ("inputs", "outputs")}}


def contract_from_dict(d: dict) -> dict:
    return {"form": d["form"], **{k: [TensorSpec(t["name"], t["dtype"], tuple(t["dims"])) for t in d[k]]
                                  for k in ("inputs", "outputs")}}
