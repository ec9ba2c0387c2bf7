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
# float16 ("_f16") and bfloat16 ("_bf16") params: the float32-moment step and the reduction
# over half gradients (.half), and the 8-bit kernels built for each format at the block sizes
# of 4 and 16 elements per thread.
HALF_KERNELS = tuple(f"{k}_{h}" for k in ("adam_step_half", "grad_stats_half")
                     for h in ("f16", "bf16"))  # fmt: skip
Q8_HALF_KERNELS = tuple(f"adam_step_q8{fmt}_bs{bs}_{h}" for fmt in ("", "_sqrt")
                        for bs in (64, 4096) for h in ("f16", "bf16"))  # fmt: skip
ALL_Q8 = Q8_KERNELS + Q8_HALF_KERNELS
ALL = KERNELS + HALF_KERNELS + ALL_Q8
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


@functools.cache
def _signatures() -> dict:
    from adamnp.backends.cuda import half, q8, q8_sqrt

    out = {**_fp32().signatures(), **q8.signatures(), **q8_sqrt.signatures()}
    out.update(half.signatures())
    for h in (0, 1):
        out.update(q8.signatures((64, 4096), h))
        out.update(q8_sqrt.signatures((64, 4096), h))
    return out


@pytest.fixture(autouse=True)
def _no_gpu_needed(monkeypatch):
    # Compiling a kernel that calls a device function asks numba-cuda for the current
    # device's compute capability, even for compile_ptx; answer for the target instead.
    from numba.cuda import dispatcher

    monkeypatch.setattr(dispatcher, "get_current_device", lambda: _Device((8, 0)))


def test_every_kernel_is_listed():
    assert set(_signatures()) == set(ALL)


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("name", ALL)
def test_kernel_compiles_to_ptx(name, cc):
    for ptx in _ptx(name, cc):
        assert f".target sm_{cc[0]}{cc[1]}" in ptx
        assert ".entry" in ptx
        # Exact arithmetic: no multiply-add contraction (the reference rounds every operation).
        assert "fma." not in ptx


@pytest.mark.parametrize("name", ALL_Q8)
def test_q8_values_stay_in_registers(name):
    # The 8-bit kernels keep each thread's elements of a tile in per-thread arrays between
    # the absmax reduction and the requantization: fully unrolled, they are registers. A
    # `.local` declaration would mean they went to (cached) local memory instead.
    for ptx in _ptx(name, (9, 0)):
        assert ".local" not in ptx
        assert "shfl.sync.bfly" in ptx and "atom.shared.max" in ptx


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("name", [f"adam_step_q8{fmt}_bs{bs}" for fmt in ("", "_sqrt")
                                  for bs in (64, 1024)]
                         + [n for n in Q8_HALF_KERNELS if "_bs64_" in n])  # fmt: skip
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


@pytest.mark.parametrize("name", [n for n in ALL_Q8 if "_sqrt_" in n]
                         + [n for n in HALF_KERNELS if "adam_step" in n])  # fmt: skip
def test_q8_sqrt_is_float32_only(name):
    # The "sqrt" kernel's arithmetic is float32 and int32 (numba-cuda widens Python float
    # literals and int/float mixes to float64; every constant is cast): no f64 instruction.
    for ptx in _ptx(name, (9, 0)):
        assert ".f64" not in ptx


def test_half_params_are_read_as_bits():
    # Half params and gradients are loaded and stored as 16-bit integers and converted by
    # the integer code of adamnp.lowbit.half, never by cvt instructions of the f16 type
    # (whose rounding is the hardware's, not the reference's).
    for name in ("adam_step_half_f16", "adam_step_q8_bs64_bf16", "adam_step_q8_sqrt_bs64_f16"):
        (ptx,) = _ptx(name, (9, 0))
        assert re.search(r"\bld(\.global)?\.u16", ptx), name
        assert re.search(r"\bst(\.global)?\.u16", ptx), name
        assert ".f16" not in ptx and ".bf16" not in ptx, name


def _ptxas() -> str | None:
    found = shutil.which("ptxas")
    if found is None and os.path.exists("/usr/local/cuda/bin/ptxas"):
        found = "/usr/local/cuda/bin/ptxas"
    return found


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("name", ALL)
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
