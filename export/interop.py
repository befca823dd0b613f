"""Graphs and configs for runtimes other than glmrt (export --for): onnxruntime-genai and
optimum's ORTModelForCausalLM. Neither knows GLM-4-0414, but both run a decoder graph they did
not build once it speaks their inputs and outputs (glmrt/contract.py, Consumers).

Each consumer gets its own graph file beside model.onnx: the very nodes of glmrt's graph, whose
weights stay in the one model.onnx.data both point into (nothing is written twice), behind a
small adapter that makes the inputs glmrt's contract has and the consumer does not feed
(contract.DERIVED), and with only the outputs the consumer reads (nodes feeding nothing else,
such as the gqa form's next_token ArgMax, are dropped).

  consumer inputs     adapter (one small subgraph per derived input)                     glmrt's nodes
  input_ids ──────┬──> Shape[1] ─> Range(0, seq)  (all)  |  constant [-1]  (last) ─> logits_index ─┐
                  └───────────────────────────────────────────────────────────────────────────────┤
  attention_mask ─┬──> ReduceSum(axis 1) - 1 ─> Cast int32 ─────────────────────────> seqlens_k ───┤ gqa
                  ├──> Shape ─> Gather[1] ─> Cast int32 ─────────────> total_sequence_length ──────┤ gqa
                  └───────────────────────────────────────────────────────────────────────────────┤ concat
  position_ids (concat), past_key_values.* ───────────────────────────────────────────────────────┴─> logits,
                                                                                                      present.*

onnxruntime-genai also reads genai_config.json (written here) and the tokenizer files the
export already copies; optimum reads the checkpoint's config.json (also copied). What each one
requires is in docs/FORMATS.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import helper

from glmrt.config import GlmConfig
from glmrt.contract import Consumer, io_contract, past_key, past_value, present_key, present_value

from .onnx_builder import ONNX_DTYPE, unique_name

GENAI_CONFIG = "genai_config.json"
# onnxruntime-genai's model.type for "a plain decoder": no model-specific inputs, state or
# prompt handling (it is in genai's list of language models and special-cased nowhere).
GENAI_MODEL_TYPE = "decoder"


def consumer_graph(model: onnx.ModelProto, cfg: GlmConfig, kv_dtype: str, form: str,
                   c: Consumer) -> tuple[onnx.ModelProto, dict]:
    """(the consumer's graph over `model`'s nodes and initializers, its IO contract)."""
    contract = io_contract(cfg, kv_dtype, form, c.name)
    g = model.graph
    adapter = _Adapter({n.name for n in g.node} | {t.name for t in g.initializer})
    for name, recipe in contract["derived"].items():
        getattr(adapter, recipe)(name)
    wanted = {t.name for t in contract["outputs"]}
    body = _needed(list(adapter.nodes) + list(g.node), wanted)

    def vi(spec):
        return helper.make_tensor_value_info(spec.name, ONNX_DTYPE[spec.dtype], list(spec.dims))
    graph = helper.make_graph(body, f"{g.name}_for_{c.name.replace('-', '_')}",
                              [vi(t) for t in contract["inputs"]], [vi(t) for t in contract["outputs"]],
                              list(g.initializer) + adapter.initializers)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="glmrt",
                            doc_string=f"{model.doc_string}; for {c.name}")
    out.ir_version = model.ir_version
    return out, contract


def _needed(nodes: list, outputs: set) -> list:
    """The nodes some wanted output depends on, in their order (nodes come topologically)."""
    want, keep = set(outputs), []
    for n in reversed(nodes):
        if any(o in want for o in n.output):
            keep.append(n)
            want.update(i for i in n.input if i)
    return keep[::-1]


class _Adapter:
    """Nodes (named /model/adapter/<input>/<Op>) that make one glmrt input each, by recipe."""

    def __init__(self, taken: set):
        self.nodes, self.initializers, self.taken = [], [], taken

    def _name(self, base: str) -> str:
        return unique_name(base, self.taken)

    def _op(self, target: str, op: str, inputs: list, out: str | None = None, **attrs) -> str:
        name = self._name(f"/model/adapter/{target}/{op}")
        out = out or f"{name}/output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def _const(self, target: str, value: int, shape: tuple = ()) -> str:
        name = self._name(f"/model/adapter/{target}/constants/int64/{'x'.join(map(str, shape)) or 'scalar'}")
        self.initializers.append(helper.make_tensor(name, onnx.TensorProto.INT64, shape,
                                                    [value] * (1 if not shape else shape[0])))
        return name

    def _seq(self, target: str) -> str:
        return self._op(target, "Shape", ["input_ids"], start=1, end=2)                 # (1,) seq

    # ---- the recipes (glmrt/contract.py DERIVED) --------------------------------------------
    def every_position(self, target: str) -> None:
        """logits_index = 0 .. seq-1: every position scored, logits (batch, seq, vocab)."""
        seq = self._op(target, "Squeeze", [self._seq(target)])                          # () seq
        self._op(target, "Range", [self._const(target, 0), seq, self._const(target, 1)], out=target)

    def last_position(self, target: str) -> None:
        """logits_index = [-1], a constant (Gather counts a negative index from the end): only
        the last position, logits (batch, 1, vocab). A constant lives on the device with the
        weights; an index computed from Shape would live on the host and need a copy to the
        device, and ONNX Runtime refuses to capture a CUDA graph with a copy in it."""
        self.initializers.append(helper.make_tensor(target, onnx.TensorProto.INT64, (1,), [-1]))

    def mask_sum_minus_1(self, target: str) -> None:
        """seqlens_k (batch,) int32 = attended positions - 1: what the cache holds after this
        step, less one (GroupQueryAttention's convention; padding never counts)."""
        total = self._op(target, "ReduceSum", ["attention_mask", self._const(target, 1, (1,))],
                         keepdims=0)                                                    # (batch,)
        less = self._op(target, "Sub", [total, self._const(target, 1)])
        self._op(target, "Cast", [less], out=target, to=ONNX_DTYPE["int32"])

    def mask_length(self, target: str) -> None:
        """total_sequence_length () int32 = attention_mask's length: the tokens this step sees,
        or the cache's whole length where the consumer feeds a mask that long (onnxruntime-genai
        under CUDA graphs), as glmrt's own CUDA graphs do."""
        shape = self._op(target, "Shape", ["attention_mask"])                            # (2,)
        length = self._op(target, "Gather", [shape, self._const(target, 1)], axis=0)      # ()
        # on the host, where Shape puts it and GroupQueryAttention reads it: nothing is copied
        self._op(target, "Cast", [length], out=target, to=ONNX_DTYPE["int32"])


def genai_config(cfg: GlmConfig, contract: dict, graph: str, generation: dict, *,
                 device: str, gmask_id: int | None) -> dict:
    """onnxruntime-genai's genai_config.json for the consumer graph `graph` (docs/FORMATS.md)."""
    # every name from the contract; genai takes per-layer names as patterns with %d for the layer
    names = {t.name: t.name for t in contract["inputs"]
             if t.name in ("input_ids", "attention_mask", "position_ids")}
    names.update(past_key_names=past_key("%d"), past_value_names=past_value("%d"))
    logits = contract["outputs"][0].name
    sampling = generation.get("sampling", {})
    eos = list(generation["eos_token_id"])
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai",
                            "provider_options": [{"cuda": {}}] if device == "cuda" else []},
        "filename": graph,
        "head_size": cfg.head_dim, "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads, "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "inputs": names,
        "outputs": {"logits": logits, "present_key_names": present_key("%d"),
                    "present_value_names": present_value("%d")},
    }
    model = {"type": GENAI_MODEL_TYPE, "vocab_size": cfg.vocab_size,
             "context_length": cfg.max_position_embeddings, "eos_token_id": eos,
             "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else eos[0],
             "decoder": decoder}
    if gmask_id is not None:    # GLM has no BOS token; its prompts open with [gMASK]<sop>
        model["bos_token_id"] = gmask_id
    search = {
        "max_length": cfg.max_position_embeddings, "min_length": 0, "num_beams": 1,
        "num_return_sequences": 1, "do_sample": bool(sampling.get("do_sample", False)),
        "temperature": float(sampling.get("temperature", 1.0)),
        "top_k": int(sampling.get("top_k", 50)), "top_p": float(sampling.get("top_p", 1.0)),
        "repetition_penalty": 1.0, "early_stopping": True, "length_penalty": 1.0,
        "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
        # the gqa form's past and present are one buffer of max_length positions
        "past_present_share_buffer": contract["form"] == "gqa",
    }
    return {"model": model, "search": search}


def special_token_id(tokenizer_json: Path, text: str) -> int | None:
    """The id of an added (special) token in tokenizer.json, or None."""
    data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    return next((t["id"] for t in data.get("added_tokens", []) if t.get("content") == text), None)
