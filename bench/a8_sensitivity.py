"""Where int8 activations (per 32 values, as the cuda engine's --activations int8) move the
logits of a model with random weights of GLM-Z1-9B's shapes (4 layers, vocabulary 8192, the
synthetic checkpoints' weight scale): numpy in float64, each GEMV's input quantized in turn,
against the same forward with exact inputs (and with fp16 inputs, the engine's default).

    python3 bench/a8_sensitivity.py        # ~4 minutes, ~8 GB of memory
"""
import numpy as np

from glmrt.reference import rms_norm, rope_interleaved
from glmrt.export.synthetic import random_tensor

H, I, NH, NKV, HD, V, L = 4096, 13696, 32, 2, 128, 8192, 4
class _C:
    rotary_dim = 64
    def rope_inv_freq(self):
        return 1.0 / 10000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64), 1.0
cfg = _C()
rng = np.random.default_rng(0)
W = {}
def t(k, shape): W[k] = random_tensor(k, shape, rng, 2.0)
t("model.embed_tokens.weight", (V, H)); t("model.norm.weight", (H,)); t("lm_head.weight", (V, H))
for i in range(L):
    p = f"model.layers.{i}."
    t(p+"self_attn.q_proj.weight", (NH*HD, H)); t(p+"self_attn.k_proj.weight", (NKV*HD, H)); t(p+"self_attn.v_proj.weight", (NKV*HD, H))
    for n, sz in (("q", NH*HD), ("k", NKV*HD), ("v", NKV*HD)): t(p+f"self_attn.{n}_proj.bias", (sz,))
    t(p+"self_attn.o_proj.weight", (H, NH*HD)); t(p+"mlp.gate_up_proj.weight", (2*I, H)); t(p+"mlp.down_proj.weight", (H, I))
    for n in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"): t(p+n+".weight", (H,))

def f16(x): return x.astype(np.float16).astype(np.float64)
def a8(x, g=32):
    x = np.asarray(x, np.float32); s = x.shape; u = x.reshape(-1, g)
    amax = np.abs(u).max(1, keepdims=True); inv = np.where(amax > 0, 127 / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return (np.rint(u * inv) * (amax / 127)).reshape(s).astype(np.float64)
def ident(x): return np.asarray(x, np.float64)

def forward(ids, Q):
    """Q: {gemv name: function applied to its input}"""
    nh, nkv, hd, eps = NH, NKV, HD, 1e-5
    w = lambda k: W[k].astype(np.float64)
    x = w("model.embed_tokens.weight")[ids]
    seq = len(ids); positions = np.arange(seq)
    for i in range(L):
        p = f"model.layers.{i}."
        h = Q["qkv"](rms_norm(x, w(p+"input_layernorm.weight"), eps))
        q, k, v = (h @ w(p+f"self_attn.{n}_proj.weight").T + w(p+f"self_attn.{n}_proj.bias") for n in "qkv")
        q = q.reshape(seq, nh, hd).transpose(1, 0, 2); k = k.reshape(seq, nkv, hd).transpose(1, 0, 2); v = v.reshape(seq, nkv, hd).transpose(1, 0, 2)
        q, k = rope_interleaved(q, positions, cfg), rope_interleaved(k, positions, cfg)
        g = nh // nkv; kk, vv = np.repeat(k, g, 0), np.repeat(v, g, 0)
        sc = q @ kk.transpose(0, 2, 1) * hd ** -0.5
        sc = np.where(np.arange(seq)[None, :] <= positions[:, None], sc, -np.inf)
        sc = np.exp(sc - sc.max(-1, keepdims=True)); pr = sc / sc.sum(-1, keepdims=True)
        attn = (pr @ vv).transpose(1, 0, 2).reshape(seq, nh * hd)
        attn = Q["o"](attn) @ w(p+"self_attn.o_proj.weight").T
        x = x + rms_norm(attn, w(p+"post_self_attn_layernorm.weight"), eps)
        h = Q["gate_up"](rms_norm(x, w(p+"post_attention_layernorm.weight"), eps))
        gate, up = np.split(h @ w(p+"mlp.gate_up_proj.weight").T, 2, axis=-1)
        act = gate / (1 + np.exp(-gate)) * up
        mlp = Q["down"](act) @ w(p+"mlp.down_proj.weight").T
        x = x + rms_norm(mlp, w(p+"post_mlp_layernorm.weight"), eps)
    x = rms_norm(x, w("model.norm.weight"), eps)
    return f16(x) @ w("lm_head.weight").T

ids = rng.integers(3, V, 24)
ALL = ("qkv", "o", "gate_up", "down")
ref = forward(ids, {k: ident for k in ALL})
scale = np.abs(ref).max(1, keepdims=True)
def report(name, Q):
    out = forward(ids, Q)
    err = np.abs(out - ref).max(1) / scale[:, 0]
    top = (out.argmax(1) == ref.argmax(1)).mean()
    print(f"{name:34s} max rel err {err.max():.2e}  median {np.median(err):.2e}  top-1 agree {100*top:.0f}%", flush=True)
report("fp16 x everywhere (engine default)", {k: f16 for k in ALL})
report("int8 x per 32 everywhere", {k: a8 for k in ALL})
report("int8 x per 32, down fp16", {**{k: a8 for k in ALL}, "down": f16})
report("int8 x per 32, only down", {**{k: f16 for k in ALL}, "down": a8})
report("int8 x per 32, only gate_up", {**{k: f16 for k in ALL}, "gate_up": a8})
report("int8 x per 32, only qkv", {**{k: f16 for k in ALL}, "qkv": a8})
report("int8 x per 32, only o", {**{k: f16 for k in ALL}, "o": a8})
report("int8 x per 16 everywhere", {k: (lambda x: a8(x, 16)) for k in ALL})
report("int8 x except qkv", {**{k: a8 for k in ALL}, "qkv": f16})
report("int8 x for gate_up and down only", {**{k: f16 for k in ALL}, "gate_up": a8, "down": a8})
# statistics of each GEMV input: absmax / rms over groups of 32
acts = {}
def grab(name):
    def f(x):
        u = np.asarray(x).reshape(-1, 32); r = np.abs(u).max(1) / np.sqrt((u * u).mean(1) + 1e-30)
        acts.setdefault(name, []).append(np.median(r)); return f16(x)
    return f
forward(ids, {k: grab(k) for k in ALL})
print({k: round(float(np.mean(v)), 2) for k, v in acts.items()}, "(median absmax/rms per 32-group)")
