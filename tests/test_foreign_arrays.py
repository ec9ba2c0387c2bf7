"""Leaves from other libraries: updated in place through zero-copy NumPy views (DLPack, the
buffer protocol, the array interface), refused with an error that says what to do when they
cannot be written (read-only exports, immutable JAX arrays) or are no arrays at all."""

from __future__ import annotations

import array
import copy

import numpy as np
import pytest

import adamnp

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
    with pytest.raises(TypeError, match=r"view the bits as ml_dtypes.bfloat16"):
        adamnp.init(torch.zeros(3, dtype=torch.bfloat16), cfg, backend=backend)


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
