"""Misuse and damage, one row each: the command exits 2 with one line naming the problem and
its file/key/value, no traceback from inside a dependency, and nothing half-written."""
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import glmrt
from glmrt.errors import InputError
from glmrt.export.checkpoint import INDEX


def cli(*args, input=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "glmrt.cli", *map(str, args)], capture_output=True,
                          text=True, input=input, timeout=timeout)


def assert_clean_error(p, *needles):
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _index(ck):
    return json.loads((ck / INDEX).read_text())


def _shard_of(ck, key):
    return ck / _index(ck)["weight_map"][key]


def break_config_missing(ck): (ck / "config.json").unlink(); return "config.json: config.json not found"
def break_config_malformed(ck): (ck / "config.json").write_text("{"); return "config.json: not valid JSON"
def break_architecture(ck):
    c = json.loads((ck / "config.json").read_text()); c["model_type"] = "qwen2"; c["architectures"] = ["Qwen2ForCausalLM"]
    (ck / "config.json").write_text(json.dumps(c)); return "model_type='qwen2'"
def break_required_key(ck):
    c = json.loads((ck / "config.json").read_text()); del c["num_attention_heads"]
    (ck / "config.json").write_text(json.dumps(c)); return "missing required key(s) num_attention_heads"
def break_absent_shard(ck): _shard_of(ck, "model.norm.weight").unlink(); return "which is not in"
def break_truncated_shard(ck):
    p = _shard_of(ck, "lm_head.weight"); p.write_bytes(p.read_bytes()[:-10]); return "(truncated file?)"
def break_wrong_dtype(ck):
    p = _shard_of(ck, "model.norm.weight")
    raw = p.read_bytes(); n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n]); head["model.norm.weight"]["dtype"] = "I8"
    blob = json.dumps(head).encode(); blob += b" " * (-len(blob) % 8)
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:]); return "'model.norm.weight' has dtype I8"
def break_missing_tensor(ck):
    idx = _index(ck); del idx["weight_map"]["model.layers.0.mlp.down_proj.weight"]
    (ck / INDEX).write_text(json.dumps(idx)); return "is in shard"
def break_tokenizer(ck): (ck / "tokenizer.json").unlink(); return "tokenizer.json: not found"
def break_header_size(ck):
    p = _shard_of(ck, "model.norm.weight"); p.write_bytes(struct.pack("<Q", 2 ** 62) + p.read_bytes()[8:])
    return "past the end of the file"
def break_offsets(ck):
    p = _shard_of(ck, "model.norm.weight")
    raw = p.read_bytes(); n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n]); head["model.norm.weight"]["data_offsets"] = [10 ** 12, 10 ** 12 + 128]
    blob = json.dumps(head).encode(); blob += b" " * (-len(blob) % 8)
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:]); return "do not fit its shape"


@pytest.mark.parametrize("breaker", [break_config_missing, break_config_malformed, break_architecture,
                                     break_required_key, break_absent_shard, break_truncated_shard,
                                     break_wrong_dtype, break_missing_tensor, break_tokenizer,
                                     break_header_size, break_offsets], ids=lambda f: f.__name__[6:])
def test_bad_checkpoints(checkpoint, tmp_path, breaker):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint("tiny"), ck)
    needle = breaker(ck)
    p = cli("export", ck, "-o", tmp_path / "out")
    assert_clean_error(p, needle)
    assert sorted(os.listdir(tmp_path)) == ["ck"]                 # nothing written


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_export_leaves_nothing_and_a_rerun_succeeds(tmp_path, sig):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "glmrt.cli", "export", "synthetic:glm-z1-9b:1", "-o", str(out),
                          "--precision", "int4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any(".partial" in n for n in os.listdir(tmp_path)):
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(sig)
    p.wait(60)
    assert p.returncode != 0
    assert os.listdir(tmp_path) == []                             # no folder that looks complete
    q = cli("export", "synthetic:tiny", "-o", out)
    assert q.returncode == 0 and (out / "manifest.json").is_file()


def test_disk_full_during_export(checkpoint, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from glmrt.cli import main
    from glmrt.export import onnx_builder

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".out.partial" / "model.onnx.data"))
    monkeypatch.setattr(onnx_builder.WeightFile, "add_blocks", full)
    r = CliRunner().invoke(main, ["export", str(checkpoint("tiny")), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "No space left on device" in r.output and "model.onnx.data" in r.output
    assert os.listdir(tmp_path) == []


@pytest.fixture
def model_copy(exported, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(exported("tiny"), dst)
    return dst


def test_missing_graph(model_copy):
    (model_copy / "model.onnx").unlink()
    assert_clean_error(cli("chat", model_copy, "--prompt", "x"), "model.onnx: listed in the manifest but missing")


def test_corrupted_weights_are_caught_by_checksum_unless_skipped(model_copy):
    data = model_copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert_clean_error(cli("chat", model_copy, "--prompt", "x"), "model.onnx.data: checksum does not match")
    assert cli("chat", model_copy, "--prompt", "x", "--no-verify", "--max-new-tokens", "2").returncode == 0


def test_truncated_weights(model_copy):
    data = model_copy / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    assert_clean_error(cli("info", model_copy), "model.onnx.data: 100 bytes, the manifest says")


def test_manifest_from_a_newer_glmrt(model_copy):
    m = json.loads((model_copy / "manifest.json").read_text())
    m["format"] = 99
    (model_copy / "manifest.json").write_text(json.dumps(m))
    assert_clean_error(cli("info", model_copy), "manifest format 99 is newer", "upgrade glmrt")


def test_prompt_longer_than_context(model):
    m = model()
    long = "word " * (m.max_context + 10)
    with pytest.raises(InputError, match="longer than the model's context"):
        m.chat([{"role": "user", "content": long}], max_new_tokens=2)
    # truncation only when asked: the oldest turns go, the last question stays
    msgs = [{"role": "system", "content": "S"}] + \
        [{"role": r, "content": "word " * 300} for r in ("user", "assistant") * 6] + [{"role": "user", "content": "last"}]
    with pytest.raises(InputError):
        m.chat(msgs, max_new_tokens=2)
    ids = m.prompt_ids(msgs, truncate=True, room=2)
    assert len(ids) + 2 <= m.max_context
    assert m.tokenizer.decode(ids, skip_special=False).endswith("<|user|>\nlast<|assistant|>")
    assert m.chat(msgs, max_new_tokens=2, truncate=True)["role"] == "assistant"
    assert len(m.generate([5] * (m.max_context + 50), max_new_tokens=3, truncate=True)) <= 1


def test_empty_and_invalid_messages(model):
    m = model()
    for bad, match in [([], "non-empty"), ([{"role": "user", "content": "\udcff"}], "not valid UTF-8"),
                       ([{"role": "robot", "content": "x"}], "role is 'robot'"),
                       ([{"role": "user", "content": b"x"}], "must be a string")]:
        with pytest.raises(InputError, match=match):
            m.chat(bad, max_new_tokens=1)


def test_special_token_text_typed_by_a_user_stays_text(model):
    m = model()
    typed = "hello <|assistant|> [gMASK] <|observation|> bye"
    ids = m.prompt_ids([{"role": "user", "content": typed}])
    tok = m.tokenizer
    controls = [tok.id_of(t) for t in ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>")]
    # exactly the template's own markers are control tokens: [gMASK] <sop> <|user|> ... <|assistant|>
    assert [i for i in ids if i in tok.special_ids] == controls
    assert tok.decode(ids, skip_special=False) == m.render_prompt([{"role": "user", "content": typed}])


def test_max_new_tokens_beyond_the_context_is_capped(model):
    m = model()
    res = glmrt.model.Generation([])
    out = list(m.stream([5] * (m.max_context - 4), max_new_tokens=10 ** 6, result=res))
    assert len(out) <= 4 and res.finish_reason in ("length", "stop")


def test_ctrl_c_during_chat_keeps_the_conversation(exported, monkeypatch):
    """The interrupted reply is kept as written so far; the next turn sees the whole history."""
    from click.testing import CliRunner

    from glmrt.cli import main
    from glmrt.model import Delta, Model
    seen = []
    real = Model.chat_stream

    def stream(self, messages, tools=None, **kw):
        seen.append([dict(x) for x in messages])
        if len(seen) == 1:
            yield Delta("content", "partial ")
            raise KeyboardInterrupt
        yield from real(self, messages, tools, **kw)
    monkeypatch.setattr(Model, "chat_stream", stream)
    r = CliRunner().invoke(main, ["chat", str(exported()), "--max-new-tokens", "3"], input="one\ntwo\n\n")
    assert r.exit_code == 0 and "[interrupted]" in r.output and r.output.count("> ") == 3
    assert seen[1] == [{"role": "user", "content": "one"}, {"role": "assistant", "content": "partial "},
                       {"role": "user", "content": "two"}]


def test_bad_sampling_flag_in_cli(exported):
    assert_clean_error(cli("chat", exported(), "--prompt", "x", "--top-p", "0"), "top_p=0.0")


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40) | \
    st.sampled_from(["<|user|>", "[gMASK]<sop>", "</think>", "get_weather\n{", "", "\n"])
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "observation", "tool", "x"]),
                                           "content": texts | st.none() | st.integers()}), max_size=5)
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 10 ** 6) | st.none() | st.text(max_size=2)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=messages, temperature=numbers, top_p=numbers, top_k=numbers, rep=numbers, seed=numbers,
       max_new=numbers)
def test_fuzz_only_clear_errors_escape(model, msgs, temperature, top_p, top_k, rep, seed, max_new):
    m = model()
    try:
        reply = m.chat(msgs, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=rep,
                       seed=seed, max_new_tokens=max_new if not isinstance(max_new, int) else max_new % 4)
    except InputError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert reply["role"] == "assistant" and isinstance(reply["content"], str)
