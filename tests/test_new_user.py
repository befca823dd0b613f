"""What a new user hits first, through the CLI as they would run it: outputs that could destroy
a checkpoint or a user's files are refused (exit 2, one line, the source untouched byte for
byte), empty or impossible requests get one clear line, and the chat says what it is doing."""
import hashlib
import json
import subprocess
import sys
import warnings

import pytest
from click.testing import CliRunner

import glmrt
from glmrt.cli import main
from glmrt.errors import TruncationWarning


def cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "glmrt.cli", *map(str, args)], capture_output=True,
                          text=True, input=input, timeout=300)


def snapshot(folder):
    """{relative path: sha256} of every file below folder."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(p, *needles):
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


@pytest.fixture
def ckpt(tmp_path, checkpoint):
    import shutil
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint(), dst)
    return dst


@pytest.mark.parametrize("where", ["itself", "inside", "parent"])
def test_export_never_writes_over_its_source(ckpt, where):
    out = {"itself": ckpt, "inside": ckpt / "onnx", "parent": ckpt.parent}[where]
    before = snapshot(ckpt.parent)
    p = cli("export", ckpt, "-o", out, "--overwrite")
    assert_refused(p, "the source", {"itself": "is", "inside": "lies inside", "parent": "contains"}[where])
    assert snapshot(ckpt.parent) == before


def test_export_overwrite_replaces_only_its_own_folders(ckpt, tmp_path):
    # a folder that glmrt did not write: refused even with --overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    before = snapshot(mine)
    assert_refused(cli("export", ckpt, "-o", mine, "--overwrite"), "not a folder glmrt export wrote")
    assert snapshot(mine) == before
    # a model folder glmrt wrote, with a user's file added: refused, naming the file
    out = tmp_path / "onnx"
    assert cli("export", ckpt, "-o", out).returncode == 0
    (out / "my-eval.txt").write_text("keep me")
    before = snapshot(out)
    assert_refused(cli("export", ckpt, "-o", out), "already exists", "--overwrite")
    assert_refused(cli("export", ckpt, "-o", out, "--overwrite"), "my-eval.txt", "did not write")
    assert snapshot(out) == before
    # its own folder, untouched by anyone: replaced; an empty folder: used
    (out / "my-eval.txt").unlink()
    assert cli("export", ckpt, "-o", out, "--overwrite").returncode == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(cli("export", ckpt, "-o", empty), "already exists")
    assert cli("export", ckpt, "-o", empty, "--overwrite").returncode == 0 and (empty / "manifest.json").is_file()
    # a file where the folder should go
    f = tmp_path / "file"
    f.write_text("x")
    assert_refused(cli("export", ckpt, "-o", f, "--overwrite"), "not a folder")
    assert f.read_text() == "x"


def test_tiny_refuses_existing_folders_and_replaces_only_its_own(tmp_path, exported):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(exported(), model)
    (model / "mine.txt").write_text("user file")
    before = snapshot(model)
    assert_refused(cli("tiny", model), "already exists")
    assert_refused(cli("tiny", model, "--overwrite"), "did not write")
    assert snapshot(model) == before
    ck = tmp_path / "ck"
    assert cli("tiny", ck).returncode == 0
    assert_refused(cli("tiny", ck), "already exists", "--overwrite")
    old = snapshot(ck)
    r = cli("tiny", ck, "--overwrite", "--seed", "1")
    assert r.returncode == 0 and snapshot(ck) != old and set(snapshot(ck)) == set(old)
    (ck / "extra.bin").write_bytes(b"1")
    before = snapshot(ck)
    assert_refused(cli("tiny", ck, "--overwrite"), "extra.bin")
    assert snapshot(ck) == before


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_refused(exported, prompt):
    assert_refused(cli("chat", exported(), "--prompt", prompt), "--prompt is empty")


def test_max_new_tokens_zero_is_refused(exported):
    assert_refused(cli("chat", exported(), "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens 0")


def test_too_long_prompt_names_the_cli_flag_and_truncate_cuts_one_huge_message(exported, model):
    m = model()
    long = "word " * (m.max_context + 100)
    p = cli("chat", exported(), "--prompt", long, "--max-new-tokens", "2")
    assert_refused(p, "--truncate")
    assert "truncate=True" not in p.stderr
    p = cli("chat", exported(), "--prompt", long, "--max-new-tokens", "2", "--truncate")
    assert p.returncode == 0, p.stderr
    assert "the last message was cut to its newest" in p.stderr
    # the API: the newest tokens of the one message stay, and it says so
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = m.prompt_ids([{"role": "user", "content": "first " + "word " * m.max_context + "LAST"}],
                           truncate=True, room=8)
    assert len(ids) + 8 <= m.max_context
    text = m.tokenizer.decode(ids, skip_special=False)
    assert text.endswith("LAST<|assistant|>") and "first" not in text
    assert any(issubclass(w.category, TruncationWarning) for w in caught)


def test_chat_says_what_it_is_and_when_a_reply_was_cut(exported):
    p = cli("chat", exported(), "--max-new-tokens", "3", input="hello\n\n")
    assert p.returncode == 0
    head = p.stderr.splitlines()[0]
    assert "glmrt chat:" in head and "fp32" in head and "on onnxruntime/cpu" in head and "quits" in head
    assert "stopped at --max-new-tokens 3" in p.stderr


def test_info_json_and_readable_precision(exported):
    r = CliRunner().invoke(main, ["info", str(exported("quant", "int4")), "--json"])
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["manifest"]["precision"]["name"] == "int4" and d["manifest"]["io"]["form"] == "concat"
    r = CliRunner().invoke(main, ["info", str(exported("quant", "int4"))])
    assert "precision  int4: weights" in r.output and "quantized  matmulnbits 4-bit, block 32" in r.output
    assert all(len(line) < 200 for line in r.output.splitlines())


@pytest.mark.parametrize("text,thinking,content,reasoning", [
    ("Let me think.</think>The answer.", False, "The answer.", "Let me think."),
    ("<think>Open.</think>Done.", False, "Done.", "Open."),
    ("Plain answer.", False, "Plain answer.", None),
])
def test_text_before_a_lone_think_close_is_reasoning(text, thinking, content, reasoning):
    r = glmrt.parse_reply(text, thinking=thinking)
    assert (r.content, r.reasoning) == (content, reasoning)
