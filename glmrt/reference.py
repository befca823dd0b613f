"""The float64 numpy forward pass of GLM-4-0414: the spec every backend is tested against.

Readable top to bottom, one token sequence (batch 1), with a KV cache. `weights` maps the
checkpoint's own keys (see glmrt.export.checkpoint.expected_tensors) to arrays of any float dtype.
"""
from __future__ import annotations

import numpy as np

from .config import GlmConfig


def rms_norm(x, w, eps):
    # x (..., H); GLM4 norms are computed in float (here float64) then scaled by the weight
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_interleaved(x, positions, cfg: GlmConfig):
    """GPT-J style RoPE on the first rotary_dim dims, adjacent pairs (2i, 2i+1); rest pass.

    transformers models/glm4 apply_rotary_pos_emb: cos[..., :d/2].repeat_interleave(2)."""
    # x (heads, seq, hd); positions (seq,)
    inv_freq, scale = cfg.rope_inv_freq()                 # (rot/2,)
    ang = positions[:, None].astype(np.float64) * inv_freq  # (seq, rot/2)
    cos, sin = np.cos(ang) * scale, np.sin(ang) * scale
    rot = cfg.rotary_dim
    x0, x1 = x[..., 0:rot:2], x[..., 1:rot:2]              # (heads, seq, rot/2) each
    out = x.copy()
    out[..., 0:rot:2] = x0 * cos - x1 * sin
    out[..., 1:rot:2] = x1 * cos + x0 * sin
    return out


def forward(cfg: GlmConfig, weights, input_ids, cache=None):
    """input_ids (seq,) -> logits (seq, V) float64, new cache.

    cache: list over layers of (k, v), each (nkv, past, hd) float64, K stored after RoPE."""
    def w(key):
        return np.asarray(weights[key], dtype=np.float64)

    ids = np.asarray(input_ids, dtype=np.int64)
    past = 0 if cache is None else cache[0][0].shape[1]
    seq = ids.shape[0]
    positions = np.arange(past, past + seq)
    nh, nkv, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    x = w("model.embed_tokens.weight")[ids]                # (seq, H)
    new_cache = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        # --- attention, sandwiched between input_layernorm and post_self_attn_layernorm
        h = rms_norm(x, w(p + "input_layernorm.weight"), eps)
        q, k, v = (h @ w(p + f"self_attn.{n}_proj.weight").T for n in "qkv")
        if cfg.attention_bias:
            q, k, v = (t + w(p + f"self_attn.{n}_proj.bias") for t, n in zip((q, k, v), "qkv"))
        q = q.reshape(seq, nh, hd).transpose(1, 0, 2)      # (nh, seq, hd)
        k = k.reshape(seq, nkv, hd).transpose(1, 0, 2)     # (nkv, seq, hd)
        v = v.reshape(seq, nkv, hd).transpose(1, 0, 2)
        q, k = rope_interleaved(q, positions, cfg), rope_interleaved(k, positions, cfg)
        if cache is not None:
            k = np.concatenate([cache[i][0], k], axis=1)   # (nkv, past+seq, hd)
            v = np.concatenate([cache[i][1], v], axis=1)
        new_cache.append((k, v))
        total = past + seq
        g = nh // nkv                                      # query heads per KV head
        kk, vv = np.repeat(k, g, axis=0), np.repeat(v, g, axis=0)  # (nh, total, hd)
        scores = q @ kk.transpose(0, 2, 1) * hd ** -0.5    # (nh, seq, total)
        causal = np.arange(total)[None, :] <= positions[:, None]   # (seq, total)
        scores = np.where(causal, scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attn = (probs @ vv).transpose(1, 0, 2).reshape(seq, nh * hd)
        attn = attn @ w(p + "self_attn.o_proj.weight").T
        x = x + rms_norm(attn, w(p + "post_self_attn_layernorm.weight"), eps)
        # --- MLP: post_attention_layernorm is the PRE-MLP norm, post_mlp_layernorm after
        h = rms_norm(x, w(p + "post_attention_layernorm.weight"), eps)
        gate, up = np.split(h @ w(p + "mlp.gate_up_proj.weight").T, 2, axis=-1)  # (seq, I) each
        mlp = (gate / (1 + np.exp(-gate)) * up) @ w(p + "mlp.down_proj.weight").T
        x = x + rms_norm(mlp, w(p + "post_mlp_layernorm.weight"), eps)
    x = rms_norm(x, w("model.norm.weight"), eps)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return x @ w(head).T, new_cache
