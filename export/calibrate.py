"""Calibration for FP8 activation scales: run prompts through the unquantized model and record
the largest |value| entering every linear.

The pass runs the spec's own layer function (glmrt.reference.layer) in float32, one layer at a
time with only that layer's weights in memory, all prompts advancing together. An unquantized
ONNX Runtime session of GLM-Z1-9B would need ~38 GB (fp32) and 32B four times that; this
keeps calibration within the exporter's memory bound, with the same math the graph computes.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from glmrt import reference

from .checkpoint import Checkpoint, convert


def default_prompts(tokenizer_file: Path, count: int = 32, length: int = 64) -> list[list[int]]:
    """`count` fixed snippets of Python's own documentation (pydoc_data, shipped with Python),
    tokenized with the checkpoint's tokenizer and cut to `length` tokens."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_file))
    keys = sorted(topics)
    step = max(1, len(keys) // count)
    out = []
    for key in keys[::step][:count]:
        ids = tok.encode(topics[key], add_special_tokens=False).ids[:length]
        if ids:
            out.append(ids)
    return out


def activation_stats(ckpt: Checkpoint, prompts: list[list[int]], sample_rows: int = 0) -> dict:
    """{linear name (layers.3/attn/qkv_proj, ..., lm_head): {"amax": max |input|,
    "mean_abs": (K,) mean |input| per channel, "sample": (<=sample_rows, K) input rows}}."""
    cfg = ckpt.cfg
    stats: dict[str, dict] = {}
    rng = np.random.default_rng(0)

    def observe(name, x):
        s = stats.setdefault(name, {"amax": 0.0, "sum_abs": 0.0, "rows": 0, "sample": []})
        s["amax"] = max(s["amax"], float(np.abs(x).max()))
        s["sum_abs"] = s["sum_abs"] + np.abs(x).sum(0)
        s["rows"] += x.shape[0]
        if sample_rows:
            s["sample"].append(x[rng.permutation(x.shape[0])[:max(1, sample_rows // len(prompts))]])

    def w(key):
        return convert(ckpt.raw(key), ckpt.dtype(key), "float32")

    embed = ckpt.raw("model.embed_tokens.weight")
    src = ckpt.dtype("model.embed_tokens.weight")
    xs = [convert(embed[np.asarray(ids)], src, "float32") for ids in prompts]     # (seq, H) each
    for i in range(cfg.num_hidden_layers):
        layer_w = functools.lru_cache(maxsize=None)(w)     # this layer's weights, converted once
        xs = [reference.layer(cfg, layer_w, i, x, np.arange(x.shape[0]), observe=observe)[0]
              for x in xs]
    norm = w("model.norm.weight")
    for x in xs:     # lm_head's input is the final norm's output; its logits are not needed
        observe("lm_head", reference.rms_norm(x, norm, cfg.rms_norm_eps))
    return {name: {"amax": s["amax"], "mean_abs": s["sum_abs"] / s["rows"],
                   "sample": np.concatenate(s["sample"])[:sample_rows] if sample_rows else None}
            for name, s in stats.items()}


def activation_amax(ckpt: Checkpoint, prompts: list[list[int]]) -> dict[str, float]:
    """{linear name: max |input|} over all prompts (FP8's activation scales)."""
    return {name: s["amax"] for name, s in activation_stats(ckpt, prompts).items()}
