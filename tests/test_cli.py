"""The CLI end to end, as a user runs it: tiny -> export -> info -> chat, and clean errors."""
import subprocess
import sys

import pytest
from click.testing import CliRunner

from glmrt.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_tiny_export_info_chat(tmp_path):
    ck, out = tmp_path / "ck", tmp_path / "onnx"
    assert run("tiny", ck).exit_code == 0
    r = run("export", ck, "-o", out, "--precision", "fp16")
    assert r.exit_code == 0 and "fp16" in r.output
    r = run("info", out, "--verify")
    assert r.exit_code == 0 and "checksums OK" in r.output and 'kv float16' in r.output
    r = run("chat", out, "--prompt", "What does the with statement do?", "--max-new-tokens", "8")
    assert r.exit_code == 0 and r.output.strip()


def test_interactive_chat_keeps_history_until_empty_line(exported):
    r = CliRunner().invoke(main, ["chat", str(exported()), "--max-new-tokens", "4", "--system", "S"],
                           input="first\nsecond\n\n")
    assert r.exit_code == 0 and r.output.count("> ") == 3


@pytest.mark.parametrize("args,message", [
    (["export", "{tmp}/nowhere", "-o", "{tmp}/o"], "nowhere: not a folder"),
    (["chat", "{tmp}", "--prompt", "x"], "manifest.json: not found"),
    (["chat", "{model}", "--prompt", "x", "--temperature", "-2"], "temperature=-2.0"),
])
def test_errors_are_one_line_without_traceback(tmp_path, exported, args, message):
    args = [a.format(tmp=tmp_path, model=exported()) for a in args]
    p = subprocess.run([sys.executable, "-m", "glmrt.cli", *args], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and message in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
