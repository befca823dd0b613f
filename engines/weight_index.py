"""The weight index an engine of glmrt's own reads from an export's model.onnx.data: every
tensor's offset, bytes, dtype and shape in the external data file and its role (per layer:
norms, qkv / o / gate_up / down with their scales and bias; the embedding, final norm and
lm_head), checked against the config. The runtime reads (cuda: uploads, cpu: memory-maps) the
file at these offsets: no onnx at run time, no conversion.

Which exports an engine reads is a `Reads`: the cuda engine (engines/cuda_build.py) the
`--target cuda` gqa form in fp16 / bf16 / fp8 / int4 with fp16 scales; the cpu engine
(engines/cpu_build.py) the `--target cpu` gqa form, int4 or int8 MatMulNBits with fp32 scales.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from glmrt.config import GlmConfig
from glmrt.errors import GlmrtError

# ONNX Runtime takes the cuda engine's memory as its initializers through DLPack, which has no fp8
# or bf16 type that ONNX Runtime reads: those tensors are marked, and ONNX Runtime loads its own copy
NOT_SHARED = {17: "float8e4m3fn", 16: "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Reads:
    engine: str                      # "cuda" or "cpu", for messages
    target: str                      # the export --target whose gqa form it reads
    refuse: str                      # what it runs, said when it refuses an export
    check: Callable                  # (model_dir, manifest precision) -> None, or raises
    dtypes: dict                     # ONNX data type -> the index's dtype name
    floats: bool                     # float matrices (fp16 / bf16) read
    int8_layers: bool                # 8-bit MatMulNBits in the layers (else the lm_head only)


def index_export(model_dir: Path, man: dict, cfg: GlmConfig, reads: Reads) -> tuple[dict, str, int]:
    """The weight index the runtime reads from, the layers' matrix format and their block;
    refuses, in one line, an export the engine (`reads`) cannot read."""
    import onnx
    prec = man["precision"]
    if man["io"]["form"] != "gqa" or prec.get("target") != reads.target:
        raise GlmrtError(f"{model_dir} is the {man['io']['form']} form of --target {prec.get('target')}; "
                         f"{reads.refuse} (export with --target {reads.target})")
    reads.check(model_dir, prec)
    q = prec.get("quantization")
    block = q.get("block_size", 32) if q else 32
    graph = onnx.load(str(model_dir / man["graph"]), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    consumer = {i: n for n in graph.node for i in n.input}
    tensors, files = {}, set()

    def tensor(name: str, shape: tuple | None = None) -> str:
        t = inits.get(name)
        if t is None:
            raise GlmrtError(f"{model_dir}: the export has no tensor {name!r} (not a glmrt --target {reads.target} export?)")
        if t.data_type not in reads.dtypes:
            raise GlmrtError(f"{model_dir}: {name} is ONNX type {t.data_type}; the {reads.engine} engine reads "
                             + ", ".join(sorted(set(reads.dtypes.values()) | set(NOT_SHARED.values()))))
        ext = {e.key: e.value for e in t.external_data}
        if t.data_location != onnx.TensorProto.EXTERNAL or "location" not in ext:
            raise GlmrtError(f"{model_dir}: {name} is not in the external data file")
        dims = tuple(int(d) for d in t.dims)
        if shape is not None and dims != tuple(shape):
            raise GlmrtError(f"{model_dir}: {name} has shape {dims}, the config says {tuple(shape)}")
        files.add(ext["location"])
        tensors[name] = {"offset": int(ext.get("offset", 0)), "bytes": int(ext["length"]),
                         "dtype": reads.dtypes[t.data_type], "shape": list(dims)}
        if t.data_type in NOT_SHARED:
            tensors[name].update(shared=False, onnx=NOT_SHARED[t.data_type])
        return name

    def linear(prefix: str, k: int, n: int, bias: bool = False) -> dict:
        if prefix + ".qweight" in inits and inits[prefix + ".qweight"].data_type == 17:     # fp8-rows
            if k % 16:
                raise GlmrtError(f"{model_dir}: {prefix} has {k} inputs; fp8 rows need a multiple of 16")
            d = {"format": "fp8", "w": tensor(prefix + ".qweight", (n, k)), "scales": tensor(prefix + ".scales", (n,))}
        elif prefix + ".qweight" in inits:
            if prefix + ".zero_points" in inits:
                raise GlmrtError(f"{model_dir}: {prefix} has zero points; the engine reads symmetric MatMulNBits")
            kb = -(-k // block)
            node = consumer.get(prefix + ".qweight")          # the MatMulNBits reading it: its bits and block
            attrs = {x.name: x.i for x in node.attribute} if node is not None else {}
            bits = attrs.get("bits", 4)
            if bits not in (4, 8) or attrs.get("block_size", block) != block:
                raise GlmrtError(f"{model_dir}: {prefix} is {bits}-bit in blocks of {attrs.get('block_size')}; the engine "
                                 f"reads {'4 or 8 bits' if reads.int8_layers else '4 bits (8 for the lm_head)'} in the layers' blocks of {block}")
            if bits == 8 and prefix != "lm_head" and not reads.int8_layers:
                raise GlmrtError(f"{model_dir}: {prefix} is 8-bit; the engine reads 8 bits for the lm_head only")
            if bits == 8 and k % block and not reads.int8_layers:
                raise GlmrtError(f"{model_dir}: {prefix} has {k} inputs; an 8-bit lm_head needs whole blocks of {block}")
            d = {"format": "int8" if bits == 8 else "int4",
                 "w": tensor(prefix + ".qweight", (n, kb, block if bits == 8 else block // 2)),
                 "scales": tensor(prefix + ".scales", (n, kb))}
        elif not reads.floats:
            raise GlmrtError(f"{model_dir}: {prefix} is not MatMulNBits; {reads.refuse}")
        else:
            w = prefix + ".weight"
            node = consumer.get(w)
            if node is not None and node.op_type == "Cast":          # bf16 weights, cast to fp16 for ONNX Runtime
                node = consumer.get(node.output[0])
            trans_b = node is not None and node.op_type == "FusedMatMul" and any(
                a.name == "transB" and a.i == 1 for a in node.attribute)
            bf16 = inits[w].data_type == 16 if w in inits else False
            d = {"format": ("bf16" if trans_b else "bf16_kn") if bf16 else ("f16" if trans_b else "f16_kn"),
                 "w": tensor(w, (n, k) if trans_b else (k, n)), "scales": None}
            if k % 8 or n % 8:
                raise GlmrtError(f"{model_dir}: {prefix} is {n} x {k}; float matrices need sizes that are multiples of 8")
        d["bias"] = tensor(prefix + ".bias", (n,)) if bias else None
        return d

    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if hd % 8 or cfg.rotary_dim % 2:
        raise GlmrtError(f"{model_dir}: head_dim {hd}; the engine's attention needs a multiple of 8")
    layers = []
    for i in range(cfg.num_hidden_layers):
        p, a, m = f"model.layers.{i}.", f"layers.{i}/attn/", f"layers.{i}/mlp/"
        layers.append({
            "input_norm": tensor(p + "input_layernorm.weight", (H,)),
            "qkv": linear(a + "qkv_proj", H, (nh + 2 * nkv) * hd, cfg.attention_bias),
            "o": linear(a + "o_proj", nh * hd, H),
            "post_attn_norm": tensor(p + "post_self_attn_layernorm.weight", (H,)),
            "pre_mlp_norm": tensor(p + "post_attention_layernorm.weight", (H,)),
            "gate_up": linear(m + "gate_up_proj", H, 2 * I),
            "down": linear(m + "down_proj", I, H),
            "post_mlp_norm": tensor(p + "post_mlp_layernorm.weight", (H,)),
        })
    formats = {layers[i][r]["format"] for i in range(len(layers)) for r in ("qkv", "o", "gate_up", "down")}
    head = linear("lm_head", H, V)
    if {"f16_kn", "bf16_kn"} & formats or head["format"] == "bf16_kn":
        raise GlmrtError(f"{model_dir}: float matrices stored as W^T (the default --float-layout kn); the "
                         "engine reads them as the checkpoint stores them: export with --float-layout nk")
    if len(formats) != 1:
        raise GlmrtError(f"{model_dir}: mixed matrix formats {sorted(formats)}")
    index = {"file": None, "embed": tensor("model.embed_tokens.weight", (V, H)), "norm": tensor("model.norm.weight", (H,)),
             "layers": layers, "lm_head": head, "tensors": tensors}
    if len(files) != 1:
        raise GlmrtError(f"{model_dir}: weights spread over {sorted(files)}; the engine reads one external data file")
    index["file"] = files.pop()
    linear = formats.pop()
    # the engine reads the embedding in bf16 exactly when the layers are bf16 (Formats.embed)
    if (tensors[index["embed"]].get("onnx") == "bfloat16") != (linear == "bf16"):
        raise GlmrtError(f"{model_dir}: the embedding is {tensors[index['embed']].get('onnx', 'float16')} and the "
                         f"layers {linear}; the engine reads a bf16 embedding with bf16 layers only")
    return index, linear, block
