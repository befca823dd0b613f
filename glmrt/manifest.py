"""manifest.json: what every artifact says about itself. Nothing is inferred from file names.

Written by the exporter (and engine builder), read and checked by the runtime:
  format            MANIFEST_FORMAT; a newer one is refused with a clear message
  kind              "onnx-model"
  config            GlmConfig.to_dict()
  io                the IO contract (glmrt.contract)
  precision         {"name", "weights", "activations", "kv", "quantization"}
  files             {relative path: {"sha256", "bytes"}}; graph, weights, tokenizer, template
  graph, tokenizer  relative paths of the ONNX graph and tokenizer.json
  chat_template     relative path of the chat template, or null
  consumers         {runtime: {"graph", "io", "config"}} for each other runtime the folder was
                    written for (export --for; glmrt.contract.CONSUMERS): its graph over the
                    same weights file, that graph's IO contract, the config file it reads
  generation        sampling defaults and eos ids from generation_config.json
  versions          glmrt, onnx, numpy, python that made it
  source            the checkpoint folder and its config's sha256
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import ArtifactError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path, known_sha256: str | None = None) -> dict:
    """{"sha256", "bytes"}; known_sha256 (hashed while the file was written) skips a re-read."""
    return {"sha256": known_sha256 or sha256(path), "bytes": path.stat().st_size}


def write(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")


def read(folder: Path, verify: bool = True) -> dict:
    """Read and check a model folder's manifest; verify=True checks every file's checksum."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not a folder")
    if not path.is_file():
        raise ArtifactError(f"{path}: not found; is {folder} a folder written by 'glmrt export'?")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        fmt = m["format"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ArtifactError(f"{path}: not a valid glmrt manifest") from None
    if not isinstance(fmt, int) or fmt > MANIFEST_FORMAT:
        raise ArtifactError(f"{path}: manifest format {fmt!r} is newer than this glmrt reads "
                            f"({MANIFEST_FORMAT}); upgrade glmrt")
    for rel, entry in m.get("files", {}).items():
        f = folder / rel
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != entry["bytes"]:
            raise ArtifactError(f"{f}: {f.stat().st_size} bytes, the manifest says "
                                f"{entry['bytes']} (truncated or replaced)")
    if verify:
        verify_checksums(folder, m)
    return m


def verify_checksums(folder: Path, m: dict) -> None:
    """Every file the manifest lists against its sha256 (read() checked that they exist and
    their sizes)."""
    for rel, entry in m.get("files", {}).items():
        f = Path(folder) / rel
        if sha256(f) != entry["sha256"]:
            raise ArtifactError(f"{f}: checksum does not match the manifest (corrupted); "
                                "re-export, or load with verify=False to skip the check")


class Verification:
    """verify_checksums in a thread, while the caller goes on with the files (a build
    uploads and tunes on the weights meanwhile: hashing GLM-4-32B's 19 GB takes ~20 s);
    wait() re-raises its ArtifactError. Whatever the caller makes from the files must not
    land before wait() returns."""

    def __init__(self, folder: Path, m: dict):
        import threading
        self._error: BaseException | None = None

        def run():
            try:
                verify_checksums(folder, m)
            except BaseException as e:          # noqa: BLE001 (re-raised by wait)
                self._error = e
        self._thread = threading.Thread(target=run, name="glmrt-verify", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def owned_by_manifest(kinds: tuple[str, ...], subfolders: tuple[str, ...] = ()):
    """For `check_output`: folder -> a predicate telling which relative paths there a manifest
    of one of `kinds` accounts for (itself, the files it lists, anything under `subfolders`,
    such as the engines `glmrt build` puts inside a model folder), or None where the folder
    has no such manifest."""
    def owned(folder: Path):
        try:
            m = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
            listed = set(m["files"]) | {MANIFEST}
            if m.get("kind") not in kinds:
                return None
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None
        return lambda rel: rel in listed or rel.split("/", 1)[0] in subfolders
    return owned


def check_output(out: Path, *, overwrite: bool, owned, what: str, protect=(), empty_ok: bool = False) -> None:
    """Refuse, in one line, to write the folder `out` where that could destroy something
    glmrt did not write. `owned(folder)` returns a predicate over relative file paths saying
    which files the command owns there (None: nothing, not its folder); `protect` are source
    paths that `out` may not be, contain or lie inside, whatever `overwrite` says. An existing
    empty folder is used with `overwrite` (or always, with `empty_ok`)."""
    out = Path(out)
    here = out.resolve()
    for src in protect:
        src = Path(src).resolve()
        if here == src or src in here.parents or here in src.parents:
            rel = "is" if here == src else "lies inside" if src in here.parents else "contains"
            raise ArtifactError(f"{out}: the output {rel} the source {src}; write to another folder "
                                "(--overwrite never replaces a source)")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ArtifactError(f"{out}: exists and is not a folder; choose another output path")
    if not any(out.iterdir()) and (overwrite or empty_ok):
        return                                       # an empty folder holds nothing to lose
    if not overwrite:
        raise ArtifactError(f"{out}: already exists (pass --overwrite to replace it)")
    mine = owned(out)
    if mine is None:
        raise ArtifactError(f"{out}: not a folder {what} wrote; --overwrite replaces only those "
                            "(move it away or choose another output path)")
    foreign = sorted(rel for p in out.rglob("*")
                     if not p.is_dir() and not mine(rel := p.relative_to(out).as_posix()))
    if foreign:
        raise ArtifactError(f"{out}: holds {foreign[0]!r}, which {what} did not write"
                            + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else "")
                            + "; --overwrite would delete it: move it away first")


@contextlib.contextmanager
def staged(out: Path):
    """Yield a hidden temporary folder beside `out`; when the block completes, it replaces
    `out` by a rename. On any failure or interruption it is removed: a folder that looks
    complete (named `out`, with a manifest) only ever exists whole."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
