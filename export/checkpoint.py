"""Read a Hugging Face GLM-4-0414 checkpoint: config.json + sharded safetensors + index.

No torch and no safetensors package: the format is an 8-byte little-endian header length, a
JSON header {key: {dtype, shape, data_offsets: [begin, end]}}, then the data. Model files are
untrusted input, so every header is checked (size, offsets inside the file, no overlaps)
before anything is mapped, and tensors are memory-mapped, never read whole.

The weight map is total: `expected_tensors(cfg)` lists every key the config implies, and
`Checkpoint.check()` fails naming what is missing, unexpected, or of the wrong shape/dtype.
`take_raw(key)` marks a tensor used; `assert_all_taken()` fails if export left one unused.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from glmrt.config import GlmConfig
from glmrt.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024     # safetensors' own limit on the JSON header

# safetensors dtype -> (numpy storage dtype, bytes). bf16 is kept as raw uint16.
DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4)}


def expected_tensors(cfg: GlmConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor key a Glm4ForCausalLM checkpoint of this config holds, with its shape."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    t = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (H,)
        for n, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            t[p + f"self_attn.{n}_proj.weight"] = (out, H)
            if cfg.attention_bias:
                t[p + f"self_attn.{n}_proj.bias"] = (out,)
        t[p + "self_attn.o_proj.weight"] = (H, q_out)
        t[p + "post_self_attn_layernorm.weight"] = (H,)
        t[p + "post_attention_layernorm.weight"] = (H,)
        t[p + "mlp.gate_up_proj.weight"] = (2 * I, H)
        t[p + "mlp.down_proj.weight"] = (H, I)
        t[p + "post_mlp_layernorm.weight"] = (H,)
    t["model.norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (V, H)
    return t


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32, exactly: the bits become the high half of each word."""
    out = np.zeros(u16.shape, np.uint32)
    out.view(np.uint16).reshape(*u16.shape, 2)[..., 1 if np.little_endian else 0] = u16
    return out.view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bf16 bits (uint16); NaN stays NaN."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def convert(raw: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Checkpoint block (BF16 as uint16 / F16 / F32) -> numpy array holding dst's bytes."""
    if src == "BF16" and dst == "bfloat16":
        return np.ascontiguousarray(raw)
    f = bf16_to_f32(raw) if src == "BF16" else raw.astype(np.float32)
    if dst == "bfloat16":
        return f32_to_bf16(f)
    return f.astype(dst)


class Shard:
    """One safetensors file: header validated, data memory-mapped lazily."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{path}: header length {n} is past the end of the "
                                          f"file ({size} bytes) or over {MAX_HEADER}")
                header = json.loads(f.read(n).decode("utf-8"))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header is not an object")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        spans = []
        for key, e in header.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry") from None
            if dtype not in DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {dtype}; "
                                      f"expected one of {', '.join(DTYPES)}")
            if not all(isinstance(d, int) and d >= 0 for d in shape) or \
                    not (isinstance(begin, int) and isinstance(end, int)):
                raise CheckpointError(f"{path}: tensor {key!r} has a malformed shape or offsets")
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1]
            if not 0 <= begin <= end <= data_len or end - begin != nbytes:
                raise CheckpointError(
                    f"{path}: tensor {key!r} offsets [{begin}, {end}] do not fit its shape "
                    f"{list(shape)} {dtype} inside the {data_len} data bytes (truncated file?)")
            spans.append((begin, end, key))
            self.entries[key] = (dtype, shape, begin, end)
        spans.sort()
        for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(f"{path}: tensors {k0!r} and {k1!r} overlap")
    def array(self, key: str) -> np.ndarray:
        """A read-only view into the file (bf16 as uint16), mapped for this tensor alone: the
        mapping, and the pages it made resident, go away when the array is dropped, so the
        exporter's resident memory does not grow with the model."""
        dtype, shape, begin, end = self.entries[key]
        np_dtype = DTYPES[dtype][0]
        start = self.data_start + begin
        base = start - start % mmap.ALLOCATIONGRANULARITY
        if end == begin:
            return np.zeros(shape, np_dtype)
        with open(self.path, "rb") as f:
            m = mmap.mmap(f.fileno(), start + (end - begin) - base, access=mmap.ACCESS_READ, offset=base)
        return np.frombuffer(m, dtype=np_dtype, count=(end - begin) // np.dtype(np_dtype).itemsize,
                             offset=start - base).reshape(shape)


class Checkpoint:
    """A checkpoint folder. `cfg` from config.json; tensors by key across shards."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder")
        self.cfg = GlmConfig.from_file(self.folder / "config.json")
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                assert isinstance(weight_map, dict)
            except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
                raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
        elif (self.folder / SINGLE).is_file():
            weight_map = None
        else:
            raise CheckpointError(f"{self.folder}: neither {INDEX} nor {SINGLE} found")
        names = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self.shards = {}
        for name in names:
            p = self.folder / name
            if Path(name).name != name or not p.is_file():
                raise CheckpointError(f"{index}: names shard {name!r}, which is not in {self.folder}")
            self.shards[name] = Shard(p)
        self.where: dict[str, str] = {}
        for name, shard in self.shards.items():
            for key in shard.entries:
                if key in self.where:
                    raise CheckpointError(f"{self.folder}: tensor {key!r} is in both "
                                          f"{self.where[key]} and {name}")
                if weight_map is not None and weight_map.get(key) != name:
                    raise CheckpointError(f"{index}: tensor {key!r} is in shard {name} but the "
                                          f"index says {weight_map.get(key)!r}")
                self.where[key] = name
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(self.where))
            if lost:
                raise CheckpointError(f"{index}: lists {len(lost)} tensor(s) absent from their "
                                      f"shards, first {lost[0]!r}")
        self.taken: set[str] = set()

    def check(self) -> None:
        """Fail, naming them, on missing / unexpected keys or a wrong shape or dtype."""
        want = expected_tensors(self.cfg)
        missing = [k for k in want if k not in self.where]
        extra = [k for k in self.where if k not in want]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)}: {', '.join(missing[:5])}")
            if extra:
                parts.append(f"unused {len(extra)}: {', '.join(sorted(extra)[:5])}")
            raise CheckpointError(f"{self.folder}: tensors do not match config.json ("
                                  + "; ".join(parts) + ")")
        for key, shape in want.items():
            dtype, got, _, _ = self.shards[self.where[key]].entries[key]
            if got != shape:
                raise CheckpointError(f"{self.folder / self.where[key]}: tensor {key!r} has shape "
                                      f"{list(got)}, config.json implies {list(shape)}")

    def dtype(self, key: str) -> str:
        return self.shards[self.where[key]].entries[key][0]

    def raw(self, key: str) -> np.ndarray:
        """The mapped tensor as stored (bf16 as uint16), without marking it used."""
        if key not in self.where:
            raise CheckpointError(f"{self.folder}: tensor {key!r} not found")
        return self.shards[self.where[key]].array(key)

    def take_raw(self, key: str, reuse: bool = False) -> np.ndarray:
        """The mapped tensor as stored, marked used; using one twice is a bug unless `reuse`."""
        if key in self.taken and not reuse:
            raise CheckpointError(f"internal: tensor {key!r} used twice")
        a = self.raw(key)
        self.taken.add(key)
        return a

    def assert_all_taken(self) -> None:
        unused = sorted(set(self.where) - self.taken)
        if unused:
            raise CheckpointError(f"{self.folder}: export left {len(unused)} tensor(s) unused, "
                                  f"first {unused[0]!r}")

    def weights_f32(self) -> dict[str, np.ndarray]:
        """All tensors as float32 (tests and the reference only: loads the whole model)."""
        return {k: (bf16_to_f32(self.raw(k)) if self.dtype(k) == "BF16" else self.raw(k).astype(np.float32))
                for k in self.where}
