"""The checkpoint reader and exporter refuse bad checkpoints with one-line errors naming the
file and key, and never leave a half-written model folder."""
import json
import shutil
import struct

import numpy as np
import pytest

from glmrt.errors import CheckpointError, GlmrtError
from glmrt.export.checkpoint import INDEX, Checkpoint, bf16_to_f32, f32_to_bf16
from glmrt.export.export import export_model
from glmrt.export.synthetic import write_safetensors


@pytest.fixture
def ckpt(checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint("tiny"), dst)
    return dst


def index(ckpt):
    return json.loads((ckpt / INDEX).read_text())


def rewrite_shard(ckpt, name, mutate):
    """Rewrite one shard after mutate(dict key -> (dtype, array float32)) changed it."""
    ck = Checkpoint(ckpt)
    shard = ck.shards[name]
    tensors = {k: (shard.entries[k][0], bf16_to_f32(shard.array(k)).copy()) for k in shard.entries}
    mutate(tensors)
    ck.shards.clear()
    write_safetensors(ckpt / name, {k: (d, a.shape) for k, (d, a) in tensors.items()},
                      lambda k: f32_to_bf16(tensors[k][1]))
    return tensors


def export_fails(ckpt, tmp_path, match):
    out = tmp_path / "out"
    with pytest.raises(GlmrtError, match=match) as e:
        export_model(ckpt, out, progress=False)
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))
    return e.value


def test_bf16_round_trip_is_exact_and_rounds_to_nearest_even():
    x = np.array([1.0, -2.5, 3.140625, 2.0 ** -100, 65536.0], np.float32)  # bf16-exact
    assert np.array_equal(bf16_to_f32(f32_to_bf16(x)), x)
    # 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0)
    assert bf16_to_f32(f32_to_bf16(np.array([1 + 2 ** -8], np.float32)))[0] == 1.0
    assert bf16_to_f32(f32_to_bf16(np.array([1 + 3 * 2 ** -8], np.float32)))[0] == 1 + 2 ** -6


def test_index_and_shards_agree(ckpt):
    ck = Checkpoint(ckpt)
    ck.check()
    assert len(ck.shards) == 2
    assert set(ck.where) == set(index(ckpt)["weight_map"])


def test_missing_tensor(ckpt, tmp_path):
    name = index(ckpt)["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    rewrite_shard(ckpt, name, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    idx = index(ckpt)
    del idx["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (ckpt / INDEX).write_text(json.dumps(idx))
    export_fails(ckpt, tmp_path, r"missing 1: model\.layers\.1\.mlp\.down_proj\.weight")


def test_extra_tensor(ckpt, tmp_path):
    name = index(ckpt)["weight_map"]["model.norm.weight"]
    rewrite_shard(ckpt, name, lambda t: t.__setitem__("model.extra.weight", ("BF16", np.ones(4, np.float32))))
    idx = index(ckpt)
    idx["weight_map"]["model.extra.weight"] = name
    (ckpt / INDEX).write_text(json.dumps(idx))
    export_fails(ckpt, tmp_path, r"unused 1: model\.extra\.weight")


def test_wrong_shape(ckpt, tmp_path):
    name = index(ckpt)["weight_map"]["model.norm.weight"]
    rewrite_shard(ckpt, name, lambda t: t.__setitem__("model.norm.weight", ("BF16", np.ones(65, np.float32))))
    export_fails(ckpt, tmp_path, r"'model\.norm\.weight' has shape \[65\], config\.json implies \[64\]")


def test_index_names_absent_shard(ckpt, tmp_path):
    idx = index(ckpt)
    idx["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    (ckpt / INDEX).write_text(json.dumps(idx))
    export_fails(ckpt, tmp_path, "names shard 'model-00009-of-00009.safetensors'")


def test_truncated_shard(ckpt, tmp_path):
    shard = ckpt / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    export_fails(ckpt, tmp_path, r"model-00002-of-00002.safetensors: tensor .* \(truncated file\?\)")


@pytest.mark.parametrize("header,match", [
    (struct.pack("<Q", 1 << 40), "header length 1099511627776 is past the end"),
    (struct.pack("<Q", 20) + b'{"a": {"dtype": 1}} ', "malformed header entry"),
    (struct.pack("<Q", 16) + b"[1, 2, 3]       ", "header is not an object"),
])
def test_lying_safetensors_header_is_refused(ckpt, tmp_path, header, match):
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(header)
    export_fails(ckpt, tmp_path, match)


def test_overlapping_tensors_are_refused(tmp_path):
    head = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    blob = json.dumps(head).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(12))
    from glmrt.export.checkpoint import Shard
    with pytest.raises(CheckpointError, match="'a' and 'b' overlap"):
        Shard(tmp_path / "x.safetensors")


def test_missing_tokenizer(ckpt, tmp_path):
    (ckpt / "tokenizer.json").unlink()
    export_fails(ckpt, tmp_path, "tokenizer.json: not found")


def test_export_never_leaves_a_partial_folder_when_interrupted(ckpt, tmp_path, monkeypatch):
    from glmrt.export import decoder
    calls = {"n": 0}
    real = decoder.Emitter.mlp

    def boom(self, i, h):
        calls["n"] += 1
        raise KeyboardInterrupt
    monkeypatch.setattr(decoder.Emitter, "mlp", boom)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_model(ckpt, out, progress=False)
    assert calls["n"] == 1 and not out.exists() and not list(tmp_path.glob(".out.partial*"))
    monkeypatch.setattr(decoder.Emitter, "mlp", real)
    assert (export_model(ckpt, out, progress=False) / "manifest.json").is_file()


def test_existing_output_is_not_replaced_without_overwrite(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(GlmrtError, match="already exists"):
        export_model(ckpt, out, progress=False)
