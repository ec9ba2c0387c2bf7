"""Check the CUDA backend on a real GPU: ``python -m adamnp.cli.gpu_check [--quick]``.

1. Agreement with the NumPy reference at full size (1e6 to 6.4e7 elements, a tree of 1000
   leaves, several configurations, float32 and float64): bit-identical when the kernels are
   compiled without FMA contraction (the default), else within a relative 1e-5.
2. The same for 8-bit state (``state_bits=8``, block sizes 64, 256 and 4096) in both formats
   (``"sqrt"``, the default, and ``"bnb"``): params and absmax bitwise, code mismatches
   counted (expected 0: the same float32 operations and integer arithmetic as the reference).
3. float16 and bfloat16 params (1e6 elements, float32-moment and both 8-bit states, to
   nearest and stochastic rounding, half and float32 gradients): params, moments, codes and
   absmax bitwise. A bfloat16 row reports "skip" when the leaves cannot be passed (see
   :func:`agreement_half`).
4. Effective bandwidth of the step as a fraction of ``traffic_kernel``, a kernel that moves
   the same bytes (read p, g, m, v; write p, m, v) without the math, at 64M float32 elements
   as one leaf and as 1000 leaves: the kernels alone (CUDA events) and ``adamnp.step`` end
   to end (wall clock, with validation and host work).
5. The same for the 8-bit step against ``traffic_kernel_q8`` (16 B per element: read and
   write p and both code arrays, read g). The step's byte model is 16 B per element plus
   16 B per block (absmax of m and v read and written), ``16 + 16 / block_size`` B per
   element; the fraction compares bandwidths (bytes / time). Goal: at least 70%.

Prints one line per check; exits 1 if any check fails, 2 if no GPU can be used.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import numpy as np

import adamnp
from adamnp._tree import flatten
from adamnp.backends import cuda as be
from adamnp.backends.math import host_scalars
from adamnp.lowbit.half import bfloat16_dtype

CONFIGS = {
    "adamw": adamnp.adamw(lr=1e-3, weight_decay=0.01),
    "adam-l2-amsgrad": adamnp.adam(lr=1e-3, weight_decay=0.01, amsgrad=True),
    "maximize-clip": adamnp.adamw(lr=1e-3, maximize=True, max_grad_norm=1.0),
}


def _compare(name, got, expected, exact) -> bool:
    got, expected = np.asarray(got), np.asarray(expected)
    if exact:
        ok = got.tobytes() == expected.tobytes()
    else:
        ok = np.allclose(got, expected, rtol=1e-5, atol=1e-12)
    if not ok:
        bad = np.flatnonzero(got.reshape(-1) != expected.reshape(-1))
        i = int(bad[0]) if bad.size else 0
        print(f"    {name}: {bad.size} elements differ, e.g. [{i}] {got.reshape(-1)[i]!r} "
              f"vs {expected.reshape(-1)[i]!r}")  # fmt: skip
    return ok


def agreement(cuda, sizes, dtype, cfg_name, steps=3) -> bool:
    """Run ``steps`` steps on both backends from the same data; compare everything."""
    cfg = CONFIGS[cfg_name]
    rng = np.random.default_rng(len(sizes))
    host = [rng.standard_normal(n).astype(dtype) for n in sizes]
    dev = [cuda.to_device(a) for a in host]
    s_ref = adamnp.init(host, cfg, backend="numpy")
    s_dev = adamnp.init(dev, cfg, backend="cuda")
    for _ in range(steps):
        grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
        adamnp.step(host, grads, s_ref)
        adamnp.step(dev, [cuda.to_device(g) for g in grads], s_dev)
    exact = be._k().exact and cfg.max_grad_norm is None  # the norm's summation order differs
    ok = True
    for i in range(len(sizes)):  # stops at the first mismatch
        pairs = [("params", dev[i].copy_to_host(), host[i])]
        for field in ("m", "v", "vmax"):
            if getattr(s_ref.slots[i], field) is not None:
                got = be.to_host(getattr(s_dev.slots[i], field))
                pairs.append((field, got, getattr(s_ref.slots[i], field)))
        ok = all(_compare(f"{name}[{i}]", a, b, exact) for name, a, b in pairs)
        if not ok:
            break
    total = sum(sizes)
    how = "bitwise" if exact else "rtol 1e-5"
    print(f"{'ok  ' if ok else 'FAIL'} agreement {cfg_name:16} {np.dtype(dtype).name:7} "
          f"{len(sizes):4} leaves {total:>11,} elements ({how})")  # fmt: skip
    return ok


def agreement_q8(cuda, sizes, cfg_name, block_size, state_format="sqrt", steps=3) -> bool:
    """``agreement`` for 8-bit state: params and absmax bitwise, code mismatches counted."""
    cfg = CONFIGS[cfg_name]
    rng = np.random.default_rng(len(sizes) + block_size)
    host = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    dev = [cuda.to_device(a) for a in host]
    kw = dict(state_bits=8, min_8bit_size=1, block_size=block_size, state_format=state_format)
    s_ref = adamnp.init(host, cfg, backend="numpy", **kw)
    s_dev = adamnp.init(dev, cfg, backend="cuda", **kw)
    for _ in range(steps):
        grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        adamnp.step(host, grads, s_ref)
        adamnp.step(dev, [cuda.to_device(g) for g in grads], s_dev)
    exact = be._k().exact and cfg.max_grad_norm is None
    ok, codes, mismatches = True, 0, 0
    for i in range(len(sizes)):
        ok &= _compare(f"params[{i}]", dev[i].copy_to_host(), host[i], exact)
        for field, expected in s_ref.slots[i]._asdict().items():
            if not isinstance(expected, np.ndarray):
                continue
            got = be.to_host(getattr(s_dev.slots[i], field))
            if field.startswith("absmax"):
                ok &= _compare(f"{field}[{i}]", got, expected, exact)
            else:
                codes += got.size
                mismatches += int(np.count_nonzero(got != expected))
        if not ok:
            break
    # Exact arithmetic: no code may differ. Otherwise (FMA contraction, or a clipping factor
    # off in its last bit) a few codes next to midpoints may.
    ok &= mismatches == 0 if exact else mismatches <= 1e-4 * codes
    how = "bitwise" if exact else "rtol 1e-5"
    print(f"{'ok  ' if ok else 'FAIL'} agreement {cfg_name:16} {state_format:4} "
          f"8-bit/{block_size:<4} {len(sizes):4} leaves {sum(sizes):>11,} elements "
          f"({how}; {mismatches} of {codes:,} codes differ)")  # fmt: skip
    return ok


def agreement_half(cuda, n, dtype, state, rounding, grad_dtype, steps=3) -> bool:
    """``agreement`` for float16 or bfloat16 params (``ml_dtypes.bfloat16`` host arrays
    copied with ``cuda.to_device``): everything bitwise, with the exact arithmetic; a
    bfloat16 row is skipped (and passes) when validation refuses the device array (a
    Numba device array reports bfloat16 as typestr ``<V2``)."""
    cfg = adamnp.adamw(lr=1e-3, weight_decay=0.01, param_rounding=rounding)
    rng = np.random.default_rng(n + len(state))
    host = [rng.standard_normal(n).astype(dtype)]
    dev = [cuda.to_device(a) for a in host]
    kw = {} if state == "fp32" else dict(state_bits=8, min_8bit_size=1, block_size=256,
                                         state_format=state)  # fmt: skip
    label = (f"agreement {np.dtype(dtype).name:8} {state:4} {rounding:10} grads "
             f"{np.dtype(grad_dtype).name:8} {n:>11,} elements")  # fmt: skip
    try:
        s_dev = adamnp.init(dev, cfg, backend="cuda", **kw)
    except TypeError as exc:
        print(f"skip {label}: {exc}")
        return True
    s_ref = adamnp.init(host, cfg, backend="numpy", **kw)
    for _ in range(steps):
        grads = [rng.standard_normal(n).astype(grad_dtype)]
        adamnp.step(host, grads, s_ref)
        adamnp.step(dev, [cuda.to_device(g) for g in grads], s_dev)
    exact = be._k().exact
    ok = _compare("params", dev[0].copy_to_host().view(np.uint16), host[0].view(np.uint16),
                  exact)  # fmt: skip
    for field, expected in s_ref.slots[0]._asdict().items():
        if isinstance(expected, np.ndarray):
            ok &= _compare(field, be.to_host(getattr(s_dev.slots[0], field)), expected, exact)
    print(f"{'ok  ' if ok else 'FAIL'} {label} ({'bitwise' if exact else 'rtol 1e-5'})")
    return ok


def reductions(cuda, sizes=(10**6, 3, 5 * 10**6 + 7)) -> bool:
    rng = np.random.default_rng(1)
    host = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    dev = [cuda.to_device(a) for a in host]
    got = be.grad_sq_norm(dev)
    expected = sum(float(np.sum(a.astype(np.float64) ** 2)) for a in host)
    ok = abs(got - expected) <= 1e-12 * expected and be.grad_sq_norm(dev) == got
    host[2][-1] = np.inf
    ok &= be.nonfinite_leaf([cuda.to_device(a) for a in host]) == 2
    print(f"{'ok  ' if ok else 'FAIL'} grad_sq_norm (deterministic, rel 1e-12) and nonfinite_leaf")
    return ok


def _events_time(cuda, launch, repeat) -> float:
    start, stop = cuda.event(), cuda.event()
    start.record()
    for _ in range(repeat):
        launch()
    stop.record()
    stop.synchronize()
    return max(start.elapsed_time(stop), 1e-6) / 1e3 / repeat  # (the simulator says -1)


def _tree_step_bandwidth(cuda, n, leaves, repeat, nbytes, t_traffic, label, **init) -> None:
    """Print the step's GB/s on ``n`` elements split into ``leaves`` leaves: kernel only (CUDA
    events) and end to end through ``adamnp.step``, each as a fraction of ``t_traffic``."""
    sizes = [n // leaves] * leaves
    sizes[-1] += n - sum(sizes)
    params = [cuda.to_device(np.zeros(k, np.float32)) for k in sizes]
    grads = [cuda.to_device(np.full(k, 1e-3, np.float32)) for k in sizes]
    state = adamnp.init(params, adamnp.adamw(nonfinite="propagate"), backend="cuda", **init)
    adamnp.step(params, grads, state)  # compile, allocate the tables
    cuda.synchronize()
    p_leaves, g_leaves = flatten(params)[0], flatten(grads, "grads")[0]  # by group.leaf_ids
    scalars = host_scalars(state.config, 2, 1e-3)
    launch = functools.partial(be.step_group, state.groups[0], p_leaves, g_leaves, scalars)
    t_kernel = _events_time(cuda, launch, repeat)
    t0 = time.perf_counter()
    for _ in range(repeat):
        adamnp.step(params, grads, state)
    cuda.synchronize()
    t_step = (time.perf_counter() - t0) / repeat
    for what, t in (("kernel", t_kernel), ("adamnp.step", t_step)):
        print(f"     {label}{leaves:4} leaves, {what:11}: {nbytes / t / 1e9:8.1f} GB/s = "
              f"{t_traffic / t:6.1%} of traffic ({t * 1e3:.3f} ms)")  # fmt: skip


def bandwidth(cuda, n=1 << 26, repeat=20, many=1000) -> None:
    """Bandwidth of the float32-state step against the 28 B/element traffic kernel."""
    nbytes = 7 * 4 * n
    traffic_arrays = [cuda.to_device(np.ones(n, np.float32)) for _ in range(4)]
    be.traffic_kernel(*traffic_arrays)
    t_traffic = _events_time(cuda, lambda: be.traffic_kernel(*traffic_arrays), repeat)
    print(f"     traffic kernel ({n:,} float32): {nbytes / t_traffic / 1e9:8.1f} GB/s")
    traffic_arrays.clear()  # free device memory for the step's arrays
    for leaves in (1, many):
        _tree_step_bandwidth(cuda, n, leaves, repeat, nbytes, t_traffic, "")


def bandwidth_q8(cuda, n=1 << 26, repeat=20, many=1000, block_sizes=(256, 4096)) -> None:
    """Bandwidth of the 8-bit step (both formats) against the 16 B/element traffic kernel."""
    traffic_bytes = 16 * n
    arrays = [cuda.to_device(np.ones(n, np.float32)) for _ in range(2)]
    arrays += [cuda.to_device(np.zeros(n, np.uint8)) for _ in range(2)]
    be.traffic_kernel_q8(*arrays)
    t_traffic = _events_time(cuda, functools.partial(be.traffic_kernel_q8, *arrays), repeat)
    print(f"     8-bit traffic kernel ({n:,} elements, 16 B each): "
          f"{traffic_bytes / t_traffic / 1e9:8.1f} GB/s")  # fmt: skip
    arrays.clear()  # free device memory for the step's arrays
    for fmt in ("sqrt", "bnb"):
        for bs in block_sizes:
            # the step moves the traffic kernel's 16 B plus the absmax; compare time with time
            # on the traffic kernel's bytes, as the float32 check does
            t_equiv = t_traffic * (16 + 16 / bs) / 16
            for leaves in (1, many):
                _tree_step_bandwidth(cuda, n, leaves, repeat, n * (16 + 16 / bs), t_equiv,
                                     f"8-bit {fmt:4}/{bs:<4} ", state_bits=8, min_8bit_size=1,
                                     block_size=bs, state_format=fmt)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adamnp.cli.gpu_check", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="sizes up to 4e6 only")
    args = parser.parse_args(argv)
    why = be.availability()
    if why is None and be._k().sim:
        why = "NUMBA_ENABLE_CUDASIM=1 is set (the simulator is far too slow for these sizes)"
    if why is not None:
        print(f"no usable GPU: {why}")
        return 2
    from numba import cuda

    dev = cuda.get_current_device()
    print(f"GPU: {dev.name.decode() if isinstance(dev.name, bytes) else dev.name}, "
          f"cc {dev.compute_capability}; exact arithmetic (no FMA): {be._k().exact}")  # fmt: skip
    big = [] if args.quick else [64 * 10**6]
    rng = np.random.default_rng(0)
    tree = [int(x) for x in rng.integers(1, 20_000, 1000)]
    cases = [([10**6], np.float32, name) for name in CONFIGS]
    cases += [([10**6 + 3], np.float64, "adam-l2-amsgrad")]
    cases += [([4 * 10**6 + 1], np.float32, "adamw")]
    cases += [(tree, np.float32, "adamw"), (tree, np.float64, "maximize-clip")]
    cases += [([n], np.float32, "adamw") for n in big]
    q8_cases = [([10**6], name, bs) for name in CONFIGS for bs in (64, 256)]
    q8_cases += [([4 * 10**6 + 1], "adam-l2-amsgrad", 4096), (tree, "adamw", 256)]
    q8_cases += [([n], "adamw", 256) for n in big]
    ok = reductions(cuda)
    for sizes, dtype, name in cases:
        ok &= agreement(cuda, sizes, dtype, name)
    for sizes, name, bs in q8_cases:
        for fmt in ("sqrt", "bnb"):
            ok &= agreement_q8(cuda, sizes, name, bs, fmt)
    bf16 = bfloat16_dtype()
    for dtype in [np.float16] + ([bf16] if bf16 is not None else []):
        for state in ("fp32", "sqrt", "bnb"):
            for rounding, grad_dtype in (("nearest", dtype), ("stochastic", np.float32)):
                ok &= agreement_half(cuda, 10**6 + 3, dtype, state, rounding, grad_dtype)
    bandwidth(cuda, n=(1 << 22) if args.quick else (1 << 26))
    bandwidth_q8(cuda, n=(1 << 22) if args.quick else (1 << 26))
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
