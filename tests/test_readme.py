"""The README's examples run as written on a CPU machine: every line of its `Use` shell block
and its Python block, in a fresh folder where the README's first command has run (the default
model exported to glm4-pydoc-onnx)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from glmrt.export.export import export_model

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def block(after: str, lang: str) -> str:
    """The first fenced `lang` block after the heading `after`."""
    rest = README[README.index(after):]
    m = re.search(rf"```{lang}\n(.*?)```", rest, re.S)
    return m.group(1)


@pytest.fixture(scope="module")
def here(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    (d / "models").symlink_to(REPO / "models")
    export_model(REPO / "models" / "glm4-pydoc", d / "glm4-pydoc-onnx", progress=False)
    return d


def glmrt_lines():
    lines = [ln.split("  #")[0].strip() for ln in block("## Use", "sh").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


@pytest.mark.parametrize("line", glmrt_lines())
def test_use_shell_lines(here, line):
    args = shlex.split(line)
    assert args[0] == "glmrt"
    p = subprocess.run([sys.executable, "-m", "glmrt.cli", *args[1:]], cwd=here, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]


def test_use_python_block(here):
    p = subprocess.run([sys.executable, "-c", block("## Use", "python")], cwd=here, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "get_weather" in p.stdout
