"""The CUDA backend without a GPU: its simulator suite (own process), import hygiene, and the
handling of ``__cuda_array_interface__`` objects, which needs no numba-cuda at all."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import adamnp
from adamnp.backends import cuda as be

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None


def _python(code: str, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.skipif(not HAVE_NUMBA_CUDA, reason="numba-cuda is not installed (adamnp[cuda])")
def test_simulator_suite():
    # NUMBA_ENABLE_CUDASIM must be set before numba is imported: a process of its own.
    run = _python(
        "import sys, pytest; "
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/cuda_sim']))",
        NUMBA_ENABLE_CUDASIM="1",
    )
    assert run.returncode == 0, run.stdout[-10000:] + run.stderr[-5000:]
    assert " passed" in run.stdout and "no tests ran" not in run.stdout


def test_import_adamnp_does_not_import_numba_cuda():
    run = _python(
        """
        import sys, numpy as np, adamnp
        p = np.ones(3, np.float32)
        s = adamnp.init(p, adamnp.adamw())
        adamnp.step(p, np.ones(3, np.float32), s)
        # the backend's modules import numba-cuda lazily too (their kernels' build() does)
        import adamnp.backends.cuda, adamnp.backends.cuda.fp32, adamnp.backends.cuda.q8
        import adamnp.backends.cuda.q8_sqrt, adamnp.backends.cuda.util
        bad = sorted(m for m in sys.modules if m.startswith(("numba.cuda", "numba_cuda")))
        assert not bad, bad
        """
    )
    assert run.returncode == 0, run.stderr


class DeviceArray:
    """A stand-in for a CuPy array or a PyTorch CUDA tensor: only the CUDA interface."""

    def __init__(self, shape, typestr="<f4", ptr=1 << 40, strides=None, readonly=False):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": typestr,
            "data": (ptr, readonly),
            "strides": strides,
            "version": 3,
        }
        self.dtype = object()  # like torch.float32: not a NumPy dtype
        self.shape = tuple(shape)


def test_interface_helpers():
    a = DeviceArray((4, 6))
    assert be.owns(a) and not be.owns(np.zeros(3))
    assert be.address_range(a) == (1 << 40, (1 << 40) + 96)
    assert be.is_contiguous(a) and be.is_writeable(a)
    assert be.is_contiguous(DeviceArray((4, 6), strides=(24, 4)))
    assert be.is_contiguous(DeviceArray((4, 1), strides=(4, 999)))  # size-1 dims: any stride
    assert be.is_contiguous(DeviceArray((0, 6), strides=(4, 16)))
    assert not be.is_contiguous(DeviceArray((4, 6), strides=(4, 16)))  # Fortran order
    assert not be.is_contiguous(DeviceArray((4, 3), strides=(48, 8)))  # every other column
    assert not be.is_writeable(DeviceArray((3,), readonly=True))
    assert be.address_range(DeviceArray((5,), "<f8", ptr=None)) == (0, 40)


def test_device_leaves_in_a_host_state_are_named():
    p = {"w": np.zeros(6, np.float32)}
    state = adamnp.init(p, adamnp.adam(), backend="numpy")
    with pytest.raises(TypeError, match=r"grads\['w'\] is a CUDA device array, but this state "
                       "uses the 'numpy' backend"):  # fmt: skip
        adamnp.step(p, {"w": DeviceArray((6,))}, state)


def test_unusable_cuda_backend_is_explained(monkeypatch):
    leaf = DeviceArray((6,))
    if be.availability() is None:
        pytest.skip("a GPU is present: the cuda backend is usable here")
    why = be.availability()
    with pytest.raises(RuntimeError, match="params hold CUDA device arrays, but the 'cuda' "
                       "backend cannot run here"):  # fmt: skip
        adamnp.init({"w": leaf}, adamnp.adam())
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        adamnp.init({"w": leaf}, adamnp.adam(), backend="cuda")
    assert "GPU" in why or "adamnp[cuda]" in why
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert be.availability() == f"numba-cuda is not installed; {be.INSTALL}"
    with pytest.raises(RuntimeError, match=r'pip install "adamnp\[cuda\]"'):
        adamnp.init({"w": leaf}, adamnp.adam())


def test_device_dtype_and_shape_come_from_the_interface():
    from adamnp._validate import dtype_shape as _dtype_shape

    assert _dtype_shape(DeviceArray((2, 3), "<f8")) == (np.dtype(np.float64), (2, 3))
    assert _dtype_shape(np.zeros((4,), np.float32)) == (np.dtype(np.float32), (4,))


def test_q8_grid_is_the_resident_block_count():
    # The 8-bit kernel loops over tiles: after its first launch the grid is the occupancy
    # of the compiled kernel (as many blocks as fit at once), never more than the tiles.
    from types import SimpleNamespace

    calls = []

    def occupancy(threads):
        calls.append(threads)
        return 396

    kernel = SimpleNamespace(overloads={"sig": SimpleNamespace(
        max_cooperative_grid_blocks=occupancy)})  # fmt: skip
    q = SimpleNamespace(grid_cap=None, adam_step_q8=kernel, threads=256)
    plan = SimpleNamespace(nchunks=10_000, q8=SimpleNamespace(resident=None))
    assert be._q8_grid(q, plan) == 396 and be._q8_grid(q, plan) == 396
    assert calls == [256]  # asked once, then kept in the plan
    plan.nchunks = 7
    assert be._q8_grid(q, plan) == 7
    # The "sqrt" kernel's launch asks its own kernel (the plan of a group of that format).
    sqrt_kernel = SimpleNamespace(overloads={"sig": SimpleNamespace(
        max_cooperative_grid_blocks=lambda threads: 500)})  # fmt: skip
    q_sqrt = SimpleNamespace(grid_cap=None, adam_step_q8_sqrt=sqrt_kernel, threads=256)
    plan = SimpleNamespace(nchunks=10_000, q8=SimpleNamespace(resident=None))
    assert be._q8_grid(q_sqrt, plan, sqrt_kernel) == 500
