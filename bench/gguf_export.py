"""A glmrt-made (or any Hugging Face) GLM-4-0414 checkpoint folder -> an F16 GGUF that
llama.cpp loads as its `glm4` architecture; Q4_0 / Q8_0 made from it by llama.cpp's own
quantizer. Written with the `gguf` package's writer, streamed tensor by tensor.

    pip install gguf llama-cpp-python      # not in glmrt's extras: llama-cpp-python builds llama.cpp
    python3 bench/gguf_export.py CHECKPOINT -o model-f16.gguf --quantize q4_0 q8_0

What llama.cpp expects (read from llama.cpp's sources as vendored by llama-cpp-python 0.3.36:
src/models/glm4.cpp, src/llama-model.cpp, src/llama-vocab.cpp, src/llama-quant.cpp,
gguf-py/gguf/constants.py and tensor_mapping.py), restated here:

- Tensors keep the checkpoint's [out, in] row-major layout (ggml's ne = reversed shape), one
  GGUF tensor per checkpoint tensor, named by the table TENSORS below. The fused
  `mlp.gate_up_proj` [2I, H] is stored whole as `ffn_up` (llama.cpp declares it {H, 2I} and
  runs LLM_FFN_SWIGLU on it, which splits it in halves, the first half the gate: the
  checkpoint's order). q/k/v stay separate tensors with their biases.
- No q/k row permutation: llama.cpp ropes GLM4 with LLAMA_ROPE_TYPE_NORM (adjacent pairs
  (2i, 2i+1), GPT-J style), which is GLM's interleaved rotary; over the first
  `rope.dimension_count` = head_dim * partial_rotary_factor dims of each head. (Its converter
  permutes q/k only for the M-RoPE vision variants, which need the NeoX kernel.)
- 2-D weights F16, 1-D tensors (norms, biases) F32, as llama.cpp's converter writes them.
- Metadata under `glm4.`: block_count, context_length, embedding_length, feed_forward_length
  (I, not 2I), attention.head_count / head_count_kv / key_length / value_length (head_dim),
  attention.layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count, YaRN keys when
  the config asks for YaRN.
- Tokenizer: `gpt2` (byte-level BPE) with the token strings, types and merges of
  tokenizer.json; ids the tokenizer does not fill up to vocab_size become "[PAD<id>]" of type
  UNUSED. Pre-tokenizer `glm4` (llama.cpp's LLAMA_VOCAB_PRE_TYPE_CHATGLM4 regex, BPE with
  ignore_merges, as GLM-4's published tokenizer maps to) or `chatglm-bpe` (the same regex,
  merges always applied), chosen by tokenizer.json's own `ignore_merges`. eos, bos and unk are
  <|endoftext|>, eot <|user|> (what llama.cpp's converter sets for GLM4), pad from config.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from glmrt.config import GlmConfig
from glmrt.export.checkpoint import Checkpoint, bf16_to_f32
from glmrt.export.synthetic import SPLIT_REGEX

ARCH = "glm4"

# checkpoint key (with {i} for the layer) -> GGUF tensor name: one row per tensor, total
TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_self_attn_layernorm.weight": "blk.{i}.post_attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",   # the pre-MLP norm
    "model.layers.{i}.mlp.gate_up_proj.weight": "blk.{i}.ffn_up.weight",            # [gate; up] fused
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.layers.{i}.post_mlp_layernorm.weight": "blk.{i}.post_ffw_norm.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# llama.cpp's regex for LLAMA_VOCAB_PRE_TYPE_CHATGLM4 is GLM-4's split with (?i:...) spelled out
GLM4_SPLIT = SPLIT_REGEX
QUANT_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
               "f16": "LLAMA_FTYPE_MOSTLY_F16"}


def gguf_name(key: str) -> str:
    """The GGUF name of a checkpoint key (KeyError for a key the table does not know)."""
    parts = key.split(".")
    if key.startswith("model.layers."):
        i = parts[2]
        return TENSORS[".".join(parts[:2] + ["{i}"] + parts[3:])].replace("{i}", i)
    return TENSORS[key]


def write_gguf(checkpoint: str | Path, out: str | Path, *, name: str | None = None) -> Path:
    """Write the F16 GGUF of `checkpoint` to `out` (replaced if present). Returns `out`."""
    import gguf
    ckpt = Checkpoint(checkpoint)
    ckpt.check()
    cfg = ckpt.cfg
    if cfg.tie_word_embeddings:
        raise ValueError("tied embeddings: GLM-4-0414 has none and this converter writes output.weight")
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(tmp, ARCH)
    w.add_name(name or Path(checkpoint).resolve().name)
    _add_hparams(w, cfg)
    _add_tokenizer(w, Path(checkpoint), cfg)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    keys = list(ckpt.where)
    order = sorted(keys, key=_key_order)
    for key in order:
        shape = ckpt.raw(key).shape
        dtype = np.float16 if len(shape) == 2 else np.float32
        w.add_tensor_info(gguf_name(key), shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for key in order:
        w.write_tensor_data(_as_float(ckpt, key))
    w.close()
    ckpt.assert_all_taken()
    os.replace(tmp, out)
    return out


def _key_order(key: str):
    """token_embd first, layers in order, then the output norm and head (the converter's order)."""
    if key.startswith("model.layers."):
        return (1, int(key.split(".")[2]), key)
    return (0 if "embed" in key else 2, 0, key)


def _as_float(ckpt: Checkpoint, key: str) -> np.ndarray:
    """One tensor as F16 (2-D) or F32 (1-D), read in row blocks so a 151552-row matrix never
    sits in memory as float32. bf16 -> f16 is exact for |x| in [6.1e-5, 65504]."""
    raw = ckpt.take_raw(key)
    src = ckpt.dtype(key)

    def f32(block):
        return bf16_to_f32(np.asarray(block)) if src == "BF16" else np.asarray(block, np.float32)
    if raw.ndim == 1:
        return f32(raw)
    out = np.empty(raw.shape, np.float16)
    step = max(1, (1 << 24) // raw.shape[1])
    for r in range(0, raw.shape[0], step):
        block = f32(raw[r:r + step])
        if np.abs(block).max(initial=0) > 65504:
            raise ValueError(f"{key}: values beyond float16's range; an F16 GGUF cannot hold them")
        out[r:r + step] = block
    return out


def _add_hparams(w, cfg: GlmConfig) -> None:
    import gguf
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.rotary_dim)
    if cfg.rope_type == "yarn":
        y = dict(cfg.yarn)
        if y["attention_factor"] is not None or y["mscale"] or y["mscale_all_dim"] or not y["truncate"]:
            raise ValueError("YaRN with attention_factor / mscale / truncate=false: llama.cpp derives "
                             "its own attention factor (0.1 ln(factor) + 1); this converter writes only "
                             "the default form")
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.rope_factor)
        w.add_rope_scaling_orig_ctx_len(int(y["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(y["beta_fast"]))
        w.add_rope_scaling_yarn_beta_slow(float(y["beta_slow"]))


def _add_tokenizer(w, folder: Path, cfg: GlmConfig) -> None:
    """Byte-level BPE from tokenizer.json: tokens, types, merges, special ids, chat template."""
    import gguf
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json: model type {model.get('type')!r}, expected BPE")
    split = _split_regex(tj.get("pre_tokenizer"))
    if split != GLM4_SPLIT:
        raise ValueError(f"tokenizer.json: pre-tokenizer split {split!r} is not GLM-4's; llama.cpp's "
                         "glm4 / chatglm-bpe pre-tokenizer would tokenize differently")
    pre = "glm4" if model.get("ignore_merges") else "chatglm-bpe"

    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    by_id = {i: s for s, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= cfg.vocab_size:
        raise ValueError(f"tokenizer has id {max(by_id)}, config.json's vocab_size is {cfg.vocab_size}")
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    special = {t["content"]: i for i, t in added.items()}
    for needed in ("<|endoftext|>", "<|user|>"):
        if needed not in special:
            raise ValueError(f"tokenizer.json has no {needed} special token (GLM-4's end markers)")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(special["<|endoftext|>"])
    w.add_bos_token_id(special["<|endoftext|>"])
    w.add_unk_token_id(special["<|endoftext|>"])
    w.add_eot_token_id(special["<|user|>"])
    if cfg.pad_token_id is not None:
        w.add_pad_token_id(cfg.pad_token_id)
    template = _chat_template(folder)
    if template:
        w.add_chat_template(template)
    gen = folder / "generation_config.json"      # the model card's sampling, as llama.cpp's converter
    if gen.is_file():
        g = json.loads(gen.read_text(encoding="utf-8"))
        for key, add in (("temperature", w.add_sampling_temp), ("top_p", w.add_sampling_top_p),
                         ("top_k", w.add_sampling_top_k)):
            if g.get(key) is not None:
                add(g[key])


def _split_regex(pre) -> str | None:
    """The Split regex of a Sequence[Split, ByteLevel] pre-tokenizer (GLM-4's form), else None."""
    if not pre:
        return None
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for p in parts:
        if p.get("type") == "Split":
            return p.get("pattern", {}).get("Regex")
    return None


def _chat_template(folder: Path) -> str | None:
    f = folder / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        return json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
    return None


def quantize(src: str | Path, dst: str | Path, kind: str, *, threads: int | None = None,
             verbose: bool = False) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize with its default parameters: for Q4_0 it
    keeps output.weight at Q6_K, token_embd at Q4_0; 1-D tensors stay F32). Its per-tensor log
    goes through llama-cpp-python's logger, shown only when `verbose`."""
    import logging
    import llama_cpp
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[kind])
    params.nthread = threads or 0
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> {kind}) returned {rc}")
    os.replace(tmp, dst)
    return dst


def tensor_types(path: str | Path) -> dict[str, dict]:
    """What a GGUF holds: {ggml type: {tensors, bytes}}, and which type output / token_embd got."""
    import gguf
    r = gguf.GGUFReader(str(path))
    out: dict = {}
    roles = {}
    for t in r.tensors:
        d = out.setdefault(t.tensor_type.name, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += int(t.n_bytes)
        if t.name in ("output.weight", "token_embd.weight"):
            roles[t.name] = t.tensor_type.name
    return {"types": out, "roles": roles, "file_bytes": Path(path).stat().st_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("-o", "--out", required=True, help="the F16 GGUF to write")
    ap.add_argument("--quantize", nargs="*", default=[], choices=["q4_0", "q8_0"],
                    help="also write OUT with -q4_0 / -q8_0 in place of -f16 (or appended)")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    f16 = write_gguf(args.checkpoint, args.out)
    print(f"wrote {f16} ({f16.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t:.1f} s)")
    for kind in args.quantize:
        dst = quantized_path(f16, kind)
        t = time.perf_counter()
        quantize(f16, dst, kind)
        print(f"wrote {dst} ({dst.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t:.1f} s)")
    return 0


def quantized_path(f16: Path, kind: str) -> Path:
    stem = f16.stem[:-4] if f16.stem.lower().endswith("-f16") else f16.stem
    return f16.with_name(f"{stem}-{kind}.gguf")


if __name__ == "__main__":
    sys.exit(main())
