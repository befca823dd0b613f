"""The CUDA form (export --target cuda): the decoder skeleton of export/decoder.py with ONNX
Runtime's fused kernels for attention and norms, fp16 activations.

GroupQueryAttention does RoPE (interleaved, partial: cos/sin caches rot/2 wide), GQA and the
in-place KV cache update; RMSNorms are SimplifiedLayerNormalization (float32 inside); each
residual add is fused into the next norm by SkipSimplifiedLayerNormalization:

  x ──> SLN/Skip ─> qkv ─> GQA ─> o_proj ─> SLN(post_self_attn) ─┐
  └───────────────────────────────────────────────────> Skip(+x, post_attention) ─> gate_up
                                  ─> silu*up ─> down ─> SLN(post_mlp) ─> next layer's Skip
The residual stream is fp16 here (the concat form keeps it fp32).
"""
from __future__ import annotations

import numpy as np

from glmrt.contract import past_key, past_value, present_key, present_value
from glmrt.errors import GlmrtError

from .decoder import Emitter


class GqaEmitter(Emitter):
    form = "gqa"

    @property
    def residual_dtype(self) -> str:
        return self.prec.compute

    def prepare(self):
        g, cfg, p = self.g, self.cfg, self.prec
        if (cfg.rotary_dim // 2) % 8:
            raise GlmrtError(f"target cuda: GroupQueryAttention needs rotary_dim/2 a multiple of 8; "
                             f"this model has rotary_dim {cfg.rotary_dim}")
        inv_freq, scale = cfg.rope_inv_freq()
        ang = np.arange(cfg.max_position_embeddings, dtype=np.float64)[:, None] * inv_freq  # (P, rot/2)
        cos = g.weight("rotary.cos_cache", (np.cos(ang) * scale).astype(p.compute), p.compute)
        sin = g.weight("rotary.sin_cache", (np.sin(ang) * scale).astype(p.compute), p.compute)
        return cos, sin

    def attention(self, i: int, h: str, ctx) -> str:
        cos, sin = ctx
        g, cfg = self.g, self.cfg
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        a = f"model.layers.{i}.self_attn."
        with g.under("attn"):
            qkv = self.linear(h, "qkv_proj", [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
                              [a + f"{n}_proj.bias" for n in "qkv"] if cfg.attention_bias else None)
            attn = f"/model/layers.{i}/attn/GroupQueryAttention/output_0"   # (b, s, nh*hd)
            g.output("GroupQueryAttention",
                     [qkv, "", "", past_key(i), past_value(i), "seqlens_k",
                      "total_sequence_length", cos, sin],
                     [attn, present_key(i), present_value(i)], domain="com.microsoft",
                     num_heads=nh, kv_num_heads=nkv, scale=hd ** -0.5, do_rotary=1,
                     rotary_interleaved=1)
            return self.linear(attn, "o_proj", [a + "o_proj.weight"])

    # ---- norms: SimplifiedLayerNormalization, residual adds fused into the next one --------
    def sln(self, x: str, key: str, name: str) -> str:
        return self.g.op("SimplifiedLayerNormalization", [x, self.small(key, self.prec.compute)],
                         name=name, axis=-1, epsilon=self.cfg.rms_norm_eps, stash_type=1)

    def skip_sln(self, x: str, residual: str, key: str, name: str):
        """(norm(x + residual), x + residual)."""
        out, _, _, total = self.g.op("SkipSimplifiedLayerNormalization",
                                     [x, residual, self.small(key, self.prec.compute)], n_out=4,
                                     unused=(1, 2), name=name, domain="com.microsoft",
                                     epsilon=self.cfg.rms_norm_eps)
        return out, total

    def input_norm(self, x, pending, key, name):
        if pending is None:                        # layer 0: nothing deferred yet
            return self.sln(x, key, name), x
        return self.skip_sln(pending, x, key, name)

    def norm(self, y, key, name):
        return self.sln(y, key, name)

    def add_norm(self, x, y, key, name, residual):
        return self.skip_sln(y, x, key, name)

    def residual_mlp(self, x, m):
        return x, m                                # added by the next layer's input norm

    def final_norm(self, x, pending):
        x, _ = self.skip_sln(pending, x, "model.norm.weight", "norm")
        return self.g.op("Gather", [x, "logits_index"], axis=1, name="KeepPositions")  # (b, kept, H)

    def outputs(self) -> None:
        self.g.output("ArgMax", ["logits"], "next_token", axis=-1, keepdims=0)   # first max, as numpy
