"""Zero-copy NumPy views of bfloat16 CPU tensors exported through DLPack.

:func:`numpy.from_dlpack` refuses DLPack's bfloat16 (type code ``kDLBfloat``): NumPy has no
such dtype. ``ml_dtypes`` has one, but no DLPack import. :func:`bfloat16_view` reads the
exported tensor's description from the capsule itself (the C structs of the DLPack
specification, with :mod:`ctypes`) and returns an ``ml_dtypes.bfloat16`` array on the same
memory, so that a torch ``bfloat16`` CPU tensor is updated in place as a NumPy one is.

The capsule is not consumed: the view's base keeps it alive, and when the view goes away the
capsule's own destructor returns the tensor to its producer, as for any unused capsule.
Everything the capsule declares is checked before the view is made: device, dtype, number of
dimensions, shape, strides.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

KDL_CPU = 1
KDL_BFLOAT = 4
READ_ONLY = 1  # DLPack 1.0's DLPACK_FLAG_BITMASK_READ_ONLY
MAX_DIMS = 64  # NumPy's limit


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _Device),
        ("ndim", ctypes.c_int32),
        ("dtype", _DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _Managed(ctypes.Structure):  # DLManagedTensor (capsule "dltensor")
    _fields_ = [
        ("dl_tensor", _Tensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _ManagedVersioned(ctypes.Structure):  # DLManagedTensorVersioned ("dltensor_versioned")
    _fields_ = [
        ("version", _Version),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _Tensor),
    ]


_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_pointer.restype = ctypes.c_void_p
_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_is_valid.restype = ctypes.c_int
_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]


class _Export:
    """Holds a capsule for as long as the NumPy array made from this object lives."""

    def __init__(self, capsule, interface: dict):
        self.capsule = capsule
        self.__array_interface__ = interface


def _capsule(a):
    """The DLPack capsule of ``a`` (DLPack 1.0's versioned one if the producer has it), its
    tensor and whether the producer marked it read-only."""
    try:
        capsule = a.__dlpack__(max_version=(1, 0))
    except TypeError:  # a producer older than DLPack 1.0: no max_version argument
        capsule = a.__dlpack__()
    if _is_valid(capsule, b"dltensor_versioned"):
        managed = _ManagedVersioned.from_address(_pointer(capsule, b"dltensor_versioned"))
        if managed.version.major != 1:
            raise ValueError(f"DLPack version {managed.version.major} is not supported")
        return capsule, managed.dl_tensor, bool(managed.flags & READ_ONLY)
    if _is_valid(capsule, b"dltensor"):
        return capsule, _Managed.from_address(_pointer(capsule, b"dltensor")).dl_tensor, False
    raise ValueError("its __dlpack__ returned no unused DLPack capsule")


def bfloat16_view(a) -> tuple[np.ndarray | None, str]:
    """A zero-copy ``ml_dtypes.bfloat16`` view of ``a``, a CPU tensor whose ``__dlpack__``
    exports bfloat16, or ``(None, why not)``: ``why`` is empty when ``a`` exports no
    bfloat16 (or no capsule at all), which is none of this function's business.

    The view is read-only if the producer exported it so (DLPack 1.0's read-only flag).
    Needs ``ml_dtypes`` (the NumPy bfloat16 dtype); adamnp does not depend on it.

    Examples
    --------
    >>> bfloat16_view(np.zeros(2))  # float64: DLPack's type code 2 (kDLFloat)
    (None, '')
    """
    try:
        capsule, tensor, read_only = _capsule(a)
    except (AttributeError, TypeError, ValueError, BufferError):
        return None, ""
    if (tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes) != (KDL_BFLOAT, 16, 1):
        return None, ""
    if tensor.device.device_type != KDL_CPU:
        return None, f"it lives on DLPack device type {tensor.device.device_type}, not the CPU"
    ndim = tensor.ndim
    if not 0 <= ndim <= MAX_DIMS:
        return None, f"its DLPack export declares {ndim} dimensions"
    shape = tuple(int(tensor.shape[i]) for i in range(ndim))
    if any(n < 0 for n in shape):
        return None, f"its DLPack export declares the shape {shape}"
    strides = None
    if ndim and tensor.strides:
        strides = tuple(2 * int(tensor.strides[i]) for i in range(ndim))  # elements -> bytes
    if tensor.byte_offset % 2 or (math.prod(shape) and not tensor.data):
        return None, "its DLPack export declares a misaligned or null data pointer"
    try:
        import ml_dtypes
    except ImportError:
        return None, (
            "it holds bfloat16, and NumPy's bfloat16 dtype comes from ml_dtypes, which is not "
            "installed (pip install ml_dtypes)"
        )
    if not math.prod(shape):  # no memory to share (the data pointer may be null)
        return np.empty(shape, ml_dtypes.bfloat16), ""
    address = tensor.data + tensor.byte_offset
    interface = {"data": (address, read_only), "shape": shape, "strides": strides}
    interface.update(typestr=np.dtype(np.uint16).str, version=3)
    bits_view = np.asarray(_Export(capsule, interface))
    return bits_view.view(ml_dtypes.bfloat16), ""
