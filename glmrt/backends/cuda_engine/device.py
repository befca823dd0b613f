"""The GPU, through NVIDIA's official Python bindings to the CUDA driver API
(`cuda.bindings.driver`): context, memory, modules, launches, CUDA graphs. Nothing else in
glmrt calls the driver; the decoder speaks to a `Device`, and the tests give it an emulated one
that runs the same kernels on the CPU (tests/cuda_emu/).

One primary context per GPU (the one ONNX Runtime's CUDA provider uses too, so device
pointers pass between them), one non-blocking stream, and graphs captured from it. Every call
that fails raises GlmrtError naming the call and CUDA's error name, in one line.
"""
from __future__ import annotations

import abc
import contextlib
import ctypes

import numpy as np

from ...errors import GlmrtError
from .nvrtc import INSTALL


@contextlib.contextmanager
def freed(resource):
    """`with freed(x):` frees the device memory x holds (x.free()) on the way out. When another
    failure is already on its way out (a fault may have lost the context), a failure to free is
    dropped: the first one is the one to report."""
    try:
        yield resource
    except BaseException:
        with contextlib.suppress(GlmrtError):
            resource.free()
        raise
    resource.free()


class Device(abc.ABC):
    """What the engine needs from a GPU. Addresses are ints; arrays are numpy."""
    image_kind = "cubin"          # what `load` takes: a cubin (a GPU), or the CUDA source (the emulation)
    ort_device = "cuda"           # where ONNX Runtime's prefill must run to share this device's memory
    name: str
    compute_capability: tuple
    sm_count: int
    driver_version: int           # CUDA driver API version, 13000 = CUDA 13.0

    def activate(self) -> None:
        """Make this device current for the calling thread."""

    @abc.abstractmethod
    def alloc(self, nbytes: int) -> int: ...

    @abc.abstractmethod
    def free(self, ptr: int) -> None: ...

    @abc.abstractmethod
    def upload(self, ptr: int, array: np.ndarray) -> None:
        """Host -> device, queued on the stream (the array must live until the next sync)."""

    @abc.abstractmethod
    def download(self, ptr: int, array: np.ndarray) -> None:
        """Device -> host into `array`, after everything queued before it (synchronizes)."""

    @abc.abstractmethod
    def zero(self, ptr: int, nbytes: int) -> None: ...

    @abc.abstractmethod
    def load(self, image: bytes, kernels: dict) -> dict:
        """Load a module; `kernels` maps names to their dynamic shared memory in bytes.
        Returns name -> a handle `launch` takes."""

    @abc.abstractmethod
    def launch(self, kernel, grid: tuple, threads: int, smem: int, args: ctypes.Structure, pdl: bool = False) -> None:
        """Queue one kernel taking one struct argument; pdl: programmatic dependent launch
        (it may start before the previous kernel ends; the kernels wait where they must)."""

    @abc.abstractmethod
    def synchronize(self) -> None: ...

    @abc.abstractmethod
    def capture(self, record) -> object:
        """A graph of what `record()` queues, replayed by `replay`."""

    @abc.abstractmethod
    def replay(self, graph) -> None: ...

    def memory(self) -> tuple[int, int] | None:
        """(free, total) device memory in bytes, where known."""
        return None

    def occupancy(self, kernel, threads: int, smem: int) -> int:
        """Blocks of `kernel` one SM holds at once (its registers and shared memory)."""
        return 4

    def timer(self):
        """A context manager measuring device time in ms (`.ms` after the block), or None."""
        return None


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        raise GlmrtError(f"the cuda engine needs NVIDIA's CUDA Python bindings: {INSTALL}") from None
    return driver


class CudaDevice(Device):
    def __init__(self, index: int = 0):
        cu = self.cu = _driver()
        try:
            (err,) = cu.cuInit(0)
        except Exception as e:     # cuda-bindings raises its own type where libcuda is absent
            raise GlmrtError("no NVIDIA driver found (libcuda could not be loaded: "
                             f"{str(e).splitlines()[0][:160]}); the cuda engine runs on a machine "
                             "with an NVIDIA GPU and driver") from None
        if err != cu.CUresult.CUDA_SUCCESS:
            raise GlmrtError(f"the CUDA driver did not initialize ({_name(err)}): no usable NVIDIA GPU here")
        self.index = index
        self.dev = self._ck(cu.cuDeviceGet(index), "cuDeviceGet")
        raw = self._ck(cu.cuDeviceGetName(256, self.dev), "cuDeviceGetName")
        self.name = raw.split(b"\0")[0].decode()
        attr = cu.CUdevice_attribute
        self.compute_capability = (
            self._ck(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.dev), "attribute"),
            self._ck(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.dev), "attribute"))
        self.sm_count = self._ck(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, self.dev),
                                 "attribute")
        self.max_smem = self._ck(cu.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, self.dev), "attribute")
        self.driver_version = self._ck(cu.cuDriverGetVersion(), "cuDriverGetVersion")
        self.ctx = self._ck(cu.cuDevicePrimaryCtxRetain(self.dev), "cuDevicePrimaryCtxRetain")
        self.activate()
        self.stream = self._ck(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        self.modules = []

    def _ck(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.cu.CUresult.CUDA_SUCCESS:
            raise GlmrtError(f"CUDA {what} failed: {_name(err)} ({_describe(self.cu, err)})")
        return rest[0] if len(rest) == 1 else (rest or None)

    def activate(self) -> None:
        self._ck(self.cu.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def alloc(self, nbytes: int) -> int:
        return int(self._ck(self.cu.cuMemAlloc(max(int(nbytes), 1)), f"cuMemAlloc of {nbytes} bytes"))

    def free(self, ptr: int) -> None:
        self.cu.cuMemFree(ptr)

    def upload(self, ptr: int, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        self._ck(self.cu.cuMemcpyHtoDAsync(ptr, a.ctypes.data, a.nbytes, self.stream), "cuMemcpyHtoDAsync")

    def download(self, ptr: int, array: np.ndarray) -> None:
        assert array.flags.c_contiguous
        self._ck(self.cu.cuMemcpyDtoHAsync(array.ctypes.data, ptr, array.nbytes, self.stream), "cuMemcpyDtoHAsync")
        self.synchronize()

    def zero(self, ptr: int, nbytes: int) -> None:
        self._ck(self.cu.cuMemsetD8Async(ptr, 0, nbytes, self.stream), "cuMemsetD8Async")

    def load(self, image: bytes, kernels: dict) -> dict:
        cu = self.cu
        module = self._ck(cu.cuModuleLoadData(image), "cuModuleLoadData (loading the engine's cubin)")
        self.modules.append(module)
        out = {}
        for name, smem in kernels.items():
            fn = self._ck(cu.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction {name}")
            # the default limit, 48 KB, counts a kernel's static shared memory too: raise it for
            # every kernel taking dynamic memory (GLM-4-32B's x for 4 rows: 48 KB + 2.3 KB static)
            if smem > 0:
                if smem > self.max_smem:
                    raise GlmrtError(f"kernel {name} needs {smem} bytes of shared memory; {self.name} "
                                     f"gives a block at most {self.max_smem}")
                self._ck(cu.cuFuncSetAttribute(
                    fn, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
                    f"cuFuncSetAttribute {name}")
            out[name] = fn
        return out

    def launch(self, kernel, grid: tuple, threads: int, smem: int, args: ctypes.Structure, pdl: bool = False) -> None:
        params = (ctypes.c_void_p * 1)(ctypes.addressof(args))
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        if not pdl or self.compute_capability < (9, 0):
            self._ck(self.cu.cuLaunchKernel(kernel, gx, gy, gz, threads, 1, 1, smem, self.stream,
                                            ctypes.addressof(params), 0),
                     f"cuLaunchKernel (grid {gx}x{gy}x{gz}, {threads} threads, {smem} bytes of shared memory)")
            return
        cu = self.cu
        cfg = cu.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = gx, gy, gz
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = threads, 1, 1
        cfg.sharedMemBytes, cfg.hStream = smem, self.stream
        attr = cu.CUlaunchAttribute()
        attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        cfg.attrs = [attr]
        cfg.numAttrs = 1
        self._ck(cu.cuLaunchKernelEx(cfg, kernel, ctypes.addressof(params), 0),
                 f"cuLaunchKernelEx (programmatic dependent launch; grid {gx}x{gy}x{gz}, {threads} threads, "
                 f"{smem} bytes of shared memory)")

    def synchronize(self) -> None:
        self._ck(self.cu.cuStreamSynchronize(self.stream), "cuStreamSynchronize (a kernel failed)")

    def capture(self, record) -> object:
        cu = self.cu
        self._ck(cu.cuStreamBeginCapture(self.stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
                 "cuStreamBeginCapture")
        try:
            record()
        except BaseException:
            cu.cuStreamEndCapture(self.stream)      # ends the (invalidated) capture; the launch's own error is the news
            raise
        graph = self._ck(cu.cuStreamEndCapture(self.stream), "cuStreamEndCapture")
        return self._ck(cu.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")

    def replay(self, graph) -> None:
        self._ck(self.cu.cuGraphLaunch(graph, self.stream), "cuGraphLaunch")

    def memory(self):
        free, total = self._ck(self.cu.cuMemGetInfo(), "cuMemGetInfo")
        return int(free), int(total)

    def occupancy(self, kernel, threads: int, smem: int) -> int:
        n = self._ck(self.cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(kernel, threads, smem),
                     "cuOccupancyMaxActiveBlocksPerMultiprocessor")
        return max(1, int(n))

    def timer(self):
        return _Timer(self)


class _Timer:
    def __init__(self, dev: CudaDevice):
        self.dev, self.ms = dev, None

    def __enter__(self):
        cu = self.dev.cu
        self.a = self.dev._ck(cu.cuEventCreate(0), "cuEventCreate")
        self.b = self.dev._ck(cu.cuEventCreate(0), "cuEventCreate")
        self.dev._ck(cu.cuEventRecord(self.a, self.dev.stream), "cuEventRecord")
        return self

    def __exit__(self, *exc):
        cu = self.dev.cu
        self.dev._ck(cu.cuEventRecord(self.b, self.dev.stream), "cuEventRecord")
        self.dev._ck(cu.cuEventSynchronize(self.b), "cuEventSynchronize")
        self.ms = float(self.dev._ck(cu.cuEventElapsedTime(self.a, self.b), "cuEventElapsedTime"))
        cu.cuEventDestroy(self.a)
        cu.cuEventDestroy(self.b)
        return False


def _name(err) -> str:
    return getattr(err, "name", str(err))


def _describe(cu, err) -> str:
    try:
        _, text = cu.cuGetErrorString(err)
        return text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # the description is a courtesy; the name is already in the message
        return "no description"
