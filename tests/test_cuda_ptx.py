"""Every CUDA kernel compiles to real PTX for sm_80 and sm_90 (NVVM) and assembles (ptxas).

No GPU is needed. Runs in the main test process, never in the simulator's (the simulator
replaces numba.cuda). A kernel that stops compiling fails here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

if importlib.util.find_spec("numba_cuda") is None:
    pytest.skip("numba-cuda is not installed (adamnp[cuda])", allow_module_level=True)

KERNELS = ("adam_step", "grad_stats", "fill", "traffic", "traffic_q8")
BLOCK_SIZES = (64, 256, 1024, 4096)
# 8-bit kernels, both state formats ("bnb": .q8, "sqrt": .q8_sqrt), one per block size.
Q8_KERNELS = tuple(f"adam_step_q8{fmt}_bs{bs}" for fmt in ("", "_sqrt") for bs in BLOCK_SIZES)
CCS = ((8, 0), (9, 0))


class _Device:
    """What numba-cuda asks the current device while compiling a device function."""

    def __init__(self, cc):
        self.compute_capability = cc


@functools.cache
def _ptx(name: str, cc: tuple, exact: bool = True) -> list[str]:
    from numba import cuda

    k = _fp32().build()
    assert not k.sim, "the PTX tests must not run under NUMBA_ENABLE_CUDASIM"
    kernel, sigs = _signatures()[name]
    with k.exact_arithmetic() if exact else contextlib.nullcontext():
        bounds = kernel.targetoptions.get("launch_bounds")  # as the kernel is compiled
        return [
            cuda.compile_ptx(kernel.py_func, sig, cc=cc, launch_bounds=bounds)[0] for sig in sigs
        ]


def _fp32():
    from adamnp.backends.cuda import fp32

    return fp32


def _signatures() -> dict:
    from adamnp.backends.cuda import q8, q8_sqrt

    return {**_fp32().signatures(), **q8.signatures(), **q8_sqrt.signatures()}


@pytest.fixture(autouse=True)
def _no_gpu_needed(monkeypatch):
    # Compiling a kernel that calls a device function asks numba-cuda for the current
    # device's compute capability, even for compile_ptx; answer for the target instead.
    from numba.cuda import dispatcher

    monkeypatch.setattr(dispatcher, "get_current_device", lambda: _Device((8, 0)))


def test_every_kernel_is_listed():
    assert set(_signatures()) == set(KERNELS + Q8_KERNELS)


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("name", KERNELS + Q8_KERNELS)
def test_kernel_compiles_to_ptx(name, cc):
    for ptx in _ptx(name, cc):
        assert f".target sm_{cc[0]}{cc[1]}" in ptx
        assert ".entry" in ptx
        # Exact arithmetic: no multiply-add contraction (the reference rounds every operation).
        assert "fma." not in ptx


@pytest.mark.parametrize("name", Q8_KERNELS)
def test_q8_values_stay_in_registers(name):
    # The 8-bit kernels keep each thread's elements of a tile in per-thread arrays between
    # the absmax reduction and the requantization: fully unrolled, they are registers. A
    # `.local` declaration would mean they went to (cached) local memory instead.
    for ptx in _ptx(name, (9, 0)):
        assert ".local" not in ptx
        assert "shfl.sync.bfly" in ptx and "atom.shared.max" in ptx


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("name", [f"adam_step_q8{fmt}_bs{bs}" for fmt in ("", "_sqrt")
                                  for bs in (64, 1024)])  # fmt: skip
def test_q8_launch_bounds_hold_without_spills(name, cc, tmp_path):
    # 4 elements per thread: at most 64 registers, so 4 blocks of 256 threads (and, for
    # "bnb", their 4 x 36 KiB of shared memory) fit on one SM; the bound must not cost spills.
    (ptx,) = _ptx(name, cc)
    assert ".maxntid 256, 1, 1" in ptx and ".minnctapersm 4" in ptx
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas not found")
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    run = subprocess.run([ptxas, "-v", f"-arch=sm_{cc[0]}{cc[1]}", str(src), "-o",
                          str(tmp_path / "k.cubin")], capture_output=True, text=True)  # fmt: skip
    if run.returncode and re.search(r"Unsupported \.version|newer than", run.stderr):
        pytest.skip(f"{ptxas} is older than the PTX NVVM emits")
    assert run.returncode == 0, run.stderr
    registers = int(re.search(r"Used (\d+) registers", run.stderr).group(1))
    assert registers <= 64 and "0 bytes spill stores" in run.stderr, run.stderr


def test_contraction_is_what_exact_arithmetic_removes():
    # Control for the check above: NVVM's default fuses the Adam step's multiply-adds.
    assert all("fma.rn" in ptx for ptx in _ptx("adam_step", (9, 0), exact=False))
    assert all("fma.rn" in ptx for ptx in _ptx("adam_step_q8_bs256", (9, 0), exact=False))
    assert all("fma.rn" in ptx for ptx in _ptx("adam_step_q8_sqrt_bs256", (9, 0), exact=False))


@pytest.mark.parametrize("name", [n for n in Q8_KERNELS if "_sqrt_" in n])
def test_q8_sqrt_is_float32_only(name):
    # The "sqrt" kernel's arithmetic is float32 and int32 (numba-cuda widens Python float
    # literals and int/float mixes to float64; every constant is cast): no f64 instruction.
    for ptx in _ptx(name, (9, 0)):
        assert ".f64" not in ptx


def _ptxas() -> str | None:
    found = shutil.which("ptxas")
    if found is None and os.path.exists("/usr/local/cuda/bin/ptxas"):
        found = "/usr/local/cuda/bin/ptxas"
    return found


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("name", KERNELS + Q8_KERNELS)
def test_ptx_assembles(name, cc, tmp_path):
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas not found (install the CUDA toolkit or put ptxas on PATH)")
    arch = f"sm_{cc[0]}{cc[1]}"
    for i, ptx in enumerate(_ptx(name, cc)):
        src = tmp_path / f"{name}{i}.ptx"
        src.write_text(ptx)
        run = subprocess.run(
            [ptxas, f"-arch={arch}", str(src), "-o", str(tmp_path / f"{name}{i}.cubin")],
            capture_output=True,
            text=True,
        )
        if run.returncode and re.search(r"Unsupported \.version|newer than", run.stderr):
            pytest.skip(f"{ptxas} is older than the PTX NVVM emits: {run.stderr.strip()}")
        assert run.returncode == 0, run.stderr
