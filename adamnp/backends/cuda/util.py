"""What both kernel modules of the ``"cuda"`` backend (:mod:`.fp32`, :mod:`.q8`) share.

* :func:`simulating`: whether numba-cuda runs in its simulator (``NUMBA_ENABLE_CUDASIM=1``);
* :data:`THREADS`: threads per block of every kernel on a GPU (each kernel module has its
  own, smaller, thread count for the simulator, where every thread is a Python thread);
* :func:`leaf_ptr`: raw device address -> typed pointer, for the multi-tensor launches;
  :func:`bits_ptr` the same for the ``uint16`` bits of half-precision leaves;
* :func:`exact_arithmetic`: compile the kernels launched in a context without FMA
  contraction, so results are bit-identical to the NumPy reference;
* :func:`scalars_type`: the Numba type of the kernels' scalar record;
* :func:`rebind` and :func:`sim_quiet`: shared scalar functions as device functions (their
  calls to other shared functions rebound to device versions), or, in the simulator, as
  plain Python without NumPy's overflow warning.

Nothing here imports numba-cuda at module import time.

Addresses
---------
A multi-tensor kernel receives each leaf's device address as a ``uint64``. ``leaf_ptr(addr,
n, like)`` turns it into a pointer to ``like.dtype`` through an intrinsic (``inttoptr``); in
the simulator, where kernels run as Python, it returns a NumPy view of the ``n`` elements of
host memory that the simulator's "device" arrays live in.

Arithmetic
----------
NVVM fuses multiplies and adds into FMAs by default, which rounds differently from the NumPy
reference. The context of :func:`exact_arithmetic` compiles the kernels launched inside it
with NVVM's ``-fma=0`` (numba-cuda 0.30 has no public switch yet: NVIDIA/numba-cuda#118),
which makes float32 and float64 results bit-identical to the reference; division and square
root are IEEE-rounded and subnormals kept by NVVM's defaults (``-prec-div=1 -prec-sqrt=1
-ftz=0``). The simulator computes with NumPy scalars, which are never contracted.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import types as pytypes

import numpy as np

THREADS = 256  # threads per block on a GPU


def simulating() -> bool:
    """Whether numba-cuda runs in its simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    try:
        from numba.cuda.core.config import ENABLE_CUDASIM
    except ImportError:  # pragma: no cover - older numba-cuda
        from numba.core.config import ENABLE_CUDASIM
    return bool(ENABLE_CUDASIM)


def _sim_leaf_ptr(addr, n, like):
    """The ``n`` elements at host address ``addr`` (the simulator's "device" memory)."""
    buf = (ctypes.c_char * (int(n) * like.dtype.itemsize)).from_address(int(addr))
    return np.frombuffer(buf, like.dtype)


def _device_leaf_ptr():
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def leaf_ptr(typingctx, addr, n, like):
        """A ``like.dtype`` pointer to device address ``addr`` (``n`` is for the simulator)."""
        sig = types.CPointer(like.dtype)(addr, n, like)

        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

        return sig, codegen

    return leaf_ptr


@functools.cache
def leaf_ptr():
    """``leaf_ptr(addr, n, like)`` for kernels: the intrinsic, or the simulator's view."""
    return _sim_leaf_ptr if simulating() else _device_leaf_ptr()


def _sim_bits_ptr(addr, n):
    """The ``n`` uint16 values at host address ``addr`` (the simulator's "device" memory)."""
    buf = (ctypes.c_char * (int(n) * 2)).from_address(int(addr))
    return np.frombuffer(buf, np.uint16)


def _device_bits_ptr():
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def bits_ptr(typingctx, addr, n):
        """A ``uint16`` pointer to device address ``addr`` (``n`` is for the simulator)."""
        sig = types.CPointer(types.uint16)(addr, n)

        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

        return sig, codegen

    return bits_ptr


@functools.cache
def bits_ptr():
    """``bits_ptr(addr, n)`` for kernels: a ``uint16`` pointer to a float16 or bfloat16
    leaf's bits (numba-cuda types neither format); in the simulator a view of ``n`` values."""
    return _sim_bits_ptr if simulating() else _device_bits_ptr()


@functools.cache
def exact_arithmetic() -> tuple:
    """``(exact, context)``: ``context()`` is a context manager inside which kernels compile
    without FMA contraction; ``exact`` says whether it can (False if numba-cuda's internals
    changed; the kernels then run contracted)."""
    if simulating():  # NumPy scalar arithmetic: never contracted
        return True, contextlib.nullcontext

    from numba.cuda.core.compiler_lock import global_compiler_lock
    from numba.cuda.cudadrv import nvvm

    if not callable(getattr(nvvm, "compile_ir", None)):  # pragma: no cover - API changed
        return False, contextlib.nullcontext

    @contextlib.contextmanager
    def context():
        # Kernels compile lazily, on their first launch, through nvvm.compile_ir; holding the
        # compiler lock keeps other threads' compilations out of this window.
        with global_compiler_lock:
            original = nvvm.compile_ir

            def compile_ir(llvmir, **options):
                options["fma"] = False
                return original(llvmir, **options)

            nvvm.compile_ir = compile_ir
            try:
                yield
            finally:
                nvvm.compile_ir = original

    return True, context


def scalars_type(dtype):
    """The Numba type of a :class:`~adamnp.backends.math.KernelScalars` of ``dtype``.

    The kernels take the record as one argument; a launch passes its fields as separate
    kernel parameters (numba-cuda flattens tuples), so ``k.grad_scale`` and the rest are
    plain registers in the kernel.
    """
    from numba.cuda.typing.typeof import typeof

    from ..math import KernelScalars

    f = np.dtype(str(dtype)).type
    return typeof(KernelScalars(*(f(0),) * (len(KernelScalars._fields) - 1), False))


def flags_types() -> tuple:
    """The Numba types of the four branch flags that follow the record (one per
    :class:`~adamnp.backends.math.KernelFlags` field, in its order)."""
    from numba.cuda import types

    from ..math import KernelFlags

    return (types.boolean,) * len(KernelFlags._fields)


def sim_quiet(f):
    """``f`` run with NumPy's overflow warning off: in the simulator the uint32 hash (and the
    half-precision rounding) run on NumPy scalars, whose arithmetic wraps like the compiled
    code's but warns."""

    def quiet(*args):
        with np.errstate(over="ignore"):
            return f(*args)

    return quiet


def rebind(f, **names):
    """A copy of function ``f`` whose global ``names`` are replaced (by device functions)."""
    g = pytypes.FunctionType(f.__code__, {**f.__globals__, **names}, f.__name__,
                             f.__defaults__, f.__closure__)  # fmt: skip
    g.__kwdefaults__ = f.__kwdefaults__
    return g
