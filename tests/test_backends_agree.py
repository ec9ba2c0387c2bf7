"""Every backend against the NumPy reference: same params, moments and counters, bit for bit.

Why bitwise. Each backend performs the operations of ``numpy.update_chunk`` in the same order,
one IEEE-754 operation at a time in the leaf dtype, with the same scalars (rounded once by
``_scalars.kernel_scalars``). Multiplication, division, addition and ``sqrt`` are correctly
rounded in both NumPy's ufunc loops and LLVM's code, and Numba compiles without fast-math, so
LLVM neither reassociates nor contracts a multiply and an add into an FMA (the tests in
test_numba_cpu.py look at the assembly). So every element sees identical roundings, and the
results are identical bits; any float32 tolerance (about 1e-7 relative per operation) would
only hide a broken operation order. NaN compares equal to NaN: which NaN payload an operation
returns depends on operand order, which the compiler may commute.

One exception: with ``max_grad_norm`` the gradient norm is a sum whose order differs between
backends (NumPy's BLAS dot per chunk, Numba's eight-lane partial sums), so the float64 norms
agree only to a few ulps. float32 leaves still agree bitwise, because the scale is rounded to
float32 before use; float64 leaves agree within :func:`clip_tolerance`.

8-bit state (cases with a block size): each block is dequantized with the old absmax, updated
with the same element math and requantized, so params and absmax agree bitwise too. Codes are
``nearest(x / absmax)`` with both sides computing the same float32 quotient and the same exact
rounding, so they agree exactly as well; the design tolerates an off-by-one where a quotient
lies within one float32 rounding of a midpoint between two map values, so
:func:`code_mismatches` counts differing codes and :data:`CODE_MISMATCH_BUDGET` bounds them
(expected and observed: 0, which the bitwise params then confirm).

The gradients (:func:`make_grads`) hold the extremes where kernels take other paths: whole
blocks whose absmax is subnormal (v from gradients near 1e-20, m from 1e-44..1e-38; the
AVX-512 VBMI kernel's reciprocal ``1 / absmax`` overflows there, so it must divide) or comes
from gradients just below the gradient limit (``grad_limit``, 2**63 for float32), and, with
nonfinite="propagate", blocks whose v lies above 2**126 or overflows. Configs ending in
"-huge" put +-grad_limit itself into one step: every backend must reject it alike.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import adamnp
from adamnp import backends
from adamnp._tree import flatten, unflatten
from adamnp.backends.math import grad_limit

BACKENDS = [name for name in backends.NAMES if name != "numpy" and backends.available(name)]
REF = backends.get("numpy")
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

CONFIGS = {
    "adamw": lambda: adamnp.adamw(lr=1e-2),
    "adam": lambda: adamnp.adam(lr=1e-2),
    "adam-l2": lambda: adamnp.adam(lr=1e-2, weight_decay=0.1),
    "adamw-no-decay": lambda: adamnp.adamw(lr=1e-2, weight_decay=0.0),
    "amsgrad": lambda: adamnp.adamw(lr=1e-2, amsgrad=True),
    "maximize": lambda: adamnp.adam(lr=1e-2, maximize=True, weight_decay=0.05),
    "beta1-small": lambda: adamnp.adamw(lr=1e-2, betas=(0.3, 0.9)),  # the other lerp branch
    "eps-zero": lambda: adamnp.adam(lr=1e-2, eps=0.0),  # 0/0 where g and m are zero
    "schedule": lambda: adamnp.adamw(lr=lambda count: 0.05 / (1 + count)),
    "clip": lambda: adamnp.adamw(lr=1e-2, max_grad_norm=0.5),
    "skip-nan": lambda: adamnp.adamw(lr=1e-2, nonfinite="skip"),
    "propagate-nan": lambda: adamnp.adamw(lr=1e-2, nonfinite="propagate", amsgrad=True),
    "raise-nan": lambda: adamnp.adamw(lr=1e-2),
    # finite gradients at the limit (grad_limit) count as non-finite under "raise"/"skip"
    "raise-huge": lambda: adamnp.adamw(lr=1e-2),
    "skip-huge": lambda: adamnp.adam(lr=1e-2, nonfinite="skip", amsgrad=True),
    "all-flags": lambda: adamnp.adam(
        lr=1e-2, betas=(0.3, 0.9), weight_decay=0.1, amsgrad=True, maximize=True
    ),
}
NAN_STEP = 1  # configs ending in "-nan" see NaN and +-Inf in the gradients of this step,
# those ending in "-huge" +-grad_limit (finite, but at the limit)
SIZES = (0, 1, 255, 256, 257, 4095, 4096)
Q8_SIZES = (1, 255, 256, 257, 4095, 4096)
BLOCK_SIZES = (64, 256, 4096)
Q8_CONFIGS = ("adam", "adamw", "adam-l2", "amsgrad", "maximize", "beta1-small", "clip",
              "skip-nan", "propagate-nan", "raise-nan", "raise-huge", "skip-huge",
              "all-flags")  # fmt: skip
CODE_MISMATCH_BUDGET = 1e-5  # off-by-one codes allowed per element (at float32 midpoints)


def make_tree(kind: str, size: int, dtype, rng):
    """Initial params: one array, a nested dict/list/tuple, many leaves, or mixed dtypes."""

    def a(n, dt=dtype):
        return rng.standard_normal(n).astype(dt)

    if kind == "single":
        return a(size)
    if kind == "nested":
        return {
            "w": a(size).reshape(1, size),
            "blocks": [a(3), (a(size), {"gain": a(1), "empty": a(0)}), a(4097)],
        }
    if kind == "many":
        return [a(1 + (37 * i) % size) for i in range(300)]
    if kind == "mixed":
        return {"f32": [a(n, F32) for n in (size, 1, 300)], "f64": [a(n, F64) for n in (size, 7)]}
    raise ValueError(kind)


# Magnitudes of gradients per leaf dtype: "sub_v" makes v subnormal (g**2 * (1 - b2) below
# the smallest normal), "sub_m" the exponent range (log10) that makes m = (1 - b1) * g
# subnormal (or zero); beyond the limit (nonfinite="propagate" only), "huge_v" makes v
# (beta2 = 0.999) finite but above 2**126 (float32; float64: 2**1022), "beyond" overflows it.
MAGNITUDES = {
    F32: dict(sub_v=1e-20, sub_m=(-44.0, -38.0), huge_v=3e20, beyond=1e21),
    F64: dict(sub_v=1e-160, sub_m=(-322.0, -307.0), huge_v=2.2e155, beyond=1e156),
}


def special_of(config: str) -> str | None:
    """What the gradients of step NAN_STEP hold: "nan" (NaN, +-Inf), "huge" (+-the limit)."""
    tail = config_name(config).rsplit("-", 1)[-1]
    return tail if tail in ("nan", "huge") else None


def make_grads(params, step: int, special: str | None = None, run: int = 64,
               beyond: bool = False):  # fmt: skip
    """Gradients of one step.

    Elements: normal values, exact zeros, tiny magnitudes (squares underflow in float32),
    magnitudes just below the limit (:func:`~adamnp.backends.math.grad_limit`) and, with
    ``beyond`` (for nonfinite="propagate"), magnitudes that make v finite but above
    ``2**126`` (float32) or overflow it. Whole runs
    of ``run`` elements (the 8-bit blocks) hold only gradients that make v subnormal, or m
    subnormal (then v is 0), or that lie just below the limit: the same runs at every step,
    so that the block's absmax stays there. ``special`` (step NAN_STEP): "nan" puts NaN and
    +-Inf, "huge" +-grad_limit, at random places.
    """
    leaves, treedef, _ = flatten(params)
    rng = np.random.default_rng(1000 + step)
    out = []
    for index, leaf in enumerate(leaves):
        dtype, n = leaf.dtype, leaf.size
        mag = MAGNITUDES[dtype]
        limit = grad_limit(dtype)
        g = rng.standard_normal(n)
        sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        picks = rng.random(n)
        g[picks < 0.05] = 0.0
        g[(picks >= 0.05) & (picks < 0.08)] *= 1e-30  # squares underflow in float32
        near = (picks >= 0.08) & (picks < 0.09)
        g[near] = sign[near] * limit * rng.uniform(0.5, 0.999, n)[near]  # just below
        if beyond:
            large = (picks >= 0.09) & (picks < 0.093)
            g[large] = sign[large] * mag["huge_v"] * rng.uniform(1, 1.3, n)[large]
            over = (picks >= 0.093) & (picks < 0.095)
            g[over] = sign[over] * mag["beyond"] * rng.uniform(1, 4, n)[over]
        kind = (index + n + np.arange(n) // run) % 5  # the runs: 0 and 4 as above
        sub_v, sub_m, top = kind == 1, kind == 2, kind == 3
        g[sub_v] = rng.standard_normal(n)[sub_v] * mag["sub_v"]
        g[sub_m] = sign[sub_m] * 10.0 ** rng.uniform(*mag["sub_m"], n)[sub_m]
        g[top] = sign[top] * limit * rng.uniform(0.5, 0.999, n)[top]
        g = g.astype(dtype)
        g[top & (picks < 0.1)] = sign[top & (picks < 0.1)] * below_limit(dtype)  # the largest
        g = g.reshape(leaf.shape)
        if special and g.size:
            flat = g.reshape(-1)
            values = [np.nan, np.inf, -np.inf] if special == "nan" else [limit, -limit]
            flat[rng.integers(flat.size, size=len(values))] = values
        out.append(g)
    return unflatten(treedef, out)


def below_limit(dtype):
    """The largest magnitude of ``dtype`` that the non-finite check lets through."""
    return np.nextafter(dtype.type(grad_limit(dtype)), dtype.type(0))


def on(be, tree):
    """A copy of a host tree in backend ``be``'s memory."""
    leaves, treedef, _ = flatten(tree)
    return unflatten(treedef, [be.from_host(np.asarray(x)) for x in leaves])


def host_view(be, params, state):
    """Params, moment buffers and counters as host arrays, for comparison."""
    leaves = [np.asarray(be.to_host(x)) for x in flatten(params)[0]]
    buffers = {
        (i, name): np.asarray(be.to_host(buf))
        for i, group in enumerate(state.groups)
        for name, buf in sorted(group.buffers.items())
    }
    return leaves, buffers, (state.step, state.skipped_steps)


def config_name(config: str) -> str:
    """The config without its suffix: ``+bnb`` (8-bit state in bitsandbytes' format) or
    ``+sr`` (the same with stochastic rounding of v)."""
    return config.removesuffix("+sr").removesuffix("+bnb")


def run(backend: str, case, steps: int):
    """Take ``steps`` steps of ``case``; return the final host view and the errors raised."""
    kind, size, dtype, config, block_size = case
    be = backends.get(backend)
    params = on(be, make_tree(kind, size, dtype, np.random.default_rng(7)))
    q8 = dict(state_bits=8, block_size=block_size, min_8bit_size=1) if block_size else {}
    if config.endswith(("+sr", "+bnb")):
        q8["state_format"] = "bnb"
        q8["v_rounding"] = "stochastic" if config.endswith("+sr") else "nearest"
    config = config_name(config)
    state = adamnp.init(params, CONFIGS[config](), backend=backend, **q8)
    errors = []
    special = special_of(config)
    for t in range(steps):
        grads = make_grads(params, t, special if t == NAN_STEP else None, block_size or 64,
                           beyond=CONFIGS[config]().nonfinite == "propagate")  # fmt: skip
        try:
            with np.errstate(all="ignore"):  # NumPy warns where v overflows; others are silent
                adamnp.step(params, on(be, grads), state)
        except ValueError as exc:
            errors.append(str(exc))
    return host_view(be, params, state), errors


def assert_same_bits(got, want, what):
    """Bitwise equality; any NaN equals any NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN positions")
    bits = np.dtype(f"i{want.itemsize}")
    diff = np.flatnonzero(np.where(nan, 0, got).view(bits) != np.where(nan, 0, want).view(bits))
    assert diff.size == 0, (
        f"{what}: {diff.size} of {want.size} elements differ, first at {diff[0]}: "
        f"{got.reshape(-1)[diff[0]]!r} vs {want.reshape(-1)[diff[0]]!r}"
    )


def clip_tolerance(want):
    """Allowed |difference| for float64 results of a clipped step.

    The two float64 norms are sums of the same squares in different orders: their relative
    difference is at most ``n * eps64`` (recursive-summation bound; n <= 1e6 here, so 2e-10)
    and in practice a few ulps. It reaches the scale ``max_grad_norm / (norm + 1e-6)`` and then
    ``m``, ``v`` (twice) and the update (relative error about 3x that), while ``p`` itself only
    adds roundings identical on both sides. Bound: 1e-9 relative, and 1e-9 * lr absolute where
    an update cancels ``p``.
    """
    return dict(rtol=1e-9, atol=1e-11)


def code_mismatches(got, want, what):
    """Number of differing 8-bit codes; each must be an off-by-one, within the budget."""
    diff = np.flatnonzero(got != want)
    assert np.all(np.abs(got[diff].astype(int) - want[diff]) == 1), f"{what}: codes differ by > 1"
    assert diff.size <= CODE_MISMATCH_BUDGET * want.size, (
        f"{what}: {diff.size} of {want.size} codes differ, first at {diff[:1]}"
    )
    return diff.size


def compare(got, want, case):
    (g_leaves, g_bufs, g_counts), (w_leaves, w_bufs, w_counts) = got, want
    assert g_counts == w_counts
    assert sorted(g_bufs) == sorted(w_bufs)
    pairs = [(f"leaf {i}", g, w) for i, (g, w) in enumerate(zip(g_leaves, w_leaves))]
    pairs += [(f"group {k[0]} {k[1]}", g_bufs[k], w_bufs[k]) for k in sorted(w_bufs)]
    for what, g, w in pairs:
        if w.dtype == np.uint8:
            code_mismatches(g, w, what)
        elif config_name(case[3]) == "clip" and w.dtype == F64:
            np.testing.assert_allclose(g, w, err_msg=what, **clip_tolerance(w))
        else:
            assert_same_bits(g, w, what)


# One table drives the matrix: (tree kind, size, dtype, config, block size), steps. Block size
# 0 means float32 moments; otherwise every float32 leaf gets 8-bit moments in such blocks
# in the default "sqrt" format (a config ending in "+bnb": bitsandbytes' format, "+sr": the
# same with v rounded stochastically).
CASES = (
    [(("single", n, dt, "adamw", 0), 3) for n in SIZES for dt in (F32, F64)]
    + [(("nested", 257, dt, c, 0), 3) for c in CONFIGS for dt in (F32, F64)]
    + [(("many", 70, F32, c, 0), 3) for c in ("adamw", "amsgrad", "clip")]
    + [(("mixed", 4096, None, c, 0), 3) for c in ("adam-l2", "clip", "propagate-nan")]
    + [(("single", 1_000_000, F32, "adamw", 0), 2), (("nested", 1_000_000, F64, "amsgrad", 0), 2)]
    # 8-bit state: partial and whole blocks, every block size, the configs that change the
    # element math or the non-finite handling (NaN blocks), many leaves, mixed dtypes, 1e6.
    + [(("single", n, F32, "adamw", bs), 4) for n in Q8_SIZES for bs in BLOCK_SIZES]
    + [(("nested", 257, F32, c, 256), 4) for c in Q8_CONFIGS]
    + [(("nested", 4095, F32, c, bs), 3) for c in ("amsgrad", "propagate-nan") for bs in (64, 4096)]
    + [(("many", 70, F32, "adamw", 64), 3), (("mixed", 4096, None, "propagate-nan", 256), 3)]
    + [
        (("single", 1_000_000, F32, c, bs), 3)
        for c, bs in (("adamw", 256), ("amsgrad", 4096), ("propagate-nan", 64), ("clip", 256))
    ]
    # bitsandbytes' format, v rounded to nearest ("+bnb") and stochastically ("+sr")
    + [(("single", n, F32, "adamw+bnb", bs), 4) for n in (257, 4096) for bs in (64, 4096)]
    + [(("nested", 257, F32, f"{c}+bnb", 256), 4) for c in ("amsgrad", "propagate-nan")]
    + [(("single", 1_000_000, F32, "clip+bnb", 256), 3)]
    + [(("single", n, F32, "adamw+sr", bs), 4) for n in (257, 4096) for bs in (64, 256)]
    + [(("nested", 257, F32, f"{c}+sr", 256), 4) for c in ("amsgrad", "propagate-nan", "all-flags")]
    + [(("many", 70, F32, "adamw+sr", 64), 3), (("single", 1_000_000, F32, "clip+sr", 4096), 3)]
)


def case_id(case):
    (kind, size, dtype, config, block_size), _ = case
    bits = f"-q8b{block_size}" if block_size else ""
    return f"{kind}-{size}-{dtype.name if dtype else 'mixed'}-{config}{bits}"


SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"  # Numba's CUDA simulator: slow


# NumPy warns where v overflows or eps = 0 divides 0 by 0; np.errstate in run() silences the
# reference, but not the CUDA simulator's threads, which compute with NumPy scalars.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_backend_matches_reference(backend, case):
    case, steps = case
    if backend == "cuda" and SIMULATED and (case[1] > 5000 or case[0] == "many"):
        pytest.skip("the CUDA simulator runs small cases only")
    (got, got_errors), (want, want_errors) = run(backend, case, steps), run("numpy", case, steps)
    assert got_errors == want_errors
    assert (len(want_errors) == 1) == config_name(case[3]).startswith("raise-")
    compare(got, want, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_reductions_match_reference(backend, dtype):
    be = backends.get(backend)
    params = make_tree("nested", 40_000, dtype, np.random.default_rng(3))
    grads = flatten(make_grads(params, 0))[0]  # near the limit, subnormal: all accepted
    dev = [be.from_host(g) for g in grads]
    assert be.nonfinite_leaf(dev) == REF.nonfinite_leaf(grads) == -1
    want = REF.grad_sq_norm(grads)
    assert be.grad_sq_norm(dev) == pytest.approx(want, rel=1e-13)
    limit = dtype.type(grad_limit(dtype))
    for leaf, value in ((0, np.nan), (3, np.inf), (len(grads) - 1, limit), (1, -limit)):
        bad = [g.copy() for g in grads]
        bad[leaf].reshape(-1)[-1] = value
        dev = [be.from_host(g) for g in bad]
        assert be.nonfinite_leaf(dev) == REF.nonfinite_leaf(bad) == leaf
