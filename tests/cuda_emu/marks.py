"""What the CUDA engine's tests need of this machine, as pytest marks: NVRTC (the kernels
compile for every architecture) and a C++20 compiler (the CPU emulation runs them)."""
import pytest

from glmrt.backends.cuda_engine import nvrtc
from glmrt.errors import GlmrtError

from .emulator import compiler

try:
    nvrtc.version()
    HAS_NVRTC = True
except GlmrtError:
    HAS_NVRTC = False
needs_nvrtc = pytest.mark.skipif(not HAS_NVRTC, reason="NVRTC is not installed (pip install 'glmrt[cuda]')")
needs_cxx = pytest.mark.skipif(compiler() is None, reason="no C++20 compiler for the CUDA emulation")
