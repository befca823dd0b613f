"""GlmConfig: the one frozen description of a GLM-4-0414 model, read from config.json.

Every key is read by its exact name. Sizes are required (a silent default would make a
9B-shaped graph out of a tiny checkpoint); every other key takes the default transformers'
`Glm4Config` gives it (transformers 5.x, models/glm4/configuration_glm4.py), listed once in
OPTIONAL_DEFAULTS. Both on-disk RoPE layouts map to the same fields:
  transformers 4.5x: top-level rope_theta, partial_rotary_factor, rope_scaling, torch_dtype
  transformers 5.x:  rope_parameters {rope_type, rope_theta, partial_rotary_factor, ...}, dtype
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .errors import ConfigError

ARCHITECTURE = "Glm4ForCausalLM"
MODEL_TYPE = "glm4"

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")

# Defaults of transformers' Glm4Config for the keys a checkpoint may leave out.
OPTIONAL_DEFAULTS = {
    "num_key_value_heads": 2,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1.5625e-07,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "pad_token_id": 151329,
    "eos_token_id": [151329, 151336, 151338],
}

# YaRN keys (transformers' _compute_yarn_parameters); None = derived as transformers does.
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
                 "attention_factor": None, "mscale": None, "mscale_all_dim": None,
                 "original_max_position_embeddings": None}


@dataclasses.dataclass(frozen=True)
class GlmConfig:
    vocab_size: int
    hidden_size: int                 # H
    intermediate_size: int           # I (gate_up_proj is [2I, H])
    num_hidden_layers: int           # L
    num_attention_heads: int         # nh
    num_key_value_heads: int         # nkv (GQA group = nh // nkv)
    head_dim: int                    # hd
    max_position_embeddings: int
    rms_norm_eps: float
    attention_bias: bool             # bias on q, k, v (never on o_proj)
    tie_word_embeddings: bool
    rope_theta: float
    partial_rotary_factor: float     # rotary_dim = hd * factor, interleaved pairs
    rope_type: str                   # "default" or "yarn"
    rope_factor: float               # yarn only, else 1.0
    yarn: tuple                      # sorted (key, value) pairs of YARN_DEFAULTS, yarn only
    pad_token_id: int | None
    eos_token_id: tuple              # every id that ends a turn
    torch_dtype: str                 # dtype of the weights on disk as the config states it

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_file(cls, path: str | Path) -> "GlmConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return cls.from_hf(raw, source=str(path))

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> "GlmConfig":
        archs = raw.get("architectures")
        if raw.get("model_type") != MODEL_TYPE or (archs is not None and ARCHITECTURE not in archs):
            raise ConfigError(
                f"{source}: model_type={raw.get('model_type')!r} architectures={archs!r}; "
                f"glmrt supports {ARCHITECTURE} (model_type {MODEL_TYPE!r})")
        missing = [k for k in REQUIRED if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")

        def opt(key):
            return raw[key] if key in raw else OPTIONAL_DEFAULTS[key]

        if opt("hidden_act") != "silu":
            raise ConfigError(f"{source}: hidden_act={raw['hidden_act']!r}; GLM-4 uses 'silu'")

        # RoPE: rope_parameters (transformers 5) wins over the 4.5x top-level keys.
        rp = raw.get("rope_parameters")
        scaling = raw.get("rope_scaling")
        if rp is not None and not isinstance(rp, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object, got {rp!r}")
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object or null, got {scaling!r}")
        rope = dict(scaling or {})
        rope.update(rp or {})
        theta = rope.get("rope_theta", opt("rope_theta"))
        prf = rope.get("partial_rotary_factor", opt("partial_rotary_factor"))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported "
                              "(glmrt implements 'default' and 'yarn')")
        factor, yarn = 1.0, ()
        if rope_type == "yarn":
            if "factor" not in rope:
                raise ConfigError(f"{source}: rope type 'yarn' needs 'factor'")
            factor = float(rope["factor"])
            y = {k: rope.get(k, d) for k, d in YARN_DEFAULTS.items()}
            if y["original_max_position_embeddings"] is None:
                y["original_max_position_embeddings"] = opt("max_position_embeddings")
            yarn = tuple(sorted(y.items()))

        eos = opt("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (eos,)
        cfg = cls(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=opt("num_key_value_heads"), head_dim=opt("head_dim"),
            max_position_embeddings=opt("max_position_embeddings"),
            rms_norm_eps=float(opt("rms_norm_eps")), attention_bias=bool(opt("attention_bias")),
            tie_word_embeddings=bool(opt("tie_word_embeddings")),
            rope_theta=float(theta), partial_rotary_factor=float(prf), rope_type=rope_type,
            rope_factor=factor, yarn=yarn, pad_token_id=opt("pad_token_id"), eos_token_id=eos,
            torch_dtype=str(raw.get("dtype", raw.get("torch_dtype", "bfloat16"))),
        )
        cfg._validate(source)
        return cfg

    def _validate(self, source: str) -> None:
        for k in REQUIRED + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{source}: {k} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads={self.num_attention_heads} is not "
                              f"a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(f"{source}: partial_rotary_factor={self.partial_rotary_factor} gives "
                              f"rotary_dim {self.rotary_dim}; it must be even and within head_dim")
        if not all(isinstance(i, int) for i in self.eos_token_id):
            raise ConfigError(f"{source}: eos_token_id must be ints, got {self.eos_token_id!r}")

    def rope_inv_freq(self):
        """Inverse frequencies (rotary_dim/2,) float64 and the cos/sin scale, as transformers."""
        import numpy as np
        dim = self.rotary_dim
        base = self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        if self.rope_type == "default":
            return 1.0 / base, 1.0
        y = dict(self.yarn)
        factor = self.rope_factor
        attn = y["attention_factor"]
        if attn is None:
            def mscale(s, m=1.0):
                return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
            if y["mscale"] and y["mscale_all_dim"]:
                attn = mscale(factor, y["mscale"]) / mscale(factor, y["mscale_all_dim"])
            else:
                attn = mscale(factor)
        orig = y["original_max_position_embeddings"]

        def corr_dim(rot):
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(self.rope_theta))
        low, high = corr_dim(y["beta_fast"] or 32), corr_dim(y["beta_slow"] or 1)
        if y["truncate"]:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extra = 1.0 - ramp            # 1 where the frequency is kept (extrapolated)
        inv = (1.0 / (factor * base)) * (1 - extra) + (1.0 / base) * extra
        return inv, float(attn)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        d["yarn"] = dict(self.yarn)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GlmConfig":
        """Inverse of to_dict (the manifest's copy of the config)."""
        d = dict(d)
        d["eos_token_id"] = tuple(d["eos_token_id"])
        d["yarn"] = tuple(sorted(d["yarn"].items()))
        return cls(**d)
