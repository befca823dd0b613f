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

Consumers (export --for): other runtimes that run a model folder. onnxruntime-genai and
optimum's ORTModelForCausalLM feed the Hugging Face decoder convention instead: input_ids,
attention_mask, position_ids where the graph has it, past_key_values.{i}.key|value, and read
logits and present.{i}.key|value. Each gets its own graph file in the folder: glmrt's graph (the
same nodes, the same external weights file) behind an adapter that derives the inputs glmrt's
contract has and theirs lacks (DERIVED):
  concat  input_ids, attention_mask (batch, total_seq), position_ids, past (past_seq) -> present (total_seq)
  gqa     input_ids, attention_mask (batch, total_seq), past (max_seq) -> present (max_seq), the
          same buffer: onnxruntime-genai's past_present_share_buffer
  logits  float32 (batch, seq, vocab) every position ("all", what transformers' forward returns)
          or (batch, 1, vocab) the last one ("last": onnxruntime-genai samples only the last row,
          and a static 1 tells it so; prefill then never makes seq x vocab logits)
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


@dataclasses.dataclass(frozen=True)
class Consumer:
    name: str                       # export --for
    forms: tuple                    # the attention forms it runs
    graph: str                      # its graph's file name in the model folder
    config: str                     # the config file it reads (written by export, or the checkpoint's)
    scores: str                     # "all" positions or the "last" one (see the module docstring)
    what: str                       # one line for --help


GLMRT = "glmrt"                     # glmrt's own runtime: model.onnx, the contract above
CONSUMERS = {c.name: c for c in (
    Consumer("onnxruntime-genai", ("concat", "gqa"), "model.genai.onnx", "genai_config.json", "last",
             "onnxruntime-genai (C, C#, Java, Python; CPU and CUDA): genai_config.json beside its graph"),
    Consumer("optimum", ("concat",), "model.optimum.onnx", "config.json", "all",
             "optimum's ORTModelForCausalLM (transformers' generate and pipelines; the CPU form)"),
)}

# How the adapter makes each glmrt input a consumer does not feed, by name (export/interop.py
# emits one small subgraph per recipe):
#   every_position   logits_index = 0 .. seq-1
#   last_position    logits_index = [-1] (a constant: Gather counts from the end)
#   mask_sum_minus_1 seqlens_k = row sums of attention_mask - 1, int32 (tokens in the cache - 1)
#   mask_length      total_sequence_length = attention_mask's length, an int32 scalar
DERIVED = {
    ("concat", "all"): {"logits_index": "every_position"},
    ("concat", "last"): {"logits_index": "last_position"},
    ("gqa", "all"): {"logits_index": "every_position", "seqlens_k": "mask_sum_minus_1",
                     "total_sequence_length": "mask_length"},
    ("gqa", "last"): {"logits_index": "last_position", "seqlens_k": "mask_sum_minus_1",
                      "total_sequence_length": "mask_length"},
}


def consumer(name: str) -> Consumer:
    if name not in CONSUMERS:
        raise ValueError(f"consumer {name!r} is not one of {', '.join(CONSUMERS)}")
    return CONSUMERS[name]


def io_contract(cfg: GlmConfig, kv_dtype: str, form: str = "concat", consumer_name: str = GLMRT) -> dict:
    """{"form": form, "inputs": [TensorSpec], "outputs": [TensorSpec]}: glmrt's own contract, or
    with consumer_name another runtime's ("consumer" and "derived" are then added)."""
    if consumer_name != GLMRT:
        return _consumer_contract(cfg, kv_dtype, form, consumer(consumer_name))
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


def _consumer_contract(cfg: GlmConfig, kv_dtype: str, form: str, c: Consumer) -> dict:
    """The Hugging Face decoder convention (module docstring) over glmrt's graph of `form`."""
    if form not in c.forms:
        raise ValueError(f"{c.name} runs the {' or '.join(c.forms)} form, not {form}")
    own = io_contract(cfg, kv_dtype, form)
    derived = DERIVED[(form, c.scores)]
    mask = TensorSpec("attention_mask", "int64", ("batch", "total_seq"))
    inputs = [t for t in own["inputs"] if t.name not in derived and t.name != "attention_mask"]
    inputs.insert(1, mask)                                   # after input_ids, as they list them
    kept = "seq" if c.scores == "all" else 1
    outputs = [TensorSpec("logits", "float32", ("batch", kept, cfg.vocab_size))] + \
        [t for t in own["outputs"] if t.name.startswith("present.")]
    return {"form": form, "consumer": c.name, "derived": dict(derived), "inputs": inputs,
            "outputs": outputs}


def numpy_dtype(name: str):
    """The numpy dtype a contract dtype binds as, or None (bfloat16: numpy has none)."""
    import numpy as np
    return np.dtype(NUMPY_DTYPES[name]).type if name in NUMPY_DTYPES else None


def contract_to_dict(c: dict) -> dict:
    extra = {k: c[k] for k in ("consumer", "derived") if k in c}
    return {"form": c["form"], **extra, **{k: [t.to_dict() for t in c[k]] for k in ("inputs", "outputs")}}


def contract_from_dict(d: dict) -> dict:
    extra = {k: d[k] for k in ("consumer", "derived") if k in d}
    return {"form": d["form"], **extra,
            **{k: [TensorSpec(t["name"], t["dtype"], tuple(t["dims"])) for t in d[k]]
               for k in ("inputs", "outputs")}}
