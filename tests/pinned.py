"""Packages a test runs beside this environment (another version than the one installed here),
pip-installed once into a folder of their own under the user's cache and put on PYTHONPATH."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path


def pinned_site(name: str, pins: tuple, made: str) -> Path:
    """The folder holding `pins` (keyed by them and this Python), made when its `made` path is
    missing: a half-made one (an interrupted run) is made again; two test processes making it
    at once keep the first."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glmrt-tests"
    site = cache / f"{name}-{hashlib.sha256(' '.join(pins + (sys.version,)).encode()).hexdigest()[:12]}"
    if not (site / made).is_dir():
        shutil.rmtree(site, ignore_errors=True)
        tmp = cache / f".{site.name}.{os.getpid()}"
        p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                            "--disable-pip-version-check", "--target", str(tmp), *pins],
                           capture_output=True, text=True)
        assert p.returncode == 0, f"pip could not install {' '.join(pins)}: {p.stderr[-2000:]}"
        try:
            tmp.rename(site)
        except OSError:                   # another test process made it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    return site
