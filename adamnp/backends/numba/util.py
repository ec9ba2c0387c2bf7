"""Shared pieces of the Numba CPU kernels: jit options, raw pointers, leaf addresses, chunks.

Multi-tensor kernels receive the leaves of a tree as an ``int64`` array of data addresses
(one per leaf) and turn an address back into a typed array view inside the kernel with
:func:`as_pointer` and ``numba.carray``. Work is split into a table of chunks
``(leaf, start, stop)`` of at most ``CHUNK`` elements, so that ``prange`` balances many small
leaves and a few large ones alike and every result is independent of the number of threads.

Reading the addresses is the only per-leaf work left in Python. ``ndarray.ctypes.data`` and
``__array_interface__`` each cost a Python call per array, so :func:`data_addresses` reads
the ``data`` field of NumPy's ``PyArrayObject`` (the pointer right after the object header, part
of NumPy's public C struct) for all leaves in one compiled loop. The field offset is verified
against ``__array_interface__`` at import; if the check fails the slow, portable path is used.
"""

from __future__ import annotations

import ctypes

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.analysis import dead_branch_prune
from numba.core.compiler import CompilerBase, DefaultPassBuilder
from numba.core.compiler_machinery import FunctionPass, register_pass
from numba.core.typed_passes import NopythonTypeInference
from numba.core.untyped_passes import DeadBranchPrune
from numba.extending import intrinsic

from ..math import adam_elem
from ..numpy import CHUNK  # elements per work item: the reference's chunk

#: Argument types whose values are never None.
_NEVER_NONE = (types.Array, types.Number, types.Boolean, types.BaseTuple)


class _NotNone:
    """An argument type as Numba's branch pruning reads a literal's (``literal_type``)."""

    def __init__(self, literal_type):
        self.literal_type = literal_type


@register_pass(mutates_CFG=True, analysis_only=False)
class _PruneOnArgumentTypes(DeadBranchPrune):
    """Numba's dead branch pruning, which also decides ``x is None`` (and ``is not``) for an
    argument ``x`` whose type is never None (an array, a number, a tuple).

    Numba decides it only for an ``x`` that is None (or a literal), so with an array ``x``
    the code under ``if x is None`` was typed and compiled, then dropped by LLVM. Here a
    kernel compiles only the branch its arguments select, either way round; inlined
    functions (``inline="always"``) are pruned on the caller's arguments after inlining."""

    _name = "adamnp_prune_on_argument_types"

    def run_pass(self, state):
        args = [_NotNone(a) if isinstance(a, _NEVER_NONE) else a for a in state.args]
        dead_branch_prune(state.func_ir, args)
        return True


@register_pass(mutates_CFG=False, analysis_only=True)
class _ArgumentsNoAlias(FunctionPass):
    """Declare the compiled function's pointer arguments (array data among them) ``noalias``
    for its lowering: Numba's flag for the outlined body of a parallel loop without aliases."""

    _name = "adamnp_arguments_noalias"

    def __init__(self):
        FunctionPass.__init__(self)

    def run_pass(self, state):
        state.flags.noalias = True
        return False


def _pipeline(state):
    pm = DefaultPassBuilder.define_nopython_pipeline(state)
    pm.passes = [
        (_PruneOnArgumentTypes if cls is DeadBranchPrune else cls, what) for cls, what in pm.passes
    ]
    return pm


class _Compiler(CompilerBase):
    """Numba's nopython pipeline with :class:`_PruneOnArgumentTypes` for its branch pruning."""

    def define_pipelines(self):
        pm = _pipeline(self.state)
        pm.finalize()
        return [pm]


class _NoAliasCompiler(CompilerBase):
    """:class:`_Compiler`'s pipeline with :class:`_ArgumentsNoAlias` before lowering."""

    def define_pipelines(self):
        pm = _pipeline(self.state)
        pm.add_pass_after(_ArgumentsNoAlias, NopythonTypeInference)
        pm.finalize()
        return [pm]


def jit(parallel: bool = False, cache: bool = True, noalias: bool = False, **options):
    """``numba.njit`` with the options every kernel of this backend uses.

    ``error_model="numpy"`` lets division by zero give inf/NaN as in NumPy (and lets LLVM
    vectorize divisions); ``cache=True`` keeps compiled code on disk between processes
    (functions defined interactively cannot be cached); ``nogil`` lets other Python threads
    run meanwhile; ``fastmath`` stays off, so no operation is reordered or fused into an FMA.

    ``noalias=True`` promises LLVM that no two array arguments share memory and that no
    memory reached through an argument is reached another way (a pointer made from an
    address), as Numba does for the body of a parallel loop: that lets it vectorize table
    lookups next to stores, with gathers. Only for kernels whose callers keep that promise.

    Examples
    --------
    >>> @jit(cache=False)
    ... def twice(x):
    ...     return 2 * x
    >>> twice(21)
    42
    """
    options["pipeline_class"] = _NoAliasCompiler if noalias else _Compiler
    return numba.njit(parallel=parallel, cache=cache, error_model="numpy", nogil=True, **options)


#: :func:`adam_elem` compiled for inlining into the loops of the CPU kernels.
elem = numba.njit(inline="always", error_model="numpy")(adam_elem)


def _pointee(like):
    if isinstance(like, types.Array):
        return like.dtype
    if isinstance(like, types.NumberClass):
        return like.instance_type
    raise TypeError(f"as_pointer: cannot take the element type of {like}")


@intrinsic
def as_pointer(typingctx, address, like):
    """``as_pointer(address, like)``: a raw pointer to elements of ``like``'s type.

    ``like`` is an array (its dtype is used) or a NumPy scalar type such as ``np.int32``.
    Compiled code only; wrap the result with ``numba.carray(ptr, n)``.
    """
    if not isinstance(address, types.Integer):
        return None
    sig = types.CPointer(_pointee(like))(address, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def load_int64(typingctx, address):
    """``load_int64(address)``: the 64-bit integer stored at ``address`` (compiled code only)."""
    if not isinstance(address, types.Integer):
        return None
    sig = types.int64(address)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load(ptr)

    return sig, codegen


@jit()
def _read_fields(object_addresses, offset):
    out = np.empty(object_addresses.size, np.int64)
    for i in range(object_addresses.size):
        out[i] = load_int64(object_addresses[i] + offset)
    return out


def _data_field_offset() -> int | None:
    """Offset of ``PyArrayObject.data`` (right after the object header), if verified here."""
    offset = object.__basicsize__
    probes = [np.zeros(3, np.float32), np.arange(10.0)[2:], np.zeros((2, 3), np.float64).T]
    for a in probes:
        stored = ctypes.c_ssize_t.from_address(id(a) + offset).value
        if stored != a.__array_interface__["data"][0]:
            return None
    return offset


_DATA_OFFSET = _data_field_offset()


def data_addresses(arrays) -> np.ndarray:
    """Data addresses of a sequence of host NumPy arrays, as ``int64``.

    The arrays must stay alive while the addresses are used.

    Examples
    --------
    >>> a, b = np.zeros(4, np.float32), np.ones(2)
    >>> [int(x) for x in data_addresses([a, b])] == [a.ctypes.data, b.ctypes.data]
    True
    """
    n = len(arrays)
    if _DATA_OFFSET is None or n < 8:
        return np.fromiter((a.__array_interface__["data"][0] for a in arrays), np.int64, n)
    return _read_fields(np.fromiter(map(id, arrays), np.int64, n), _DATA_OFFSET)


def chunk_table(sizes: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """Work items ``(leaf, start, stop)`` covering leaves of ``sizes`` elements in order.

    Every leaf is cut into pieces of ``chunk`` elements (the last one shorter); empty leaves
    get no piece. Plain NumPy: nothing to compile.

    Examples
    --------
    >>> chunk_table(np.array([5, 0, 2]), 3).tolist()
    [[0, 0, 3], [0, 3, 5], [2, 0, 2]]
    """
    sizes = np.asarray(sizes, np.int64)
    counts = -(-sizes // chunk)
    leaf = np.repeat(np.arange(sizes.size, dtype=np.int64), counts)
    first = np.cumsum(counts) - counts  # row of each leaf's first piece
    start = (np.arange(leaf.size, dtype=np.int64) - first[leaf]) * chunk
    stop = np.minimum(start + chunk, sizes[leaf])
    return np.ascontiguousarray(np.stack([leaf, start, stop], axis=1))
