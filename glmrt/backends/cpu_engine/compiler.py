"""The CPU engine's C (kernels/engine.c) -> a shared library for one instruction set, with the
C compiler of the machine that builds it (cc, gcc or clang; $CC first where set).

  ISA          what the engine's GEMVs use                      CPU flags the host must have
  avx512vnni   AVX-512 integer dot products (vpdpbusd), 64 B    avx512f avx512bw avx512vl avx512_vnni
  avxvnni      AVX-VNNI dot products (vpdpbusd), 32 B           avx2 fma f16c avx_vnni
  avx2         AVX2 maddubs + madd, 32 B                        avx2 fma f16c
  generic      portable C of the same arithmetic (any CPU)      -

The instruction set is a build parameter recorded in the engine's manifest; loading refuses, in
one line, an engine built for flags this CPU lacks.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

from ...errors import GlmrtError

SOURCE = Path(__file__).with_name("kernels") / "engine.c"
ABI = 2                        # GLMRT_CPU_ABI in engine.c: the structs engine.py mirrors

# name -> (compiler flags, the macro engine.c reads, /proc/cpuinfo flags it needs); best first
ISAS = {
    "avx512vnni": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"], ["GLMRT_AVX512VNNI"],
                   ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")),
    "avxvnni": (["-mavx2", "-mfma", "-mf16c", "-mavxvnni"], ["GLMRT_AVX2", "GLMRT_AVXVNNI"],
                ("avx2", "fma", "f16c", "avx_vnni")),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], ["GLMRT_AVX2"], ("avx2", "fma", "f16c")),
    "generic": ([], [], ()),
}
X86_ONLY = ("avx512vnni", "avxvnni", "avx2")
COMMON = ["-O3", "-std=c11", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-Wall", "-Werror"]


def source_text() -> str:
    return SOURCE.read_text(encoding="utf-8")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def cpu_flags() -> set[str]:
    """The flags /proc/cpuinfo lists for this CPU (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def runs_here(isa: str) -> bool:
    """This CPU executes code built for `isa`."""
    if isa in X86_ONLY and platform.machine() not in ("x86_64", "AMD64"):
        return False
    return set(ISAS[isa][2]) <= cpu_flags()


def host_isa() -> str:
    """The best instruction set this CPU runs."""
    return next(isa for isa in ISAS if runs_here(isa))


def check_isa(isa: str) -> str:
    if isa not in ISAS:
        raise GlmrtError(f"--isa {isa!r}; the cpu engine builds for {', '.join(ISAS)} (or auto: this CPU's best)")
    return isa


def find_compiler() -> str:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    raise GlmrtError("the cpu engine is compiled where it is built and no C compiler was found (cc, gcc or clang; "
                     "or set CC): install one (Debian/Ubuntu: apt install gcc)")


def compile_library(source: str, isa: str, out: Path) -> dict:
    """Compile `source` for `isa` to the shared library `out`; what the manifest records."""
    flags, macros, _ = ISAS[check_isa(isa)]
    cc = find_compiler()
    src = out.with_suffix(".build.c")
    src.write_text(source, encoding="utf-8")
    defines = [f"-D{m}" for m in macros]
    cmd = [cc, *COMMON, *flags, *defines, str(src), "-o", str(out), "-lm"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise GlmrtError(f"{cc} did not compile the cpu engine for {isa} within 300 s") from None
    finally:
        src.unlink(missing_ok=True)
    if r.returncode:
        first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:300])
        raise GlmrtError(f"{cc} could not compile the cpu engine for {isa}: {first.strip()[:300]}")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()
    return {"compiler": cc, "compiler_version": version[0] if version else "?", "flags": [*COMMON, *flags, *defines]}
