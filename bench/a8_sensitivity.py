"""Where int8 activations (per 32 values, as the cuda engine's --activations int8) move the
logits of a model with random weights of GLM-Z1-9B's shapes (4 layers, vocabulary 8192, the
synthetic checkpoints' weight scale): the float64 reference (glmrt/reference.py) with each
GEMV's input quantized in turn through its `observe` hook, against the same forward with exact
inputs (and with fp16 inputs, the engine's default). The lm_head's input is fp16 throughout.

    python3 bench/a8_sensitivity.py        # ~4 minutes, ~8 GB of memory
"""
import numpy as np

from glmrt import reference
from glmrt.backends.cuda_engine.selfcheck import quant_a8
from glmrt.config import GlmConfig
from glmrt.export.synthetic import hf_config, random_tensor

H, I, NH, NKV, HD, V, L = 4096, 13696, 32, 2, 128, 8192, 4
cfg = GlmConfig.from_hf(hf_config(dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                                       num_attention_heads=NH, num_key_value_heads=NKV, head_dim=HD,
                                       max_position_embeddings=4096, attention_bias=True), [0], 0))
rng = np.random.default_rng(0)
W = {}


def t(k, shape):
    W[k] = random_tensor(k, shape, rng, 2.0)


t("model.embed_tokens.weight", (V, H))
t("model.norm.weight", (H,))
t("lm_head.weight", (V, H))
for i in range(L):
    p = f"model.layers.{i}."
    for n, rows in (("q", NH * HD), ("k", NKV * HD), ("v", NKV * HD)):
        t(p + f"self_attn.{n}_proj.weight", (rows, H))
    for n, rows in (("q", NH * HD), ("k", NKV * HD), ("v", NKV * HD)):
        t(p + f"self_attn.{n}_proj.bias", (rows,))
    t(p + "self_attn.o_proj.weight", (H, NH * HD))
    t(p + "mlp.gate_up_proj.weight", (2 * I, H))
    t(p + "mlp.down_proj.weight", (H, I))
    for n in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"):
        t(p + n + ".weight", (H,))


def f16(x):
    return x.astype(np.float16).astype(np.float64)


def a8(x, g=32):
    return quant_a8(x, g)        # what the kernel multiplies (K is a multiple of 32 at these shapes)


def ident(x):
    return np.asarray(x, np.float64)


ROLE = {"attn/qkv_proj": "qkv", "attn/o_proj": "o", "mlp/gate_up_proj": "gate_up", "mlp/down_proj": "down"}


def forward(ids, Q):
    """Q: {GEMV: what its input becomes}; the lm_head's input is rounded to fp16."""
    def observe(name, x):
        return f16(x) if name == "lm_head" else Q[ROLE[name.split("/", 1)[1]]](x)
    return reference.forward(cfg, W, ids, observe=observe)[0]


ids = rng.integers(3, V, 24)
ALL = ("qkv", "o", "gate_up", "down")
ref = forward(ids, {k: ident for k in ALL})
scale = np.abs(ref).max(1, keepdims=True)


def report(name, Q):
    out = forward(ids, Q)
    err = np.abs(out - ref).max(1) / scale[:, 0]
    top = (out.argmax(1) == ref.argmax(1)).mean()
    print(f"{name:34s} max rel err {err.max():.2e}  median {np.median(err):.2e}  top-1 agree {100 * top:.0f}%",
          flush=True)


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
acts = {}


def grab(name):
    def f(x):
        u = np.asarray(x).reshape(-1, 32)
        acts.setdefault(name, []).append(np.median(np.abs(u).max(1) / np.sqrt((u * u).mean(1) + 1e-30)))
        return f16(x)
    return f


forward(ids, {k: grab(k) for k in ALL})
print({k: round(float(np.mean(v)), 2) for k, v in acts.items()}, "(median absmax/rms per 32-group)")
