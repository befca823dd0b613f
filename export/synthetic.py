"""Make GLM-4-0414 checkpoints the project can test on: the real file layout (sharded bf16
safetensors + index, config.json, generation_config.json, byte-level BPE tokenizer.json with the
GLM special tokens, tokenizer_config.json, chat_template.jinja), random weights, small sizes.

`make_checkpoint(out, TINY)` is the embedded default; `SHAPES` also names the real GLM-Z1-9B
and GLM-4-32B shapes for benchmarks (weights are generated tensor by tensor, never all held).
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np

import glmrt
from glmrt import manifest
from glmrt.config import GlmConfig
from glmrt.errors import CheckpointError

from .checkpoint import INDEX, Checkpoint, expected_tensors, f32_to_bf16

# GLM-4-0414's special tokens, in id order after the regular vocabulary (151329.. in the real
# tokenizer; right after the tiny BPE vocabulary here). See docs/GLM4.md.
SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                  "<|user|>", "<|assistant|>", "<|observation|>", "<|begin_of_image|>",
                  "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"]
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
# The GLM-4 pre-tokenizer split (tiktoken cl100k-style), from the published tokenizer.json.
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

TINY_BPE_VOCAB = 1000
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=2048, attention_bias=True)
SHAPES = {
    "tiny": TINY,
    "glm-z1-9b": dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696,
                      num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
                      head_dim=128, max_position_embeddings=32768, attention_bias=True),
    "glm-4-32b": dict(vocab_size=151552, hidden_size=6144, intermediate_size=23040,
                      num_hidden_layers=61, num_attention_heads=48, num_key_value_heads=2,
                      head_dim=128, max_position_embeddings=32768, attention_bias=False),
}
TEMPLATES = Path(glmrt.__file__).resolve().parent / "templates"


def hf_config(sizes: dict, eos: list[int], pad: int, layout: str = "4.5x", **extra) -> dict:
    """A config.json as transformers 4.5x (GLM-4-0414 as published) or 5.x would save it."""
    c = {"architectures": ["Glm4ForCausalLM"], "model_type": "glm4", **sizes,
         "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
         "eos_token_id": eos, "pad_token_id": pad, "use_cache": True}
    rope = {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    scaling = extra.pop("rope_scaling", None)
    c.update(extra)
    if layout == "4.5x":
        c.update(rope, rope_scaling=scaling, torch_dtype="bfloat16", transformers_version="4.51.3")
    elif layout == "5.x":
        rp = {"rope_type": "default", **rope}
        if scaling:
            rp.update({k: v for k, v in scaling.items() if k != "type"}, rope_type=scaling["type"])
        c.update(rope_parameters=rp, dtype="bfloat16", transformers_version="5.0.0")
    else:
        raise ValueError(f"layout must be '4.5x' or '5.x', got {layout!r}")
    return c


def make_tokenizer(vocab: int = TINY_BPE_VOCAB, texts=None):
    """A byte-level BPE like GLM-4's, trained on Python's own docs (pydoc_data), deterministic."""
    from pydoc_data.topics import topics
    texts = [topics[k] for k in sorted(topics)] if texts is None else texts
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def write_tokenizer_files(folder: Path, tok, template: str = "glm4", template_in: str = "file",
                          max_length: int = 2048) -> None:
    """tokenizer.json, tokenizer_config.json and the chat template, laid out as the published
    checkpoints lay them out (template in its own file or in tokenizer_config.json)."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tok.save(str(folder / "tokenizer.json"))
    chat_template = (TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "model_max_length": max_length, "padding_side": "left",
            "do_lower_case": False, "remove_space": False,
            "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False,
                                              "rstrip": False, "normalized": False,
                                              "single_word": False} for t, i in ids.items()}}
    if template_in == "tokenizer_config":
        tcfg["chat_template"] = chat_template
    else:
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple]], produce) -> None:
    """Write a safetensors file; `produce(key)` returns each tensor's bytes in order."""
    size = {"BF16": 2, "F16": 2, "F32": 4}
    header, off = {}, 0
    for key, (dtype, shape) in tensors.items():
        n = int(np.prod(shape, dtype=np.int64)) * size[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key in tensors:
            data = produce(key)
            assert data.nbytes == header[key]["data_offsets"][1] - header[key]["data_offsets"][0]
            f.write(data.tobytes())


def random_tensor(key: str, shape: tuple, rng: np.random.Generator, scale: float) -> np.ndarray:
    """float32 weights: norms near 1, biases small, matrices ~ N(0, scale/sqrt(fan_in))."""
    if key.endswith("layernorm.weight") or key == "model.norm.weight":
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if key.endswith(".bias"):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if key == "model.embed_tokens.weight":
        return rng.standard_normal(shape, dtype=np.float32)
    return (rng.standard_normal(shape, dtype=np.float32) * (scale / np.sqrt(shape[1]))).astype(np.float32)


def make_checkpoint(out: str | Path, sizes: dict = TINY, *, seed: int = 0, shards: int = 2,
                    layout: str = "4.5x", scale: float = 2.0, template: str = "glm4",
                    rope_scaling: dict | None = None, template_in: str = "file",
                    overwrite: bool = False) -> Path:
    """Write a complete checkpoint folder with random bf16 weights. Returns the folder.
    An existing non-empty `out` is refused unless `overwrite`, and even then only when it
    holds nothing but the files this function writes.

    template: 'glm4' or 'glm-z1' (the reconstructions in glmrt/templates);
    template_in: 'file' (chat_template.jinja) or 'tokenizer_config' (its chat_template key)."""
    out = Path(out)
    manifest.check_output(out, overwrite=overwrite, owned=lambda folder: _checkpoint_file,
                          what="glmrt tiny", empty_ok=True)
    tok = make_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if max(ids.values()) >= sizes["vocab_size"]:
        raise ValueError(f"vocab_size {sizes['vocab_size']} is smaller than the tokenizer's "
                         f"{max(ids.values()) + 1} tokens")
    with manifest.staged(out) as tmp:
        _write_checkpoint(tmp, tok, ids, sizes, seed, shards, layout, scale, template, rope_scaling,
                          template_in)
    return out


def _write_checkpoint(tmp: Path, tok, ids: dict, sizes: dict, seed: int, shards: int, layout: str,
                      scale: float, template: str, rope_scaling: dict | None, template_in: str) -> None:
    eos = [ids[t] for t in STOP_TOKENS]
    extra = {"rope_scaling": rope_scaling} if rope_scaling else {}
    raw_cfg = hf_config(sizes, eos, ids["<|endoftext|>"], layout, **extra)
    (tmp / "config.json").write_text(json.dumps(raw_cfg, indent=2))
    cfg = GlmConfig.from_hf(raw_cfg)
    (tmp / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"], "do_sample": True,
         "temperature": 0.6, "top_p": 0.95, "top_k": 40}, indent=2))

    write_tokenizer_files(tmp, tok, template, template_in, sizes["max_position_embeddings"])

    # weights: bf16, split into `shards` files by layer, streamed tensor by tensor
    want = expected_tensors(cfg)
    keys = list(want)
    per = -(-len(keys) // shards)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for s in range(shards):
        part = keys[s * per:(s + 1) * per]
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(tmp / name, {k: ("BF16", want[k]) for k in part},
                          lambda k: f32_to_bf16(random_tensor(k, want[k], rng, scale)))
        for k in part:
            weight_map[k] = name
            total += 2 * int(np.prod(want[k]))
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": weight_map}, indent=2))


CHECKPOINT_FILE = re.compile(r"config\.json|generation_config\.json|tokenizer(_config)?\.json|"
                             r"chat_template\.jinja|model\.safetensors\.index\.json|"
                             r"model-\d{5}-of-\d{5}\.safetensors")


def _checkpoint_file(rel: str) -> bool:
    """The files make_checkpoint writes (what `glmrt tiny --overwrite` may replace)."""
    return CHECKPOINT_FILE.fullmatch(rel) is not None


class SyntheticCheckpoint(Checkpoint):
    """A checkpoint of a named shape whose bf16 weights are made on the fly as the exporter
    asks for them (nothing on disk but config and tokenizer files): for sizing a deployment
    and benchmarking before downloading a model. Random, never zeros; deterministic per seed.

    Each tensor is a strided read-only view into a pool of random bf16 values of its own
    scale (rows start a few values apart), so a 32B model costs neither 32B random draws nor
    memory: like a mapped checkpoint, only the chunk being converted is materialized."""

    POOL = 1 << 22

    def __init__(self, folder: str | Path, shape: str, *, layers: int | None = None, seed: int = 0,
                 scale: float = 2.0):
        if shape not in SHAPES:
            raise CheckpointError(f"synthetic shape {shape!r} is not one of {', '.join(SHAPES)}")
        sizes = dict(SHAPES[shape])
        if layers is not None:
            sizes["num_hidden_layers"] = layers
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tok = make_tokenizer()
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        raw_cfg = hf_config(sizes, [ids[t] for t in STOP_TOKENS], ids["<|endoftext|>"])
        (folder / "config.json").write_text(json.dumps(raw_cfg, indent=2))
        write_tokenizer_files(folder, tok, "glm4", "file", sizes["max_position_embeddings"])
        self.folder = folder
        self.cfg = GlmConfig.from_hf(raw_cfg, source=f"synthetic:{shape}")
        self.shapes = expected_tensors(self.cfg)
        self.where = {k: "synthetic" for k in self.shapes}
        self.taken: set[str] = set()
        self.seed, self.scale = seed, scale
        self.pools: dict = {}

    def check(self) -> None:
        pass

    def dtype(self, key: str) -> str:
        return "BF16"

    def raw(self, key: str) -> np.ndarray:
        if key not in self.shapes:
            raise CheckpointError(f"synthetic checkpoint has no tensor {key!r}")
        shape = self.shapes[key]
        kind = ("norm" if key.endswith("norm.weight") else "bias" if key.endswith(".bias")
                else "embed" if key == "model.embed_tokens.weight" else shape[1])
        if kind not in self.pools:
            rng = np.random.default_rng([self.seed, zlib_hash(str(kind))])
            proto = {"norm": (1.0, 0.1), "bias": (0.0, 0.1), "embed": (0.0, 1.0)}
            mean, std = proto.get(kind, (0.0, self.scale / np.sqrt(kind) if isinstance(kind, int) else 1.0))
            self.pools[kind] = f32_to_bf16(mean + std * rng.standard_normal(self.POOL, dtype=np.float32))
        pool = self.pools[kind]
        if len(shape) == 1:
            start = zlib_hash(key) % (self.POOL - shape[0])
            return pool[start:start + shape[0]]
        rows, cols = shape
        step = max(1, (self.POOL - cols) // max(rows - 1, 1))        # rows overlap, shifted
        start = zlib_hash(key) % max(1, self.POOL - cols - (rows - 1) * step)
        view = np.lib.stride_tricks.as_strided(pool[start:], shape=(rows, cols),
                                               strides=(step * pool.itemsize, pool.itemsize))
        view.flags.writeable = False
        return view


def zlib_hash(text: str) -> int:
    import zlib
    return zlib.crc32(text.encode())
