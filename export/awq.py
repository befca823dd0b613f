"""Activation-aware scaling (AWQ-style) for weight-only int4/int8: per input channel scales
s = mean|x|^alpha, alpha searched on calibration activations, so the channels that matter most
keep more precision. W x = (W diag(s)) (x / s): the weights are quantized as W diag(s) and 1/s
is folded into what produces x, so the graph gains no operation:

  qkv_proj, gate_up_proj   input is a norm's output      -> the norm's weight is divided by s
  down_proj                input is silu(gate) * up      -> up's rows are divided by s
  o_proj (GQA: value heads are shared) and lm_head keep plain round-to-nearest.

The search keeps alpha = 0 (plain rounding) unless a scale lowers the output error
||X W^T - X Q(W s)^T / s|| on the calibration rows, so it never does worse there.
"""
from __future__ import annotations

import numpy as np

ALPHAS = np.linspace(0.0, 1.0, 11)


def search(scheme, w: np.ndarray, stats: dict) -> tuple[np.ndarray, float, dict]:
    """w (N, K) float32 -> (s (K,), alpha, {"rtn": err, "awq": err}) minimizing output error."""
    x = stats["sample"].astype(np.float32)                        # (rows, K)
    ref = x @ w.T
    base = float(np.sum(ref * ref)) or 1.0
    mean_abs = np.maximum(stats["mean_abs"].astype(np.float64), 1e-8)
    best = (None, 0.0, np.inf)
    errs = {}
    for alpha in ALPHAS:
        s = mean_abs ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)  # centred around 1
        w_hat = (_round_trip(scheme, w * s[None, :]) / s[None, :]).astype(np.float32)
        d = ref - x @ w_hat.T
        err = float(np.sum(d * d)) / base
        errs[float(alpha)] = err
        if err < best[2]:
            best = (s, float(alpha), err)
    s, alpha, err = best
    return s, alpha, {"rtn": errs[0.0], "awq": err}


def _round_trip(scheme, w):
    q = scheme.quantize(w)
    return scheme.dequantize(q)


def layer_scales(scheme, ckpt, i: int, stats: dict) -> tuple[dict, dict]:
    """Layer i's scales: the norms' keys -> s to divide by; "qkv_cols", "gate_up_cols",
    "down_cols" -> s to multiply weight columns by; "gate_up_rows" -> row factors (1 for
    gate, 1/s_down for up). And a report {linear: {alpha, rtn, awq}} of output errors."""
    from .checkpoint import convert

    def w(key):
        return convert(ckpt.raw(key), ckpt.dtype(key), "float32")
    p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    name = f"layers.{i}/"
    out, report = {}, {}
    qkv = np.concatenate([w(a + f"{n}_proj.weight") for n in "qkv"])
    s, alpha, e = search(scheme, qkv, stats[name + "attn/qkv_proj"])
    out["qkv_cols"] = out[p + "input_layernorm.weight"] = s
    report[name + "attn/qkv_proj"] = {"alpha": alpha, **e}
    del qkv
    down = w(p + "mlp.down_proj.weight")                           # (H, I)
    s, alpha, e = search(scheme, down, stats[name + "mlp/down_proj"])
    out["down_cols"] = s
    report[name + "mlp/down_proj"] = {"alpha": alpha, **e}
    del down
    gate_up = w(p + "mlp.gate_up_proj.weight")                     # (2I, H)
    inter = gate_up.shape[0] // 2
    out["gate_up_rows"] = np.concatenate([np.ones(inter, np.float32), 1.0 / s])   # up half / s
    # gate_up's own input scales are searched on the weights as they will be stored
    stats_gu = stats[name + "mlp/gate_up_proj"]
    s, alpha, e = search(scheme, gate_up * out["gate_up_rows"][:, None], stats_gu)
    out["gate_up_cols"] = out[p + "post_attention_layernorm.weight"] = s
    report[name + "mlp/gate_up_proj"] = {"alpha": alpha, **e}
    return out, report
