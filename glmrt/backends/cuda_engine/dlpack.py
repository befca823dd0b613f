"""The engine's device memory as ONNX Runtime OrtValues, without a copy: a DLPack tensor
(DLManagedTensor in a PyCapsule, built here with ctypes) that OrtValue.from_dlpack wraps.
ONNX Runtime's SessionOptions.add_initializer takes only buffers the user owns, which an
OrtValue ONNX Runtime allocated is not; one made from DLPack is.

The DLManagedTensor and its shape live in one malloc'd block whose deleter is libc's free, so
ONNX Runtime releases it whenever it drops the tensor, with no Python callback to outlive.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

KDL = {"cpu": 1, "cuda": 2}                        # DLDeviceType
CODES = {"f": 2, "u": 1, "i": 0}                   # DLDataTypeCode: float, uint, int


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32), ("dtype", _DType),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p), ("byte_offset", ctypes.c_uint64)]


class _Managed(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_FREE = ctypes.cast(_libc.free, ctypes.c_void_p).value
_capsule = ctypes.pythonapi.PyCapsule_New
_capsule.restype = ctypes.py_object
_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def ortvalue(ptr: int, shape, dtype, device: str = "cuda", device_id: int = 0):
    """An OrtValue over `ptr` (shape, numpy dtype) on `device`, sharing its memory."""
    import onnxruntime as ort
    dt = np.dtype(dtype)
    shape = [int(d) for d in shape]
    size = ctypes.sizeof(_Managed) + 8 * len(shape)
    block = _libc.malloc(size)
    if not block:
        raise MemoryError("malloc for a DLPack tensor")
    dims = block + ctypes.sizeof(_Managed)
    (ctypes.c_int64 * len(shape)).from_address(dims)[:] = shape
    m = _Managed.from_address(block)
    m.dl_tensor = _Tensor(ptr, _Device(KDL[device], device_id), len(shape), _DType(CODES[dt.kind], 8 * dt.itemsize, 1),
                          dims, None, 0)
    m.manager_ctx, m.deleter = None, _FREE
    cap = _capsule(block, b"dltensor", None)
    try:
        return ort.OrtValue.from_dlpack(cap)
    except TypeError:                               # ONNX Runtime <= 1.31: (capsule, is_bool_tensor)
        return ort.OrtValue.from_dlpack(cap, False)
