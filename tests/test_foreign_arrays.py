"""Leaves from other libraries: updated in place through zero-copy NumPy views (DLPack, the
buffer protocol, the array interface), refused with an error that says what to do when they
cannot be written (read-only exports, immutable JAX arrays) or are no arrays at all."""

from __future__ import annotations

import array
import copy
import ctypes
import sys

import numpy as np
import pytest

import adamnp
from adamnp import _dlpack

BACKENDS = ["numpy", "numba"]


class DLPackOnly:
    """An array of another library as adamnp sees it: nothing but the DLPack protocol."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class FakeJaxArray(DLPackOnly):
    pass


FakeJaxArray.__module__ = "jaxlib.xla_extension"  # what adamnp recognizes JAX arrays by


def _reference_run(p0, grads, backend, cfg):
    p = p0.copy()
    state = adamnp.init(p, cfg, backend=backend)
    for g in grads:
        adamnp.step(p, g, state)
    return p, state


def _grads(n, steps=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dlpack_params_and_grads_update_in_place(backend):
    cfg = adamnp.adamw(lr=1e-2)
    grads = _grads(5000)
    p0 = np.linspace(-1, 1, 5000, dtype=np.float32)
    want, _ = _reference_run(p0, grads, backend, cfg)
    memory = p0.copy()
    params = {"w": DLPackOnly(memory)}
    state = adamnp.init(params, cfg, backend=backend)
    for g in grads:
        adamnp.step(params, {"w": DLPackOnly(g)}, state)
    assert np.array_equal(memory, want)  # the producer's own memory holds the result


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffer_protocol_params(backend):
    cfg = adamnp.adam(lr=0.5)
    buf = array.array("f", [1.0, 2.0, 3.0])
    state = adamnp.init(buf, cfg, backend=backend)
    adamnp.step(buf, memoryview(array.array("f", [1.0, 1.0, -1.0])), state)
    want = np.float32([1.0, 2.0, 3.0])
    adamnp.step(want, np.float32([1.0, 1.0, -1.0]), adamnp.init(want, cfg, backend=backend))
    assert np.array_equal(np.asarray(buf), want)


def test_read_only_grads_are_accepted_without_a_copy():
    g = np.ones(4, np.float32)
    g.flags.writeable = False
    p = np.zeros(4, np.float32)
    state = adamnp.init(p, adamnp.adamw(lr=0.1), backend="numpy")
    adamnp.step(p, DLPackOnly(g), state)
    assert np.allclose(p, -0.1)


def _snapshot(state):
    return [b.copy() for grp in state.groups for b in grp.buffers.values()], state.step


def _same(state, snap):
    bufs, step = snap
    now = [b for grp in state.groups for b in grp.buffers.values()]
    return step == state.step and all(np.array_equal(a, b) for a, b in zip(bufs, now))


def test_read_only_params_are_refused_and_nothing_changes():
    frozen = np.zeros(4, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\['w'\] is a .*DLPackOnly exported read-only"):
        adamnp.init({"w": DLPackOnly(frozen)}, adamnp.adamw(), backend="numpy")
    p = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}
    state = adamnp.init(p, adamnp.adamw(), backend="numpy")
    adamnp.step(p, {"w": np.ones(4, np.float32), "b": np.ones(2, np.float32)}, state)
    before, snap = copy.deepcopy(p), _snapshot(state)
    with pytest.raises(ValueError, match=r"params\['w'\] is a .* exported read-only"):
        adamnp.step(
            {"w": DLPackOnly(frozen), "b": p["b"]},
            {"w": np.ones(4, np.float32), "b": np.ones(2, np.float32)},
            state,
        )
    assert np.array_equal(p["b"], before["b"]) and _same(state, snap)


def test_jax_arrays_are_refused_as_params_with_what_to_do():
    with pytest.raises(ValueError, match=r"immutable.*Keep params as NumPy arrays"):
        adamnp.init(FakeJaxArray(np.zeros(3, np.float32)), adamnp.adamw(), backend="numpy")
    p = np.zeros(3, np.float32)
    state = adamnp.init(p, adamnp.adamw(lr=0.1), backend="numpy")
    adamnp.step(p, FakeJaxArray(np.ones(3, np.float32)), state)  # JAX grads are fine
    assert np.allclose(p, -0.1)


@pytest.mark.parametrize(
    ("leaf", "match"),
    [
        (3.0, r"params\['w'\] is a builtins.float, not an array .* neither DLPack"),
        ("abc", r"params\['w'\] is a builtins.str"),
        (object(), r"params\['w'\] is a builtins.object, not an array"),
    ],
)
def test_non_arrays_name_the_type_and_the_fix(leaf, match):
    with pytest.raises(TypeError, match=match) as info:
        adamnp.init({"w": leaf}, adamnp.adamw(), backend="numpy")
    assert "DLPack or the buffer protocol" in str(info.value)


def test_real_jax_arrays():
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(ValueError, match="immutable"):
        adamnp.init(jnp.zeros(3, jnp.float32), adamnp.adamw(), backend="numpy")
    p = np.zeros(3, np.float32)
    state = adamnp.init(p, adamnp.adamw(lr=0.1), backend="numpy")
    adamnp.step(p, jnp.ones(3, jnp.float32), state)
    assert np.allclose(p, -0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_cpu_tensors(backend):
    torch = pytest.importorskip("torch")
    cfg = adamnp.adamw(lr=1e-2)
    grads = _grads(3000)
    p0 = np.linspace(-1, 1, 3000, dtype=np.float32)
    want, _ = _reference_run(p0, grads, backend, cfg)
    t = torch.from_numpy(p0.copy())
    state = adamnp.init(t, cfg, backend=backend)
    for g in grads:
        adamnp.step(t, torch.from_numpy(g), state)
    assert np.array_equal(t.numpy(), want)
    with pytest.raises(TypeError, match=r"p.detach\(\) shares its memory"):
        adamnp.init(torch.zeros(3, requires_grad=True), cfg, backend=backend)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf = torch.from_numpy(p0.copy()).to(torch.bfloat16)  # through DLPack, in place
    bf_grads = [torch.from_numpy(g).to(torch.bfloat16) for g in grads]
    want, _ = _reference_run(bf.float().numpy().astype(ml_dtypes.bfloat16), [
        g.view(torch.int16).numpy().view(ml_dtypes.bfloat16) for g in bf_grads
    ], backend, cfg)  # fmt: skip
    address = bf.data_ptr()
    state = adamnp.init(bf, cfg, backend=backend)
    for g in bf_grads:
        adamnp.step(bf, g, state)
    assert bf.data_ptr() == address
    assert np.array_equal(bf.view(torch.int16).numpy(), want.view(np.int16))


def test_torch_float16_and_bfloat16_views():
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    cfg = adamnp.adamw(lr=0.25)
    half = torch.zeros(3, dtype=torch.float16)
    state = adamnp.init(half, cfg, backend="numpy")
    adamnp.step(half, torch.ones(3, dtype=torch.float16), state)
    assert torch.equal(half, torch.full((3,), -0.25, dtype=torch.float16))
    bf = torch.zeros(3, dtype=torch.bfloat16)
    view = bf.view(torch.int16).numpy().view(ml_dtypes.bfloat16)  # the recipe of the error
    state = adamnp.init(view, cfg, backend="numpy")
    adamnp.step(view, np.ones(3, np.float32), state)
    assert torch.equal(bf, torch.full((3,), -0.25, dtype=torch.bfloat16))


@pytest.mark.parametrize("typestr", ["<V2", "|V2"])
def test_a_device_arrays_two_byte_void_is_bfloat16(typestr):
    """torch exports a bfloat16 CUDA tensor's ``__cuda_array_interface__`` typestr as a
    two-byte void; validation and the CUDA backend read it as bfloat16 (with ml_dtypes)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from types import SimpleNamespace

    from adamnp._validate import dtype_shape

    leaf = SimpleNamespace(__cuda_array_interface__={"typestr": typestr, "shape": (3, 4)})
    assert dtype_shape(leaf) == (np.dtype(ml_dtypes.bfloat16), (3, 4))
    other = SimpleNamespace(__cuda_array_interface__={"typestr": "<V4", "shape": (2,)})
    assert dtype_shape(other) == (np.dtype("V4"), (2,))


# -- bfloat16 through DLPack (NumPy has no bfloat16: adamnp._dlpack reads the capsule)

_CAPSULE_NAMES = {False: b"dltensor", True: b"dltensor_versioned"}  # alive as long as capsules
_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype = ctypes.py_object
_new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class BFloat16Producer:
    """A bfloat16 CPU tensor of another library: DLPack capsules (DLPack 0.x, or 1.0 when
    asked for with ``max_version``) around the uint16 ``bits``, which it owns. ``capsule``
    overrides fields of what the capsule declares (a producer that lies)."""

    def __init__(self, bits, *, versioned=False, read_only=False, **capsule):
        self.bits, self.versioned, self.read_only, self.capsule = (
            bits,
            versioned,
            read_only,
            capsule,
        )
        self._structs = []

    def __dlpack__(self, max_version=None, **kwargs):
        b = self.bits
        ndim = self.capsule.get("ndim", b.ndim)
        shape = (ctypes.c_int64 * b.ndim)(*self.capsule.get("shape", b.shape))
        strides = (ctypes.c_int64 * b.ndim)(*(s // b.itemsize for s in b.strides))
        device = _dlpack._Device(self.capsule.get("device", _dlpack.KDL_CPU), 0)
        code = self.capsule.get("code", _dlpack.KDL_BFLOAT)
        tensor = _dlpack._Tensor(b.ctypes.data, device, ndim, _dlpack._DataType(code, 16, 1),
                                 shape, strides, 0)  # fmt: skip
        versioned = self.versioned and max_version is not None
        if versioned:
            flags = _dlpack.READ_ONLY if self.read_only else 0
            managed = _dlpack._ManagedVersioned(_dlpack._Version(1, 0), None, None, flags, tensor)
        else:
            managed = _dlpack._Managed(tensor, None, None)
        self._structs += [shape, strides, managed]  # no deleter: this object owns them
        return _new_capsule(ctypes.addressof(managed), _CAPSULE_NAMES[versioned], None)

    def __dlpack_device__(self):
        return (_dlpack.KDL_CPU, 0)


def _bf16(x):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("versioned", [False, True])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_bfloat16_dlpack_params_update_in_place(backend, versioned, rounding):
    cfg = adamnp.adamw(lr=1e-2, param_rounding=rounding)
    p0 = _bf16(np.linspace(-1, 1, 3000).reshape(60, 50))
    # bfloat16 gradients (through DLPack below) and float32 ones, alternately
    grads = [_bf16(g).reshape(60, 50) for g in _grads(3000, steps=4)]
    grads = [g if i % 2 == 0 else g.astype(np.float32) for i, g in enumerate(grads)]
    want, _ = _reference_run(p0, grads, backend, cfg)  # ml_dtypes arrays
    memory = p0.view(np.uint16).copy()
    params = {"w": BFloat16Producer(memory, versioned=versioned)}
    state = adamnp.init(params, cfg, backend=backend)
    for g in grads:
        g_leaf = BFloat16Producer(g.view(np.uint16)) if g.itemsize == 2 else g
        adamnp.step(params, {"w": g_leaf}, state)
    assert np.array_equal(memory, want.view(np.uint16))  # the producer's memory holds it


def test_bfloat16_dlpack_read_only_params_are_refused_and_grads_accepted():
    frozen = _bf16(np.zeros(4)).view(np.uint16)
    producer = BFloat16Producer(frozen, versioned=True, read_only=True)
    with pytest.raises(ValueError, match=r"params is a .*BFloat16Producer exported read-only"):
        adamnp.init(producer, adamnp.adamw(), backend="numpy")
    p = _bf16(np.zeros(4))
    state = adamnp.init(p, adamnp.adamw(lr=0.5), backend="numpy")
    adamnp.step(p, BFloat16Producer(_bf16(np.ones(4)).view(np.uint16), versioned=True,
                                    read_only=True), state)  # fmt: skip
    assert np.array_equal(p.astype(np.float32), np.full(4, -0.5, np.float32))


@pytest.mark.parametrize(
    ("lie", "match"),
    [
        ({"device": 2}, "lives on DLPack device type 2, not the CPU"),
        ({"ndim": 65}, "declares 65 dimensions"),
        ({"ndim": -1}, "declares -1 dimensions"),
        ({"shape": (-3,)}, r"declares the shape \(-3,\)"),
    ],
)
def test_bfloat16_dlpack_exports_are_checked_before_use(lie, match):
    producer = BFloat16Producer(np.zeros(3, np.uint16), **lie)
    with pytest.raises(TypeError, match=match):
        adamnp.init(producer, adamnp.adamw(), backend="numpy")


def test_bfloat16_dlpack_without_ml_dtypes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes raises
    producer = BFloat16Producer(np.zeros(3, np.uint16))
    with pytest.raises(TypeError, match=r"pip install ml_dtypes"):
        adamnp.init(producer, adamnp.adamw(), backend="numpy")


def test_other_dlpack_dtypes_keep_numpys_reason():
    producer = BFloat16Producer(np.zeros(3, np.uint16), code=6)  # kDLBool 16 bits: nonsense
    with pytest.raises(TypeError, match=r"NumPy cannot import it through DLPack") as info:
        adamnp.init(producer, adamnp.adamw(), backend="numpy")
    assert "type code" not in str(info.value)
