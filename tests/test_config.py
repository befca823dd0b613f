import json

import numpy as np
import pytest

from glmrt.config import OPTIONAL_DEFAULTS, GlmConfig
from glmrt.errors import ConfigError
from glmrt.export.synthetic import SHAPES, hf_config

EOS = [151329, 151336, 151338]


def test_both_config_layouts_give_the_same_config():
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    old = GlmConfig.from_hf(hf_config(SHAPES["glm-z1-9b"], EOS, 151329, "4.5x", rope_scaling=yarn))
    new = GlmConfig.from_hf(hf_config(SHAPES["glm-z1-9b"], EOS, 151329, "5.x", rope_scaling=yarn))
    assert old == new
    assert old.rope_type == "yarn" and old.rope_factor == 4.0 and old.rotary_dim == 64
    assert old.eos_token_id == tuple(EOS)


def test_optional_keys_take_transformers_defaults():
    transformers = pytest.importorskip("transformers")
    hf = transformers.Glm4Config()
    for key, value in OPTIONAL_DEFAULTS.items():
        if key in ("rope_theta", "partial_rotary_factor"):
            assert hf.rope_parameters[key] == value
        else:
            assert getattr(hf, key) == value, key
    raw = {"architectures": ["Glm4ForCausalLM"], "model_type": "glm4", "vocab_size": 100,
           "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4}
    cfg = GlmConfig.from_hf(raw)
    assert cfg.head_dim == 128 and cfg.num_key_value_heads == 2 and cfg.attention_bias is True
    assert cfg.rms_norm_eps == OPTIONAL_DEFAULTS["rms_norm_eps"]


@pytest.mark.parametrize("factor,orig", [(4.0, 32768), (2.0, 256), (8.0, 4096)])
def test_yarn_frequencies_match_transformers(factor, orig):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    raw = hf_config(SHAPES["glm-z1-9b"], EOS, 151329, "4.5x",
                    rope_scaling={"type": "yarn", "factor": factor, "original_max_position_embeddings": orig})
    inv, scale = GlmConfig.from_hf(raw).rope_inv_freq()
    hf_inv, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](transformers.Glm4Config(**raw), "cpu")
    np.testing.assert_allclose(inv, hf_inv.double().numpy(), rtol=1e-6)
    assert scale == pytest.approx(hf_scale)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model_type='llama'"),
    ({"hidden_size": None}, "missing required key(s) hidden_size"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_scaling": {"type": "longrope"}}, "rope type 'longrope'"),
    ({"num_hidden_layers": "40"}, "num_hidden_layers must be a positive integer"),
])
def test_bad_configs_name_the_key(tmp_path, change, message):
    raw = hf_config(SHAPES["tiny"], EOS, 151329)
    for k, v in change.items():
        if v is None:
            raw.pop(k)
        else:
            raw[k] = v
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        GlmConfig.from_file(tmp_path)
    assert message in str(e.value) and "config.json" in str(e.value)


def test_malformed_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        GlmConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GlmConfig.from_file(tmp_path)
