"""Shared fixtures: small GLM-4-0414 checkpoints made by the project (real layout, random bf16
weights) and their exports, built once per test session and cached by their parameters."""
from __future__ import annotations

import json

import pytest

from glmrt.export.export import export_model
from glmrt.export.synthetic import TINY, make_checkpoint

# name -> (size overrides, make_checkpoint keywords)
CHECKPOINTS = {
    "tiny": ({}, {}),
    "nobias-gqa4": ({"attention_bias": False, "num_attention_heads": 8, "num_key_value_heads": 2,
                     "head_dim": 8}, {"seed": 1}),
    "mha-5x": ({"num_key_value_heads": 4, "num_hidden_layers": 3}, {"seed": 2, "layout": "5.x"}),
    "mqa-yarn": ({"num_key_value_heads": 1, "max_position_embeddings": 4096},
                 {"seed": 3, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 512}}),
    "yarn-5x": ({}, {"seed": 4, "layout": "5.x",
                     "rope_scaling": {"type": "yarn", "factor": 2.0,
                                      "original_max_position_embeddings": 256}}),
    "z1": ({}, {"seed": 5, "template": "glm-z1", "template_in": "tokenizer_config"}),
    # dims that are multiples of 128 (TensorRT's int4 blocks), a gentler random gain
    "quant": ({"hidden_size": 128, "intermediate_size": 384, "head_dim": 32}, {"seed": 6, "scale": 1.0}),
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    made = {}

    def get(name: str = "tiny"):
        if name not in made:
            sizes, kw = CHECKPOINTS[name]
            made[name] = make_checkpoint(tmp_path_factory.mktemp("ckpt") / name, {**TINY, **sizes}, **kw)
        return made[name]
    return get


@pytest.fixture(scope="session")
def exported(tmp_path_factory, checkpoint):
    made = {}

    def get(name: str = "tiny", precision: str = "fp32", **options):
        key = (name, precision, tuple(sorted(options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("onnx") / f"{name}-{precision}"
            made[key] = export_model(checkpoint(name), out, precision=precision, progress=False,
                                     **options)
        return made[key]
    return get


@pytest.fixture(scope="session")
def model(exported):
    import glmrt
    loaded = {}

    def get(name: str = "tiny", precision: str = "fp32", **options):
        key = (name, precision, tuple(sorted(options.items())))
        if key not in loaded:
            loaded[key] = glmrt.load(exported(name, precision, **options))
        return loaded[key]
    return get


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))
