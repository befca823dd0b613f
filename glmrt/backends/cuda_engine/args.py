"""The kernels' argument structs, mirrored with ctypes (kernels/gemv.cu GemvArgs,
kernels/attention.cu AttnArgs): each kernel takes one of them by value. Pointers are device
addresses (ints); fields a kernel does not use stay 0. tests/test_cuda_engine.py compares
these layouts with the C compiler's, field by field."""
from __future__ import annotations

import ctypes

P = ctypes.c_uint64          # a device address


class GemvArgs(ctypes.Structure):
    _fields_ = [(name, P) for name in (
        "w", "scales", "bias", "x_in", "y_in", "h_in", "norm_y", "norm_x", "embed", "tokens",
        "x_out", "y", "act", "q", "k_cache", "v_cache", "rope", "pos", "part_val", "part_idx",
        "counter", "token_out")] + [
        ("eps", ctypes.c_float), ("pos_add", ctypes.c_int32), ("max_seq", ctypes.c_int32),
        ("slot_stride", ctypes.c_int32)]


class AttnArgs(ctypes.Structure):
    _fields_ = [(name, P) for name in ("q", "k_cache", "v_cache", "pos", "part_o", "part_ml", "out", "counter")] + [
        ("pos_add", ctypes.c_int32), ("max_seq", ctypes.c_int32), ("chunk", ctypes.c_int32),
        ("splits", ctypes.c_int32), ("slot_stride", ctypes.c_int32), ("pad_", ctypes.c_int32)]


STRUCTS = {"GemvArgs": GemvArgs, "AttnArgs": AttnArgs}
