"""The Numba CPU backend: multi-tensor dispatch, threads, memory, reductions, generated code.

Agreement with the NumPy reference is in test_backends_agree.py; this file checks what is
particular to the Numba kernels.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import re
import subprocess
import sys
import textwrap
import tracemalloc
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

import adamnp
from adamnp import backends

if not backends.available("numba"):
    pytest.skip("the numba backend is not available", allow_module_level=True)

import llvmlite.binding
import numba

from adamnp.backends import numba as numba_cpu
from adamnp.backends.numba import schedule
from adamnp.backends.numba import util as _numba_util

ROOT = Path(__file__).resolve().parents[1]


def tree(n_leaves, rng, sizes=(1, 100, 5000), dtypes=(np.float32,)):
    return {
        f"l{i:04d}": rng.standard_normal(sizes[i % len(sizes)]).astype(dtypes[i % len(dtypes)])
        for i in range(n_leaves)
    }


def like(params, rng):
    return {k: rng.standard_normal(a.shape).astype(a.dtype) for k, a in params.items()}


def test_one_compiled_call_per_group(monkeypatch):
    calls = []
    kernel = numba_cpu.step_fp32
    monkeypatch.setattr(numba_cpu, "step_fp32", lambda *a: calls.append(a[0].shape) or kernel(*a))
    rng = np.random.default_rng(0)
    params = tree(500, rng, dtypes=(np.float32, np.float64))
    state = adamnp.init(params, adamnp.adamw(), backend="numba")
    adamnp.step(params, like(params, rng), state)
    assert len(state.groups) == 2 and len(calls) == 2  # 500 leaves, two dtypes, two calls
    assert sum(rows for rows, _ in calls) == 500  # all leaves below CHUNK: one chunk each


def _run_steps(params, grads, cfg, threads, **init):
    numba.set_num_threads(threads)
    try:
        params = {k: a.copy() for k, a in params.items()}
        state = adamnp.init(params, cfg, backend="numba", **init)
        for g in grads:
            adamnp.step(params, g, state)
        norm = numba_cpu.grad_sq_norm(list(grads[0].values()))
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    bufs = [b.tobytes() for grp in state.groups for b in grp.buffers.values()]
    return [a.tobytes() for a in params.values()], bufs, norm.hex()


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 threads")
def test_results_do_not_depend_on_threads(monkeypatch):
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN", 1)  # use every thread even for small trees
    rng = np.random.default_rng(1)
    params = tree(40, rng, sizes=(3, 40_000, 70_001), dtypes=(np.float32, np.float64))
    grads = [like(params, rng) for _ in range(3)]
    cfg = adamnp.adamw(amsgrad=True, max_grad_norm=10.0)
    one = _run_steps(params, grads, cfg, 1)
    assert _run_steps(params, grads, cfg, numba.config.NUMBA_NUM_THREADS) == one


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 threads")
@pytest.mark.parametrize("block_size", [64, 4096])
@pytest.mark.parametrize("fmt", ["sqrt", "bnb"])
def test_8bit_results_do_not_depend_on_threads(monkeypatch, block_size, fmt):
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN", 1)
    rng = np.random.default_rng(8)
    params = tree(12, rng, sizes=(3, 40_000, 70_001, 4097))
    grads = [like(params, rng) for _ in range(3)]
    grads[1]["l0001"][123] = np.nan  # a NaN block, kept with "propagate"
    cfg = adamnp.adamw(amsgrad=True, nonfinite="propagate")
    init = dict(state_bits=8, block_size=block_size, min_8bit_size=1, state_format=fmt)
    one = _run_steps(params, grads, cfg, 1, **init)
    assert _run_steps(params, grads, cfg, numba.config.NUMBA_NUM_THREADS, **init) == one


@pytest.mark.parametrize("fmt", ["sqrt", "bnb"])
def test_one_compiled_call_per_8bit_group(monkeypatch, fmt):
    calls = []
    # bnb: the gather kernel or the AVX-512 VBMI one
    for name in ("step_q8", "step_q8_simd", "step_q8_sqrt"):
        kernel = getattr(numba_cpu, name)
        recorder = functools.partial(lambda k, *a: calls.append(a[0].shape) or k(*a), kernel)
        monkeypatch.setattr(numba_cpu, name, recorder)
    rng = np.random.default_rng(9)
    params = tree(300, rng, sizes=(1, 100, 5000, 70_000))
    state = adamnp.init(params, adamnp.adamw(), backend="numba", state_bits=8, min_8bit_size=1,
                        state_format=fmt)  # fmt: skip
    adamnp.step(params, like(params, rng), state)
    # one call per batch of about BATCH_ELEMENTS elements (5.6M here: 11), never per leaf
    table = numba_cpu._CHUNKS[state.groups[0]]
    assert [g.kind for g in state.groups] == ["q8"]
    assert len(calls) == len(schedule.batch_bounds(table)) - 1 == 11
    assert sum(rows for rows, _ in calls) == 75 * 3 + 75 * 3  # a chunk per small leaf, 3 per 70K


def test_small_calls_restore_thread_count():
    before = numba.get_num_threads()
    p = np.ones(10, np.float32)
    state = adamnp.init(p, adamnp.adamw(max_grad_norm=1.0), backend="numba")
    adamnp.step(p, np.ones(10, np.float32), state)
    assert numba.get_num_threads() == before


def _vm_kb(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


@pytest.mark.parametrize("bits", [32, 8])
def test_step_allocates_nothing_proportional_to_size(bits):
    n = 4 << 20  # 16 MB per float32 array
    rng = np.random.default_rng(2)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    cfg = adamnp.adamw(amsgrad=True, max_grad_norm=1.0)
    state = adamnp.init(p, cfg, backend="numba", state_bits=bits, block_size=4096)
    adamnp.step(p, g, state)  # compile, touch the state's pages
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        adamnp.step(p, g, state)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"a step allocated {peak} bytes through Python/NumPy"
    try:  # peak resident memory also covers Numba's own allocator: reset it, step, read it
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here (needs Linux /proc/self/clear_refs)")
    rss = _vm_kb("VmRSS")
    adamnp.step(p, g, state)
    grown = _vm_kb("VmHWM") - rss
    assert grown < 4096, f"peak RSS grew by {grown} kB during a step of 4M elements"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_leaf_finds_the_first_bad_leaf(dtype):
    # "bad": NaN, Inf, or a magnitude at or above grad_limit (whose square may overflow v)
    from adamnp.backends.math import grad_limit

    info = np.finfo(dtype)
    limit = np.dtype(dtype).type(grad_limit(dtype))
    top = np.nextafter(limit, np.dtype(dtype).type(0))  # the largest magnitude that passes
    chunk = _numba_util.CHUNK
    grads = [np.zeros(n, dtype) for n in (5, 1, chunk + 3, 3 * chunk, 0, 17)]
    fine = [top, -top, info.smallest_subnormal, -0.0, info.tiny]
    for g in grads:
        g[: len(fine)] = fine[: g.size]
    assert numba_cpu.nonfinite_leaf(grads) == -1
    assert numba_cpu.nonfinite_leaf([]) == -1
    size = np.dtype(dtype).itemsize
    signaling = np.array([{4: 0x7F800001, 8: 0x7FF0000000000001}[size]], f"u{size}").view(dtype)
    for bad in (np.nan, -np.nan, np.inf, -np.inf, signaling[0], limit, -limit, info.max):
        for leaf, pos in ((0, 0), (2, chunk - 1), (2, chunk), (3, 3 * chunk - 1), (5, 16)):
            trial = [g.copy() for g in grads]
            trial[leaf][pos] = bad
            trial[-1][0] = np.inf  # a later bad leaf does not matter
            assert numba_cpu.nonfinite_leaf(trial) == leaf, (bad, leaf, pos)


def test_grad_sq_norm_is_accurate_and_reproducible():
    rng = np.random.default_rng(4)
    grads = [rng.standard_normal(n).astype(d) for n, d in ((100_003, np.float32), (7, np.float64))]
    grads += [np.zeros(0, np.float32), np.full(3 * _numba_util.CHUNK + 5, 1e-3, np.float32)]
    exact = math.fsum(float(x) ** 2 for g in grads for x in g.astype(np.float64))
    got = numba_cpu.grad_sq_norm(grads)
    assert got == pytest.approx(exact, rel=1e-14)
    assert all(numba_cpu.grad_sq_norm(grads) == got for _ in range(3))
    assert numba_cpu.grad_sq_norm([]) == 0.0


@pytest.mark.parametrize("sizes", ["32", "16", "16+32", "16+32+64", "32+64"])
def test_grad_sq_norm_of_half_gradients_is_that_of_their_float32_values(sizes):
    # a half gradient is summed as the float32 it is upcast to: the same total, bit for bit,
    # whichever other element sizes share the call (each combination is its own compile)
    from adamnp.lowbit.half import bfloat16_dtype

    rng = np.random.default_rng(5)
    n = 2 * _numba_util.CHUNK + 9
    dtypes = {"16": [np.float16, bfloat16_dtype()], "32": [np.float32], "64": [np.float64]}
    grads = [
        (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3)).astype(d)
        for key in sizes.split("+")
        for d in dtypes[key]
    ]
    upcast = [g if g.itemsize > 2 else g.astype(np.float32) for g in grads]
    got = numba_cpu.grad_sq_norm(grads)
    assert got == numba_cpu.grad_sq_norm(upcast)
    exact = math.fsum(float(x) ** 2 for g in upcast for x in g.astype(np.float64))
    assert got == pytest.approx(exact, rel=1e-14)


def test_traffic_kernel_touches_what_a_step_touches():
    rng = np.random.default_rng(5)
    p, g, m, v = (rng.standard_normal(100_001).astype(np.float32) for _ in range(4))
    want = (p + g, m + g, v + g)
    g0 = g.copy()
    numba_cpu.traffic_kernel(p, g, m, v)
    for got, expected in zip((p, m, v), want):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(g, g0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_read_traffic_reads_every_element(dtype):
    """The check pass of ``traffic_kernel(..., check_pass=True)``: the or of all the bits,
    over chunks and batches (a bit set in one element only, anywhere, shows)."""
    from adamnp.backends.numba.fp32 import _UNSIGNED, _read_traffic

    n = 3 * schedule.BATCH_ELEMENTS + 12_345
    bits = np.zeros(n, _UNSIGNED[np.dtype(dtype).itemsize])
    table = _numba_util.chunk_table(np.array([n]))
    for at, bit in [(0, 0), (n // 2, 5), (n - 1, 9)]:
        bits[at] = 1 << bit
        results = schedule.run(_read_traffic, 2, table, bits)
        assert int(np.bitwise_or.reduce(np.array(results, bits.dtype))) == int(
            np.bitwise_or.reduce(bits)
        )
    g = bits.view(dtype)
    if dtype == np.float16:  # the half kernel adds on the bits of p, in float32 to m and v
        p, m, v = np.ones(n, dtype), np.ones(n, np.float32), np.zeros(n, np.float32)
        want = ((p.view(np.uint16) + bits).view(dtype), m + np.float32(bits), v + bits)
        numba_cpu.traffic_kernel_half(p, g, m, v, check_pass=True)
    else:
        p, m, v = np.ones(n, dtype), np.ones(n, dtype), np.zeros(n, dtype)
        want = (p + g, m + g, v + g)
        numba_cpu.traffic_kernel(p, g, m, v, check_pass=True)
    for got, expected in zip((p, m, v), want):
        np.testing.assert_array_equal(got, expected)


def test_traffic_kernel_q8_touches_what_an_8bit_step_touches():
    rng = np.random.default_rng(5)
    p, g = (rng.standard_normal(100_001).astype(np.float32) for _ in range(2))
    cm, cv = (rng.integers(0, 256, 100_001).astype(np.uint8) for _ in range(2))
    want = (p + g, cm + np.uint8(1), cv + np.uint8(1))  # uint8 wraps around like the kernel
    g0 = g.copy()
    numba_cpu.traffic_kernel_q8(p, g, cm, cv)
    for got, expected in zip((p, cm, cv), want):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(g, g0)


def test_unknown_group_kinds_are_refused():
    from adamnp._state import Layout, LeafGroup
    from adamnp.backends.math import host_scalars

    ids, offsets = np.zeros(1, np.int64), np.array([0, 4], np.int64)
    layout = Layout(4, "sqrt", 256, 1, "nearest", ())
    group = LeafGroup("q4", np.dtype(np.float32), ids, offsets, offsets, layout, {})
    p = [np.zeros(4, np.float32)]
    with pytest.raises(NotImplementedError, match="'q4'"):
        numba_cpu.step_group(group, p, p, host_scalars(adamnp.adamw(), 1, 1e-3))


@pytest.mark.parametrize("fast", [True, False])
def test_data_addresses(monkeypatch, fast):
    if not fast:
        monkeypatch.setattr(_numba_util, "_DATA_OFFSET", None)
    base = np.arange(100.0)
    arrays = [base, base[3:], base[:0], np.ones((2, 3), np.float32), np.array(1.0)]
    arrays = arrays * 3  # more than the short-list threshold
    want = [a.__array_interface__["data"][0] for a in arrays]
    assert _numba_util.data_addresses(arrays).tolist() == want


# -- the fast validation path in _api (taken for host backends) rejects what the full one does


def _big_tree(rng, n=100):
    params = {f"k{i:03d}": rng.standard_normal(8).astype(np.float32) for i in range(n)}
    return params, like(params, rng)


def test_fast_validation_rejects_aliasing_in_big_trees():
    rng = np.random.default_rng(6)
    params, grads = _big_tree(rng)
    state = adamnp.init(params, adamnp.adamw(), backend="numba")
    grads["k050"] = params["k010"][2:6].repeat(2)  # a copy: fine
    adamnp.step(params, grads, state)
    grads["k050"] = np.concatenate([params["k049"], params["k051"]])[4:12]  # still a copy
    adamnp.step(params, grads, state)
    whole = np.zeros(16, np.float32)
    params["k020"], grads["k070"] = whole[:8], whole[4:12]
    with pytest.raises(ValueError, match=r"grads\['k070'\] shares memory with params\['k020'\]"):
        adamnp.step(params, grads, state)
    assert state.step == 2


def test_fast_validation_never_inserts_keys_or_rejects_valid_subclasses():
    rng = np.random.default_rng(7)
    params, grads = _big_tree(rng, 70)
    state = adamnp.init(params, adamnp.adamw(), backend="numba")
    missing = defaultdict(lambda: np.zeros(8, np.float32), list(grads.items())[1:])
    with pytest.raises(ValueError, match="tree structure"):
        adamnp.step(params, missing, state)
    assert len(missing) == 69

    class Sub(np.ndarray):
        pass

    grads["k003"] = grads["k003"].view(Sub)
    adamnp.step(params, grads, state)
    assert state.step == 1


# -- generated code


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 assembly")
@pytest.mark.parametrize("cpu", ["host", "haswell"])
def test_hot_loops_are_simd_and_fma_free(tmp_path, cpu):
    """Compile in a fresh process and cache (cached code cannot be inspected).

    The Adam update must not fuse (the reference rounds every product); the quantizer's fast
    path (:func:`~adamnp.backends.numba.avx512.fma32`) does, on purpose, and is left out.

    On a CPU with AVX-512 VBMI the 8-bit step is ``step_q8_simd`` (in-register lookups, no
    gathers); elsewhere, and under ``NUMBA_CPU_NAME=haswell`` (AVX2), it is ``step_q8``, which
    vectorizes only while Numba marks its array arguments ``noalias`` (no array views inside
    the parallel loop, see ``adamnp.backends.numba.q8``): without that, LLVM cannot prove that
    the map and
    table lookups (gathers) do not alias the stores, and every loop is scalar.
    """
    script = textwrap.dedent(
        """
        import re, numpy as np, adamnp
        from adamnp.backends.numba import q8 as _numba_q8
        from adamnp.backends.numba import q8_vbmi
        from adamnp.backends.numba.q8_sqrt import step_q8_sqrt
        from adamnp.backends.numba.fp32 import step_fp32
        from adamnp.backends.numba.reduce import first_nonfinite
        from adamnp.backends.numba.small import step_one
        from adamnp.backends.numba.avx512 import HAVE_VBMI
        from adamnp.backends import numba as backend
        for n in (5000, 70000):  # the small path's kernel, then the group kernels
            p = np.ones(n, np.float32)
            for bits, fmt in ((32, "sqrt"), (8, "bnb"), (8, "sqrt")):
                state = adamnp.init(p, adamnp.adamw(), backend="numba", state_bits=bits,
                                    state_format=fmt)
                adamnp.step(p, np.ones(n, np.float32), state)
        backend.nonfinite_leaf([p, p])  # (a one-group step checks inside its own kernel)
        pattern = re.compile(
            r"^\\s+(v?(?:divps|sqrtps|pmaxsd|p?gather\\w+|fmadd\\w*|fnmadd\\w*|permi2b|permi2ps"
            r"|permt2b|permd|permps))\\s",
            re.M,
        )
        q8 = q8_vbmi.step_q8_simd if HAVE_VBMI else _numba_q8.step_q8
        print("vbmi", int(HAVE_VBMI))
        kernels = (("step_fp32", step_fp32), ("first_nonfinite", first_nonfinite), ("q8", q8),
                   ("sqrt", step_q8_sqrt), ("step_one", step_one))
        for name, f in kernels:
            asm = f.inspect_asm(f.signatures[0])
            ops = sorted(set(pattern.findall(asm)))
            print(name, *ops)
            # without the quantizer's functions, whose fast path fuses on purpose (fma32)
            parts = re.split(r"^(_ZN\\S*):\\s*$", asm, flags=re.M)
            quantizer = re.compile(
                "turn_over|requantize_block|round_block_stochastic|dequantize_block"
            )
            update = "".join(
                body for label, body in zip(parts[1::2], parts[2::2])
                if not quantizer.search(label)
            )
            print(name + "_update", *sorted(set(pattern.findall(parts[0] + update))))
        """
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    if cpu != "host":
        env["NUMBA_CPU_NAME"] = cpu
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout
    ops = {
        line.split()[0]: {op.removeprefix("v") for op in line.split()[1:]}
        for line in out.splitlines()
    }
    vbmi = ops["vbmi"] == {"1"}
    step_ops, check_ops, q8_ops = ops["step_fp32"], ops["first_nonfinite"], ops["q8"]
    assert {"divps", "sqrtps", "pmaxsd"} <= step_ops, out  # with its own non-finite check
    assert "pmaxsd" in check_ops, out
    assert {"divps", "sqrtps", "pmaxsd"} <= ops["step_one"], out
    assert {"divps", "sqrtps", "pmaxsd"} <= q8_ops, out  # update, new absmax as an integer max
    if cpu == "haswell":
        assert not vbmi, out
    if vbmi:
        assert {"permi2b", "permi2ps"} <= q8_ops | {"permt2b"} and "gatherdps" not in q8_ops, out
    elif "+avx512f" in llvmlite.binding.get_host_cpu_features().flatten():
        # (NUMBA_CPU_NAME keeps the host's features.) LLVM turns the lookups into gathers
        # where its cost model finds them cheap, with AVX-512; on an AVX2-only CPU (seen on an
        # AMD EPYC) it loads them one by one, and the divps/sqrtps above are the proof that
        # the loop body kept its noalias.
        assert "gatherdps" in q8_ops, out  # map[code] lookups
        assert any(op.startswith("pgather") for op in q8_ops), out  # quantizer table lookups
    assert {"divps", "sqrtps"} <= ops["q8_update"], out  # the split kept the update
    # the "sqrt" format's kernel: vectorized (SIMD divisions and roots, integer block maxima),
    # with no table lookup at all
    assert {"divps", "sqrtps", "pmaxsd"} <= ops["sqrt"], out
    assert not any("gather" in op for op in ops["sqrt"]), out
    for kernel_ops in (step_ops, ops["q8_update"], ops["sqrt"], ops["step_one"]):
        assert not any("fmadd" in op or "fnmadd" in op for op in kernel_ops), out


VBMI_TARGET = {
    "NUMBA_CPU_NAME": "icelake-server",
    "NUMBA_CPU_FEATURES": "+avx512f,+avx512bw,+avx512dq,+avx512vl,+avx512cd,+avx512vbmi,+avx2,"
    "+avx,+fma,+f16c,+bmi,+bmi2,+lzcnt,+popcnt,+movbe,+sse4.2,+sse4.1,+ssse3,+sse3,+sse2,+sse",
}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 assembly")
@pytest.mark.parametrize("amsgrad", [False, True])
def test_vbmi_kernel_compiles_for_an_avx512_vbmi_target(tmp_path, amsgrad):
    """The AVX-512 VBMI step kernel type-checks and compiles on any x86 machine.

    Numba compiles for an explicit VBMI target; nothing compiled is run (the launch is
    intercepted and the checks that run kernels are off), so this works where the CPU lacks
    VBMI, and the kernel that the agreement tests cannot execute there is still held to the
    same assembly properties: in-register lookups, no gathers, a vectorized update free of
    FMA contraction.
    """
    script = textwrap.dedent(
        f"""
        import re, numba, numpy as np, adamnp
        from adamnp.backends import numba as front
        from adamnp.backends.numba import q8_vbmi
        assert front.q8_kernel() == "vbmi"
        launched = []
        front._launch = lambda kernel, work, *args: launched.append((kernel, args))
        from adamnp.backends.numba import leaves
        leaves.FIELDS = None  # validation in Python: its compiled scan would not run here
        p = np.ones(5000, np.float32)
        cfg = adamnp.adamw(nonfinite="propagate", amsgrad={amsgrad})
        state = adamnp.init(p, cfg, backend="numba", state_bits=8, state_format="bnb")
        adamnp.step(p, np.ones(5000, np.float32), state)
        (kernel, args), = launched
        assert kernel is q8_vbmi.step_q8_simd
        sig = tuple(numba.typeof(a) for a in args)
        kernel.compile(sig)
        asm = kernel.inspect_asm(sig)
        ops = r"permi2b|permt2b|gather\\w+|divps|sqrtps|fn?madd\\w*"
        pattern = re.compile(r"^\\s+v(" + ops + r")\\s", re.M)
        parts = re.split(r"^(_ZN\\S*):\\s*$", asm, flags=re.M)
        quantizer = re.compile("turn_over|requantize_block|round_block_stochastic|dequantize_block")
        update = parts[0] + "".join(
            body for label, body in zip(parts[1::2], parts[2::2]) if not quantizer.search(label)
        )
        print("all", *sorted(set(pattern.findall(asm))))
        print("update", *sorted(set(pattern.findall(update))))
        """
    )
    env = {**os.environ, **VBMI_TARGET, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("ADAMNP_Q8_KERNEL", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ops = {line.split()[0]: set(line.split()[1:]) for line in done.stdout.splitlines()}
    assert {"permi2b", "divps", "sqrtps"} <= ops["all"], done.stdout
    assert not any(op.startswith("gather") for op in ops["all"]), done.stdout
    assert {"divps", "sqrtps"} <= ops["update"], done.stdout
    assert not any("madd" in op for op in ops["update"]), done.stdout


# Skylake: an AVX2 CPU for which LLVM's cost model vectorizes the lookups as gathers (for
# Haswell and Zen 2 it keeps them scalar, the same before the kernel's pruned versions)
AVX2_TARGET = {
    "NUMBA_CPU_NAME": "skylake",
    "NUMBA_CPU_FEATURES": "+avx2,+avx,+fma,+f16c,+bmi,+bmi2,+lzcnt,+popcnt,+movbe,+sse4.2,"
    "+sse4.1,+ssse3,+sse3,+sse2,+sse",
}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 assembly")
@pytest.mark.parametrize(
    "options",
    ["amsgrad=False", "amsgrad=True", "v_rounding='stochastic'", "dtype=np.float16"],
)
def test_gather_kernel_vectorizes_for_an_avx2_target(tmp_path, options):
    """The bnb-format gather kernel, compiled for an AVX2 CPU in each of its pruned versions
    (without and with amsgrad, stochastic rounding of v, half params: the kernel compiles
    only the branches a state takes), keeps its vector gathers, divisions and square roots:
    Numba's alias analysis still marks the parallel loop body's arguments ``noalias``.
    Nothing compiled is run (the launch is intercepted), so this works on any x86 machine."""
    opts = dict(amsgrad=False, v_rounding="'nearest'", dtype="np.float32")
    key, value = options.split("=", 1)
    opts[key] = value
    script = textwrap.dedent(
        f"""
        import re, numba, numpy as np, adamnp
        from adamnp.backends import numba as front
        from adamnp.backends.numba import q8
        launched = []
        front._launch = lambda kernel, work, *args: launched.append((kernel, args))
        from adamnp.backends.numba import leaves
        leaves.FIELDS = None  # validation in Python: its compiled scan would not run here
        p = np.ones(5000, {opts["dtype"]})
        cfg = adamnp.adamw(nonfinite="propagate", amsgrad={opts["amsgrad"]})
        state = adamnp.init(p, cfg, backend="numba", state_bits=8, state_format="bnb",
                            v_rounding={opts["v_rounding"]})
        adamnp.step(p, np.ones(5000, {opts["dtype"]}), state)
        (kernel, args), = launched
        assert kernel is q8.step_q8
        sig = tuple(numba.typeof(a) for a in args)
        kernel.compile(sig)
        asm = kernel.inspect_asm(sig)
        print(*sorted(set(re.findall(r"^\\s+v(gather\\w+|divps|sqrtps)\\s", asm, re.M))))
        """
    )
    env = {**os.environ, **AVX2_TARGET, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT),
           "ADAMNP_Q8_KERNEL": "gather"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ops = set(done.stdout.split())
    assert {"gatherdps", "divps", "sqrtps"} <= ops, done.stdout


def edge_blocks(grads, rng, block_size):
    """Make blocks 1, 2, 3 of each gradient leaf (of ``block_size``) extreme, in place: v
    subnormal (g ~ 1e-20), m subnormal (|g| in 1e-44..1e-38, v then 0), and just below the
    gradient limit (2**63). A subnormal absmax divides: the AVX-512 kernel's multiply by
    ``1 / absmax`` overflowed there (then every code of the block was wrong)."""
    for g in grads.values():
        sign = np.where(rng.random(block_size) < 0.5, -1.0, 1.0)
        for b, values in ((1, rng.standard_normal(block_size) * 1e-20),
                          (2, sign * 10.0 ** rng.uniform(-44, -38, block_size)),
                          (3, sign * rng.uniform(0.5, 0.999, block_size) * 2.0**63)):  # fmt: skip
            if (b + 1) * block_size <= g.size:
                g[b * block_size : (b + 1) * block_size] = values


def _available_q8_kernels():
    return ["gather", "vbmi"] if numba_cpu.HAVE_VBMI else ["gather"]


@pytest.mark.parametrize("kernel", ["gather", "vbmi"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_each_8bit_kernel_matches_the_reference(monkeypatch, kernel, rounding):
    """ADAMNP_Q8_KERNEL forces the 8-bit kernel; each one gives the reference's bits."""
    if kernel not in _available_q8_kernels():
        pytest.skip("CPU without AVX-512 VBMI (its compilation is checked above)")
    monkeypatch.setenv("ADAMNP_Q8_KERNEL", kernel)
    assert numba_cpu.q8_kernel() == kernel
    launched = []
    for name in ("step_q8", "step_q8_simd"):
        original = getattr(numba_cpu, name)
        recorder = functools.partial(lambda n, k, *a: launched.append(n) or k(*a), name, original)
        monkeypatch.setattr(numba_cpu, name, recorder)
    rng = np.random.default_rng(4)
    params = tree(3, rng, sizes=(5000, 70_001))
    grads = like(params, rng)
    edge_blocks(grads, rng, 256)
    cfg = adamnp.adamw(amsgrad=True, weight_decay=0.1)
    init = dict(state_bits=8, min_8bit_size=1, v_rounding=rounding, state_format="bnb")
    results = {}
    for backend in ("numpy", "numba"):
        p = {k: v.copy() for k, v in params.items()}
        state = adamnp.init(p, cfg, backend=backend, **init)
        # (stochastic rounding scales by 1 / absmax, which overflows to inf for an absmax
        # below 2**-128, and 0 * inf: NumPy warns; every backend computes the same codes)
        with np.errstate(over="ignore", invalid="ignore"):
            for _ in range(3):
                adamnp.step(p, grads, state)
        results[backend] = (p, state)
    assert set(launched) == {"step_q8" if kernel == "gather" else "step_q8_simd"}
    (p_ref, s_ref), (p_got, s_got) = results["numpy"], results["numba"]
    for key in p_ref:
        np.testing.assert_array_equal(p_got[key], p_ref[key])
    for g_ref, g_got in zip(s_ref.groups, s_got.groups):
        for name, buf in g_ref.buffers.items():
            np.testing.assert_array_equal(g_got.buffers[name], buf, err_msg=name)


def test_q8_kernel_override_is_checked(monkeypatch):
    monkeypatch.setenv("ADAMNP_Q8_KERNEL", "fastest")
    with pytest.raises(ValueError, match="ADAMNP_Q8_KERNEL='fastest'"):
        numba_cpu.q8_kernel()
    monkeypatch.setenv("ADAMNP_Q8_KERNEL", "vbmi")
    if numba_cpu.HAVE_VBMI:
        assert numba_cpu.q8_kernel() == "vbmi"
    else:
        with pytest.raises(RuntimeError, match="lacks AVX-512 VBMI"):
            numba_cpu.q8_kernel()
    monkeypatch.setenv("ADAMNP_Q8_KERNEL", "gather")
    assert numba_cpu.q8_kernel() == "gather"
    assert numba_cpu.q8_kernel_description() == "table gathers, forced by ADAMNP_Q8_KERNEL"
    monkeypatch.delenv("ADAMNP_Q8_KERNEL")
    assert numba_cpu.q8_kernel() == ("vbmi" if numba_cpu.HAVE_VBMI else "gather")


def test_quantize_blockwise_uses_the_chosen_kernel(monkeypatch):
    from adamnp import quant

    rng = np.random.default_rng(2)
    x = rng.standard_normal(10_000).astype(np.float32)
    x[256:512] *= np.float32(1e-41)  # a subnormal absmax
    x[512:768] = np.float32(10.0) ** rng.uniform(-45, -38, 256).astype(np.float32)
    x[768:1024] *= np.float32(1e37)
    want = quant.quantize_blockwise(x, backend="numpy")
    assert (0 < want[1][1] < np.finfo(np.float32).tiny) and want[1][2] < 2.0**-126
    for kernel in _available_q8_kernels():
        monkeypatch.setenv("ADAMNP_Q8_KERNEL", kernel)
        got = quant.quantize_blockwise(x, backend="numba")
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@_numba_util.jit(cache=False)
def _pruned_when_array(x, y):
    if y is None:
        return x.attribute_no_int_has  # typed only if this branch were kept
    return x + 1


@_numba_util.jit(inline="always", cache=False)
def _inlined_choice(y, z):
    if y is not None:
        return 1
    return z.attribute_no_int_has


@_numba_util.jit(cache=False)
def _calls_inlined_choice(y, z):
    return _inlined_choice(y, z)


def test_kernels_drop_the_branch_an_argument_that_is_never_none_excludes():
    """The kernels' pipeline decides ``x is None`` for an array, number, bool or tuple ``x``
    before typing (Numba alone decides it only for an ``x`` that is None), directly and in
    a function inlined by Numba: the dropped branches here would not type."""
    assert _pruned_when_array(1, np.zeros(2)) == 2
    assert _pruned_when_array(1, True) == 2
    assert _calls_inlined_choice(np.zeros(1), 2) == 1
    assert _calls_inlined_choice((1, 2.0), 3) == 1
    with pytest.raises(numba.core.errors.TypingError):
        _pruned_when_array(1, None)  # None selects the branch that does not type
