"""Emit the GLM-4-0414 decoder as one ONNX graph (prefill and decode), layer by layer.

`Emitter` is the skeleton every form shares: weights, linears (float or quantized by the
precision's scheme), the MLP, and the order of the whole graph. A form overrides its attention
and its norms: `ConcatEmitter` (below, the CPU and TensorRT forms: standard ops, cache grown by
Concat) and `GqaEmitter` (export/gqa.py, the CUDA form).

Weights stream from the checkpoint into the external data file as each layer is emitted;
only one tensor (or one block of it) is in memory at a time. Numerics of the concat form: the
residual stream, norms, RoPE, attention scores and softmax are float32 whatever the precision;
matmuls run in the precision's compute dtype.

Per layer (GLM-4-0414's "sandwich norms": transformers' Glm4DecoderLayer normalizes each
sublayer's output again before adding it to the residual stream):

   x (f32) ──┬─> input_layernorm ─> qkv_proj ─> split ─> RoPE(q,k) ─> attention ─> o_proj
             │                                             │ concat past K/V -> present
             │                                             ▼
             └──────────────(+)<── post_self_attn_layernorm ◄┘
                             │
             ┌───────────────┴─> post_attention_layernorm ─> gate_up ─> silu(g)*u ─> down
             │                                                                      │
             └──────────────(+)<── post_mlp_layernorm ◄─────────────────────────────┘
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from glmrt.contract import io_contract, past_key, past_value, present_key, present_value
from glmrt.precision import TARGETS

from .checkpoint import Checkpoint, convert
from .quant import WeightSource
from .stream import ordered_map
from .onnx_builder import ONNX_DTYPE, GraphBuilder
from .precision import Precision

MASK_MIN = float(np.finfo(np.float32).min)


class Emitter:
    """The skeleton: see the module docstring. Subclasses define the form's hooks."""

    def __init__(self, g: GraphBuilder, ckpt: Checkpoint, prec: Precision,
                 act_amax: dict | None = None, awq_stats: dict | None = None, block_rows: int = 256):
        self.g, self.ckpt, self.cfg, self.prec = g, ckpt, ckpt.cfg, prec
        self.act_amax = act_amax or {}        # calibrated |input| max per linear (FP8)
        self.awq_stats = awq_stats            # calibration activations (AWQ) or None
        self.awq: dict = {}                   # the current layer's AWQ scales
        self.awq_report: dict = {}
        self.qerrors: dict[str, list] = {}    # per quantized weight: chunk error reports
        self.block_rows = block_rows
        self.float_layout = "kn"              # float weights as W^T (in, out) for MatMul

    # ---- weights -------------------------------------------------------------------------
    def small(self, key: str, dtype: str) -> str:
        """A vector (norm weight, bias) in `dtype`, named after its checkpoint key; a norm
        feeding AWQ-scaled weights is divided by their scales."""
        v = convert(self.ckpt.take_raw(key), self.ckpt.dtype(key), "float32")
        if key in self.awq:
            v = v / self.awq[key]
        return self.g.weight(key, convert(v, "F32", dtype), dtype)

    def prepare_layer(self, i: int) -> None:
        """Before layer i is emitted: its AWQ scales, when asked for."""
        if self.awq_stats is None or self.prec.scheme is None:
            return
        from .awq import layer_scales
        self.awq, report = layer_scales(self.prec.scheme, self.ckpt, i, self.awq_stats)
        self.awq_report.update(report)

    def matrix_t(self, name: str, keys: list[str], reuse: bool = False) -> str:
        """W^T (in, sum of outs) of checkpoint matrices [out_j, in] stacked along out,
        written in blocks of input rows so no full copy is ever made."""
        parts = [self.ckpt.take_raw(k, reuse) for k in keys]       # each (out_j, in)
        src = [self.ckpt.dtype(k) for k in keys]
        k_in = parts[0].shape[1]
        n_out = sum(p.shape[0] for p in parts)
        dst = self.prec.weights

        def block(r):
            cols = [convert(p[:, r:r + self.block_rows], s, "float32").T for p, s in zip(parts, src)]
            # C order here, on the worker: the transpose copy is the costly part of a block
            return np.ascontiguousarray(convert(np.concatenate(cols, axis=1), "F32", dst))  # (rows, n_out)
        return self.g.weight_blocks(name, (k_in, n_out), dst,
                                    ordered_map(block, range(0, k_in, self.block_rows)))

    def matrix_nk(self, name: str, keys: list[str], reuse: bool = False) -> str:
        """Checkpoint matrices [out_j, in] stacked along out, as stored (no transpose): the
        layout a GEMV reads along contiguous rows. Written in blocks of output rows."""
        parts = [(self.ckpt.take_raw(k, reuse), self.ckpt.dtype(k)) for k in keys]
        k_in, n_out = parts[0][0].shape[1], sum(p.shape[0] for p, _ in parts)
        dst = self.prec.weights
        spans = [(p, s, r) for p, s in parts for r in range(0, p.shape[0], self.block_rows)]
        return self.g.weight_blocks(name, (n_out, k_in), dst, ordered_map(
            lambda t: convert(t[0][t[2]:t[2] + self.block_rows], t[1], dst), spans))

    def linear(self, x: str, name: str, keys: list[str], bias_keys: list[str] | None = None,
               reuse: bool = False) -> str:
        """x (b, s, in) in compute dtype -> (b, s, out) in compute dtype. Checkpoint matrices
        [out_j, in] are stacked along out (fused q/k/v); float weights are stored as W^T."""
        g, p = self.g, self.prec
        with g.under(name):
            wname = "/".join(g.scope[1:])                       # e.g. layers.3/attn/qkv_proj
            scheme = p.lm_head if name == "lm_head" else p.scheme
            if scheme is None and self.float_layout == "nk":
                w = g.cast(self.matrix_nk(f"{wname}.weight", keys, reuse), p.weights, p.compute)   # (out, in)
                y = g.op("FusedMatMul", [x, w], domain="com.microsoft", transB=1)
            elif scheme is None:
                w = g.cast(self.matrix_t(f"{wname}.weight", keys, reuse), p.weights, p.compute)
                y = g.op("MatMul", [x, w])
            else:
                tag = name if name in ("qkv_proj", "gate_up_proj", "down_proj") else None
                cols = self.awq.get(f"{tag[:-5]}_cols") if tag else None     # qkv_cols, ...
                rows = self.awq.get("gate_up_rows") if tag == "gate_up_proj" else None
                src = WeightSource([(self.ckpt.take_raw(k, reuse), self.ckpt.dtype(k)) for k in keys],
                                   col_scale=cols, row_scale=rows)
                y = scheme.emit(g, x, wname, src, self.qerrors, self.act_amax.get(wname))
            if bias_keys:
                vecs = [convert(self.ckpt.take_raw(k), self.ckpt.dtype(k), p.compute) for k in bias_keys]
                b = g.weight(f"{wname}.bias", np.concatenate(vecs), p.compute)
                y = g.op("Add", [y, b], name="BiasAdd")
        return y

    def mlp(self, i: int, h: str) -> str:
        g, m = self.g, f"model.layers.{i}.mlp."
        with g.under("mlp"):
            gate, up = g.op("Split", [self.linear(h, "gate_up_proj", [m + "gate_up_proj.weight"])],
                            n_out=2, axis=2, num_outputs=2)                      # (b, s, I) each
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])], name="SiLU"), up])
            return self.linear(act, "down_proj", [m + "down_proj.weight"])

    # ---- the form's hooks ----------------------------------------------------------------
    form = None                     # the IO contract's attention form
    residual_dtype = "float32"      # dtype of the residual stream

    def prepare(self):
        """Graph-wide inputs of attention (rotary tables, masks), made before the embedding."""
        raise NotImplementedError

    def attention(self, i: int, h: str, ctx) -> str:
        """Layer i's attention on the normed h: (b, s, H) in compute dtype, o_proj applied."""
        raise NotImplementedError

    def input_norm(self, x: str, pending: str | None, key: str, name: str) -> tuple[str, str]:
        """(norm of the residual stream, the stream); `pending` is what the form deferred
        adding to the stream (None where it adds each sublayer as it goes)."""
        raise NotImplementedError

    def norm(self, y: str, key: str, name: str) -> str:
        """A sublayer output's own (sandwich) norm, in compute dtype."""
        raise NotImplementedError

    def add_norm(self, x: str, y: str, key: str, name: str, residual: str) -> tuple[str, str]:
        """(norm(x + y), x + y): the attention output joins the stream, the MLP's input norm."""
        raise NotImplementedError

    def residual_mlp(self, x: str, m: str) -> tuple[str, str | None]:
        """(stream, pending) after the MLP's normed output m: added now, or deferred."""
        raise NotImplementedError

    def final_norm(self, x: str, pending: str | None) -> str:
        """The final norm of the kept positions (logits_index): (b, kept, H)."""
        raise NotImplementedError

    def outputs(self) -> None:
        """Graph outputs after `logits` (which the skeleton makes)."""

    # ---- the whole graph -----------------------------------------------------------------
    def emit(self, progress: bool = True):
        g, cfg, p = self.g, self.cfg, self.prec
        contract = io_contract(cfg, p.kv, self.form)
        ctx = self.prepare()
        with g.under("embed_tokens"):
            e = self._embed_blocks()
            x = g.cast(g.op("Gather", [e, "input_ids"], axis=0), p.weights, self.residual_dtype)  # (b, s, H)
        pending = None
        for i in tqdm(range(cfg.num_hidden_layers), desc="export layers", unit="layer",
                      disable=not progress):
            ln = f"model.layers.{i}."
            self.prepare_layer(i)
            with g.under(f"layers.{i}"):
                h, x = self.input_norm(x, pending, ln + "input_layernorm.weight", "input_layernorm")
                a = self.norm(self.attention(i, h, ctx), ln + "post_self_attn_layernorm.weight",
                              "post_self_attn_layernorm")
                h, x = self.add_norm(x, a, ln + "post_attention_layernorm.weight", "post_attention_layernorm",
                                     "ResidualAttn")
                m = self.norm(self.mlp(i, h), ln + "post_mlp_layernorm.weight", "post_mlp_layernorm")
                x, pending = self.residual_mlp(x, m)
        with g.under("final"):
            x = self.final_norm(x, pending)                                  # (b, kept, H)
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        # tied embeddings are read a second time, transposed
        logits = self.linear(x, "lm_head", [head], reuse=cfg.tie_word_embeddings)  # (b, kept, V)
        g.output("Cast", [logits], "logits", to=ONNX_DTYPE["float32"])
        self.outputs()
        return contract

    def _embed_blocks(self) -> str:
        key = "model.embed_tokens.weight"
        raw, src, dst = self.ckpt.take_raw(key), self.ckpt.dtype(key), self.prec.weights
        rows = 4096
        return self.g.weight_blocks(key, raw.shape, dst, ordered_map(
            lambda r: convert(raw[r:r + rows], src, dst), range(0, raw.shape[0], rows)))


class ConcatEmitter(Emitter):
    """The concat form (targets onnxruntime and tensorrt): standard ops, the residual stream
    float32, RoPE and attention written out, past K/V concatenated with this step's."""
    form = "concat"

    def prepare(self):
        g, cfg = self.g, self.cfg
        with g.under("rotary"):
            inv_freq, scale = cfg.rope_inv_freq()
            pos = g.cast("position_ids", "int64", "float32")
            freqs = g.op("Mul", [g.op("Unsqueeze", [pos, g.const([-1], "int64")]),
                                 g.const(inv_freq.astype(np.float32), "float32")])  # (b, s, rot/2)
            shape5 = g.const([1, 4], "int64")                                   # -> (b,1,s,rot/2,1)
            cos = g.op("Unsqueeze", [g.op("Cos", [freqs]), shape5])
            sin = g.op("Unsqueeze", [g.op("Sin", [freqs]), shape5])
            if scale != 1.0:
                cos = g.op("Mul", [cos, g.const(scale, "float32")], name="YarnScaleCos")
                sin = g.op("Mul", [sin, g.const(scale, "float32")], name="YarnScaleSin")
        with g.under("attn_mask"):
            # slot j is visible to query i (slot past+i) when j <= past+i and attention_mask[j]
            total = g.op("Shape", ["attention_mask"], start=1, end=2)            # (1,) T
            seq = g.op("Shape", ["input_ids"], start=1, end=2)                   # (1,) s
            one = g.const(1, "int64")
            kpos = g.op("Range", [g.const(0, "int64"), g.op("Squeeze", [total]), one])       # (T,)
            qpos = g.op("Range", [g.op("Squeeze", [g.op("Sub", [total, seq])]),
                                  g.op("Squeeze", [total]), one])                            # (s,)
            causal = g.op("LessOrEqual", [kpos, g.op("Unsqueeze", [qpos, g.const([1], "int64")])])  # (s,T)
            pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=9), g.const([1], "int64")])  # (b,1,T)
            allowed = g.op("And", [causal, pad])                                             # (b,s,T)
            mask = g.op("Where", [allowed, g.const(0.0, "float32"), g.const(MASK_MIN, "float32")])
            mask = g.op("Unsqueeze", [mask, g.const([1, 2], "int64")])                       # (b,1,1,s,T)
        return cos, sin, mask

    def input_norm(self, x, pending, key, name):
        return self.rms_norm(x, "float32", key, name), x

    def norm(self, y, key, name):
        return self.rms_norm(y, self.prec.compute, key, name)

    def add_norm(self, x, y, key, name, residual):
        x = self.g.op("Add", [x, self.g.cast(y, self.prec.compute, "float32")], name=residual)
        return self.rms_norm(x, "float32", key, name), x

    def residual_mlp(self, x, m):
        return self.g.op("Add", [x, self.g.cast(m, self.prec.compute, "float32")], name="ResidualMlp"), None

    def final_norm(self, x, pending):
        x = self.g.op("Gather", [x, "logits_index"], axis=1, name="KeepPositions")  # (b, kept, H)
        return self.rms_norm(x, "float32", "model.norm.weight", "norm")

    # ---- building blocks -----------------------------------------------------------------
    def rms_norm(self, x: str, x_dtype: str, key: str, name: str) -> str:
        """RMSNorm in float32, cast to compute dtype, times the weight (transformers Glm4RMSNorm)."""
        g, c = self.g, self.prec.compute
        with g.under(name):
            x = g.cast(x, x_dtype, "float32")
            ms = g.op("ReduceMean", [g.op("Mul", [x, x], name="Square"), g.const([-1], "int64")],
                      keepdims=1)                                    # (b, s, 1)
            r = g.op("Sqrt", [g.op("Add", [ms, g.const(self.cfg.rms_norm_eps, "float32")], name="AddEps")])
            y = g.cast(g.op("Div", [x, r]), "float32", c)
            return g.op("Mul", [y, self.small(key, c)], name="Scale")

    def rope(self, x: str, heads: int, cos: str, sin: str) -> str:
        """Interleaved partial RoPE on x (b, heads, s, hd) float32 (docs/GLM4.md, the decoder layer).
        cos/sin: (b, 1, s, rot/2, 1)."""
        g, rot, hd = self.g, self.cfg.rotary_dim, self.cfg.head_dim
        with g.under("rope"):
            axes3 = g.const([3], "int64")
            x_rot = g.op("Slice", [x, g.const([0], "int64"), g.const([rot], "int64"), axes3])
            pairs = g.op("Reshape", [x_rot, g.const([0, 0, 0, rot // 2, 2], "int64")])  # (b,h,s,rot/2,2)
            x0, x1 = g.op("Split", [pairs], n_out=2, axis=4, num_outputs=2)        # (b,h,s,rot/2,1)
            o0 = g.op("Sub", [g.op("Mul", [x0, cos]), g.op("Mul", [x1, sin])])
            o1 = g.op("Add", [g.op("Mul", [x1, cos]), g.op("Mul", [x0, sin])])
            o = g.op("Reshape", [g.op("Concat", [o0, o1], axis=4), g.const([0, 0, 0, rot], "int64")])
            if rot == hd:
                return o
            x_pass = g.op("Slice", [x, g.const([rot], "int64"), g.const([hd], "int64"), axes3])
            return g.op("Concat", [o, x_pass], axis=3)                                # (b,h,s,hd)

    def attention(self, i: int, h: str, ctx) -> str:
        cos, sin, mask = ctx
        g, cfg, p = self.g, self.cfg, self.prec
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        a = f"model.layers.{i}.self_attn."
        with g.under("attn"):
            qkv = self.linear(h, "qkv_proj", [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
                              [a + f"{n}_proj.bias" for n in "qkv"] if cfg.attention_bias else None)
            q, k, v = g.op("Split", [qkv, g.const([nh * hd, nkv * hd, nkv * hd], "int64")], n_out=3, axis=2)

            def heads(t, n):  # (b, s, n*hd) -> (b, n, s, hd)
                return g.op("Transpose", [g.op("Reshape", [t, g.const([0, 0, n, hd], "int64")])],
                            perm=[0, 2, 1, 3])
            q = self.rope(g.cast(heads(q, nh), p.compute, "float32"), nh, cos, sin)
            k = g.cast(self.rope(g.cast(heads(k, nkv), p.compute, "float32"), nkv, cos, sin), "float32", p.kv)
            v = g.cast(heads(v, nkv), p.compute, p.kv)
            k_all = g.output("Concat", [past_key(i), k], present_key(i), name="ConcatPastKey", axis=2)
            v_all = g.output("Concat", [past_value(i), v], present_value(i), name="ConcatPastValue", axis=2)
            # GQA without copying K/V: group the query heads under their KV head.
            grp = nh // nkv
            q5 = g.op("Reshape", [q, g.const([0, nkv, grp, -1, hd], "int64")])        # (b,nkv,g,s,hd)
            q5 = g.op("Mul", [q5, g.const(hd ** -0.5, "float32")], name="ScaleQ")
            k5 = g.op("Unsqueeze", [g.cast(k_all, p.kv, "float32"), g.const([2], "int64")])  # (b,nkv,1,T,hd)
            scores = g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])])  # (b,nkv,g,s,T)
            probs = g.op("Softmax", [g.op("Add", [scores, mask], name="AddMask")], axis=-1)
            v5 = g.op("Unsqueeze", [v_all, g.const([2], "int64")])                       # (b,nkv,1,T,hd)
            ctx = g.op("MatMul", [g.cast(probs, "float32", p.kv), v5])                  # (b,nkv,g,s,hd)
            ctx = g.op("Reshape", [ctx, g.const([0, nh, -1, hd], "int64")])             # (b,nh,s,hd)
            ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])
            ctx = g.cast(g.op("Reshape", [ctx, g.const([0, 0, nh * hd], "int64")]), p.kv, p.compute)
            return self.linear(ctx, "o_proj", [a + "o_proj.weight"])
