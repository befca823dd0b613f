"""The numpy forward pass of GLM-4-0414: the spec every backend is tested against.

Readable top to bottom, one token sequence (batch 1), with a KV cache. float64 by default
(the spec); export/calibrate.py runs the same code layer by layer in float32 to observe the
inputs of every linear. `weights` maps the checkpoint's own keys
(see glmrt.export.checkpoint.expected_tensors) to arrays of any float dtype.
"""
from __future__ import annotations

import numpy as np

from .config import GlmConfig


def rms_norm(x, w, eps):
    # x (..., H); GLM4 norms are computed in float then scaled by the weight
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_interleaved(x, positions, cfg: GlmConfig):
    """GPT-J style RoPE on the first rotary_dim dims, adjacent pairs (2i, 2i+1); rest pass.

    transformers models/glm4 apply_rotary_pos_emb: cos[..., :d/2].repeat_interleave(2)."""
    # x (heads, seq, hd); positions (seq,)
    inv_freq, scale = cfg.rope_inv_freq()                 # (rot/2,)
    ang = positions[:, None].astype(np.float64) * inv_freq  # (seq, rot/2)
    cos, sin = (np.cos(ang) * scale).astype(x.dtype), (np.sin(ang) * scale).astype(x.dtype)
    rot = cfg.rotary_dim
    x0, x1 = x[..., 0:rot:2], x[..., 1:rot:2]              # (heads, seq, rot/2) each
    out = x.copy()
    out[..., 0:rot:2] = x0 * cos - x1 * sin
    out[..., 1:rot:2] = x1 * cos + x0 * sin
    return out


def rope_table(cfg: GlmConfig, positions: int) -> np.ndarray:
    """(positions, rot/2, 2) float32 cos, sin from float64 angles, as rope_interleaved rotates:
    the table the engines' kernels rotate q and k with (row = position)."""
    inv_freq, scale = cfg.rope_inv_freq()
    ang = np.arange(positions, dtype=np.float64)[:, None] * inv_freq          # (P, rot/2)
    return np.stack([np.cos(ang) * scale, np.sin(ang) * scale], axis=-1).astype(np.float32)


def _observe(observe, name, x):
    """observe(name, x) sees a linear's input; what it returns, unless None, is used instead
    (calibration only looks; an experiment can perturb the input, bench/a8_sensitivity.py)."""
    seen = None if observe is None else observe(name, x)
    return x if seen is None else seen


def layer(cfg: GlmConfig, w, i: int, x, positions, past=None, observe=None):
    """One decoder layer. x (seq, H); past (k, v) each (nkv, past, hd) -> x, (k, v).

    w(key) returns a weight in the working dtype; observe(name, input) sees each linear's input
    (and may replace it: _observe)."""
    nh, nkv, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    seq = x.shape[0]
    p = f"model.layers.{i}."
    # --- attention, sandwiched between input_layernorm and post_self_attn_layernorm
    h = rms_norm(x, w(p + "input_layernorm.weight"), eps)
    h = _observe(observe, f"layers.{i}/attn/qkv_proj", h)
    q, k, v = (h @ w(p + f"self_attn.{n}_proj.weight").T for n in "qkv")
    if cfg.attention_bias:
        q, k, v = (t + w(p + f"self_attn.{n}_proj.bias") for t, n in zip((q, k, v), "qkv"))
    q = q.reshape(seq, nh, hd).transpose(1, 0, 2)          # (nh, seq, hd)
    k = k.reshape(seq, nkv, hd).transpose(1, 0, 2)         # (nkv, seq, hd)
    v = v.reshape(seq, nkv, hd).transpose(1, 0, 2)
    q, k = rope_interleaved(q, positions, cfg), rope_interleaved(k, positions, cfg)
    if past is not None:
        k = np.concatenate([past[0], k], axis=1)           # (nkv, past+seq, hd)
        v = np.concatenate([past[1], v], axis=1)
    total = k.shape[1]
    g = nh // nkv                                          # query heads per KV head
    kk, vv = np.repeat(k, g, axis=0), np.repeat(v, g, axis=0)  # (nh, total, hd)
    scores = q @ kk.transpose(0, 2, 1) * hd ** -0.5        # (nh, seq, total)
    causal = np.arange(total)[None, :] <= positions[:, None]   # (seq, total)
    scores = np.where(causal, scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    attn = (probs @ vv).transpose(1, 0, 2).reshape(seq, nh * hd)
    attn = _observe(observe, f"layers.{i}/attn/o_proj", attn)
    attn = attn @ w(p + "self_attn.o_proj.weight").T
    x = x + rms_norm(attn, w(p + "post_self_attn_layernorm.weight"), eps)
    # --- MLP: post_attention_layernorm is the PRE-MLP norm, post_mlp_layernorm after
    h = rms_norm(x, w(p + "post_attention_layernorm.weight"), eps)
    h = _observe(observe, f"layers.{i}/mlp/gate_up_proj", h)
    gate, up = np.split(h @ w(p + "mlp.gate_up_proj.weight").T, 2, axis=-1)  # (seq, I) each
    act = gate / (1 + np.exp(-gate)) * up
    act = _observe(observe, f"layers.{i}/mlp/down_proj", act)
    mlp = act @ w(p + "mlp.down_proj.weight").T
    x = x + rms_norm(mlp, w(p + "post_mlp_layernorm.weight"), eps)
    return x, (k, v)


def head(cfg: GlmConfig, w, x, observe=None):
    """Final norm and lm_head: x (seq, H) -> logits (seq, V)."""
    x = rms_norm(x, w("model.norm.weight"), cfg.rms_norm_eps)
    x = _observe(observe, "lm_head", x)
    key = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return x @ w(key).T


def forward(cfg: GlmConfig, weights, input_ids, cache=None, dtype=np.float64, observe=None):
    """input_ids (seq,) -> logits (seq, V), new cache (per layer (k, v), K after RoPE);
    observe: as in layer(), for every linear's input."""
    def w(key):
        return np.asarray(weights[key], dtype=dtype)

    ids = np.asarray(input_ids, dtype=np.int64)
    past = 0 if cache is None else cache[0][0].shape[1]
    positions = np.arange(past, past + ids.shape[0])
    x = w("model.embed_tokens.weight")[ids]                # (seq, H)
    new_cache = []
    for i in range(cfg.num_hidden_layers):
        x, kv = layer(cfg, w, i, x, positions, None if cache is None else cache[i], observe)
        new_cache.append(kv)
    return head(cfg, w, x, observe), new_cache
