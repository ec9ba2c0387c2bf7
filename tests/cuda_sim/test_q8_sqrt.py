"""The ``"sqrt"`` 8-bit state format on the CUDA backend gives the NumPy reference's bits (in
the simulator).

The kernel (:mod:`adamnp.backends.cuda.q8_sqrt`) performs the reference's float32 and integer
operations in the same order (:mod:`adamnp.lowbit.sqrt`), with the same hash per element, so
after every step the parameters, every code array and every absmax array must equal the
reference's bit for bit; NaN (absmax of a non-finite block, parameters it reaches) equals any
NaN. The formats' shared behaviour (huge gradients, checkpoints, state on the device) is
checked for both formats in test_q8.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import adamnp
from adamnp._state import QuantSlot
from adamnp._tree import flatten, unflatten
from adamnp.backends import cuda as be

from .helpers import edge_grads, to_device, to_host

FIELDS = ("codes_m", "codes_v", "codes_vmax", "absmax_m", "absmax_v", "absmax_vmax")


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal dtype, shape and bits; for floats, any NaN equals any NaN (only there)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if want.dtype.kind != "f":
        return got.tobytes() == want.tobytes()
    nan = np.isnan(want)
    if not np.array_equal(np.isnan(got), nan):
        return False
    return np.where(nan, 0, got).tobytes() == np.where(nan, 0, want).tobytes()


def wide_grads(params, rng, steps: int, zero_block: int | None = None) -> list:
    """Gradients ``normal * 10**uniform(-8, 0)`` (so a block holds magnitudes 1e-8..1), a
    tenth of them exactly 0, and each leaf's first ``zero_block`` elements 0 at every step
    (a block of zeros: absmax 0)."""
    leaves, treedef, _ = flatten(params)
    out = []
    for _ in range(steps):
        grads = []
        for a in leaves:
            n = a.size
            g = rng.standard_normal(n) * 10.0 ** rng.uniform(-8.0, 0.0, n)
            g[rng.random(n) < 0.1] = 0.0
            if zero_block:
                g[:zero_block] = 0.0
            grads.append(g.astype(a.dtype).reshape(a.shape))
        out.append(unflatten(treedef, grads))
    return out


def assert_step_same(host, dev, s_ref, s_dev, step: int) -> None:
    """Params, codes and absmax of both runs bitwise (NaN-aware), after step ``step``."""
    for i, (a, b) in enumerate(zip(flatten(to_host(dev))[0], flatten(host)[0], strict=True)):
        assert same_bits(a, b), (step, "params", i)
    for i, (ref, got) in enumerate(zip(s_ref.slots, s_dev.slots, strict=True)):
        names = FIELDS if isinstance(ref, QuantSlot) else ("m", "v", "vmax")
        for name in names:
            want = getattr(ref, name)
            if want is None:
                assert getattr(got, name) is None, (step, i, name)
                continue
            actual = be.to_host(getattr(got, name))
            if not same_bits(actual, want):
                bad = np.flatnonzero(actual.reshape(-1) != want.reshape(-1))
                raise AssertionError(f"step {step}, leaf {i}, {name}: {bad.size} differ, "
                                     f"first at {bad[:5]}: {actual.reshape(-1)[bad[:5]]} vs "
                                     f"{want.reshape(-1)[bad[:5]]}")  # fmt: skip
    assert (s_dev.step, s_dev.skipped_steps) == (s_ref.step, s_ref.skipped_steps)


def run_sqrt(params, grads_seq, config, block_size, min_8bit_size=1):
    """Run the reference and the CUDA backend on ``"sqrt"``-format state, comparing after
    every step; return ``(host params, device params, ref state, cuda state)``."""
    leaves, treedef, _ = flatten(params)
    host = unflatten(treedef, [a.copy() for a in leaves])
    dev = to_device(params)
    init = dict(state_bits=8, block_size=block_size, min_8bit_size=min_8bit_size)
    s_ref = adamnp.init(host, config, backend="numpy", **init)
    s_dev = adamnp.init(dev, config, backend="cuda", **init)
    assert s_ref.state_format == s_dev.state_format == "sqrt"  # the default
    assert any(g.kind == "q8" for g in s_dev.groups)
    for t, grads in enumerate(grads_seq, 1):
        with np.errstate(invalid="ignore"):  # a non-finite test: the reference's inf / inf
            adamnp.step(host, grads, s_ref)
        adamnp.step(dev, to_device(grads), s_dev)
        assert_step_same(host, dev, s_ref, s_dev, t)
    return host, dev, s_ref, s_dev


CONFIGS = {
    "adamw": adamnp.adamw(lr=1e-2, weight_decay=0.1),
    "adamw-amsgrad": adamnp.adamw(lr=1e-2, weight_decay=0.1, amsgrad=True),
    "adam-l2": adamnp.adam(lr=1e-2, weight_decay=0.05),
    "adam-l2-amsgrad": adamnp.adam(lr=1e-2, weight_decay=0.05, amsgrad=True),
    "maximize": adamnp.adam(lr=1e-2, maximize=True),
    "maximize-amsgrad": adamnp.adamw(lr=1e-2, weight_decay=0.1, maximize=True, amsgrad=True),
    "small-beta1": adamnp.adamw(lr=1e-2, betas=(0.3, 0.9)),  # torch's lerp with weight >= 0.5
}
# Leaf sizes per block size: one element, partial last blocks, exact multiples; several
# tiles (the simulator's tile is 256 elements at block size 64 and 256).
SIZES = {64: (1, 63, 200, 256, 450), 256: (5, 256, 300, 700)}
CASES = [
    ("adamw", 64), ("adamw-amsgrad", 256), ("adam-l2", 256), ("adam-l2-amsgrad", 64),
    ("maximize", 256), ("maximize-amsgrad", 64), ("small-beta1", 64),
]  # fmt: skip


@pytest.mark.parametrize(("name", "block_size"), CASES)
def test_configs_match_reference(name, block_size):
    # One group of several leaves (one launch per step), gradients of 1e-8..1 with exact
    # zeros, and a block of zeros at the start of every leaf.
    rng = np.random.default_rng([block_size, len(name)])
    params = [rng.standard_normal(n).astype(np.float32) for n in SIZES[block_size]]
    run_sqrt(params, wide_grads(params, rng, 3, zero_block=64), CONFIGS[name], block_size)


def test_many_elements_per_thread():
    # Block size 1024: 16 elements per thread in the simulator's launch (4 at 64 and 256).
    rng = np.random.default_rng(21)
    params = [rng.standard_normal(n).astype(np.float32) for n in (1500, 130)]
    run_sqrt(params, wide_grads(params, rng, 2), CONFIGS["adam-l2-amsgrad"], 1024)


@pytest.mark.parametrize("name", ["adamw-amsgrad", "maximize"])
def test_subnormal_and_near_limit_blocks_match_reference(name):
    # Blocks whose v is subnormal (gradients ~1e-20), whose m is subnormal (1e-44..1e-38; v
    # underflows to 0, so s = 0 and r = 0) or whose gradients lie just below the limit
    # (2**63: s above 1e17), next to ordinary blocks.
    rng = np.random.default_rng(26)
    params = [rng.standard_normal(n).astype(np.float32) for n in (320, 257)]
    out = run_sqrt(params, edge_grads(params, rng, 3), CONFIGS[name], 64)
    for slot in out[3].slots:
        absmax_v = be.to_host(slot.absmax_v)
        assert (absmax_v == 0).any() and absmax_v.max() > 1e17 and np.isfinite(absmax_v).all()


def test_mixed_tree_hash_index_and_tag():
    # A float32 leaf below min_8bit_size first and a float64 leaf: the 8-bit group's tag
    # (its first leaf) is not 0, and each element's hash index is its offset in the group.
    rng = np.random.default_rng(22)
    params = {
        "a": rng.standard_normal(40).astype(np.float32),
        "b": rng.standard_normal(300).astype(np.float32),
        "c": rng.standard_normal(130).astype(np.float64),
        "d": rng.standard_normal((7, 37)).astype(np.float32),
    }
    out = run_sqrt(params, wide_grads(params, rng, 3), CONFIGS["adamw-amsgrad"], 64,
                   min_8bit_size=100)  # fmt: skip
    (group,) = [g for g in out[3].groups if g.kind == "q8"]
    assert group.leaf_ids.tolist() == [1, 3] and group.offsets.tolist() == [0, 300, 559]


def test_many_leaves_one_launch():
    # More tiles than CUDA blocks: each block loops over tiles of different leaves.
    rng = np.random.default_rng(23)
    params = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(1, 300, 12)]
    run_sqrt(params, wide_grads(params, rng, 2), CONFIGS["adamw"], 64)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf
def test_nonfinite_blocks_propagate_like_reference():
    # Leaf 0, block size 64: step 2 has a NaN gradient in block 1 and an infinite one in
    # block 3; the blocks next to them stay finite. (The simulator's threads compute inf / inf
    # as NumPy scalars, which warns.)
    rng = np.random.default_rng(24)
    params = [rng.standard_normal(n).astype(np.float32) for n in (300, 100)]
    grads = wide_grads(params, rng, 3)
    grads[1][0][100] = np.nan
    grads[1][0][200] = np.inf
    cfg = adamnp.adamw(lr=1e-2, nonfinite="propagate", amsgrad=True)
    host, dev, s_ref, s_dev = run_sqrt(params, grads[:2], cfg, 64)
    slot = s_dev.slots[0]
    absmax = {x: be.to_host(getattr(slot, f"absmax_{x}")) for x in ("m", "v", "vmax")}
    codes = {x: be.to_host(getattr(slot, f"codes_{x}")) for x in ("m", "v", "vmax")}
    for x in ("v", "vmax"):  # s = NaN or Inf: absmax NaN, code 0
        assert np.isnan(absmax[x][[1, 3]]).all() and np.isfinite(absmax[x][[0, 2, 4]]).all()
        assert (codes[x][64:128] == 0).all() and (codes[x][192:256] == 0).all()
    # r = m / s = inf / inf = NaN in block 3 (block 1, r of a NaN s, is the definition's
    # detail: compared bitwise above).
    assert np.isfinite(absmax["m"][[0, 2, 4]]).all() and np.isnan(absmax["m"][3])
    assert (codes["m"][192:256] == 0).all()
    p = to_host(dev)[0]
    assert np.isnan(p[[100, 200]]).all() and np.isfinite(np.delete(p, [100, 200])).all()
    # The next step reads the NaN blocks: their parameters all become NaN, as in the reference.
    with np.errstate(invalid="ignore"):
        adamnp.step(host, grads[2], s_ref)
    adamnp.step(dev, to_device(grads[2]), s_dev)
    assert_step_same(host, dev, s_ref, s_dev, 3)
    p = to_host(dev)[0]
    assert np.isnan(p[64:128]).all() and np.isnan(p[192:256]).all()
    assert np.isfinite(p[:64]).all() and np.isfinite(p[256:]).all()


def test_sqrt_and_bnb_groups_in_one_process():
    # Both formats at the same block size: each state's steps run its own kernel.
    rng = np.random.default_rng(25)
    params = [rng.standard_normal(300).astype(np.float32)]
    grads = wide_grads(params, rng, 2)
    states = {}
    for fmt in ("sqrt", "bnb"):
        dev = to_device(params)
        states[fmt] = adamnp.init(dev, CONFIGS["adamw"], backend="cuda", state_bits=8,
                                  min_8bit_size=1, block_size=64, state_format=fmt)  # fmt: skip
        for g in grads:
            adamnp.step(dev, to_device(g), states[fmt])
    sqrt_slot, bnb_slot = states["sqrt"].slots[0], states["bnb"].slots[0]
    assert be.to_host(sqrt_slot.codes_v).tobytes() != be.to_host(bnb_slot.codes_v).tobytes()
    run_sqrt(params, grads, CONFIGS["adamw"], 64)


def test_ratios_below_the_floor_match_reference():
    # Block 0's ratios m / s are about 1e-37, below R_FLOOR: its stored scale is raised to
    # the floor (the multiplier 127 / R stays finite) as in the reference; block 1 ordinary.
    n = 2 * 256
    grads = np.zeros(n, np.float32)
    grads[256:] = np.linspace(-1, 1, 256, dtype=np.float32)
    init = dict(state_bits=8, min_8bit_size=1)
    host, dev = np.ones(n, np.float32), to_device(np.ones(n, np.float32))
    s_ref = adamnp.init(host, adamnp.adam(lr=1e-3), backend="numpy", **init)
    s_dev = adamnp.init(dev, adamnp.adam(lr=1e-3), backend="cuda", **init)
    seeded = {
        "codes_m": (np.arange(n) % 255).astype(np.uint8),
        "codes_v": np.full(n, 255, np.uint8),
        "absmax_m": np.float32([1e-37, 1.0]),
        "absmax_v": np.ones(2, np.float32),
    }
    for name, value in seeded.items():
        getattr(s_ref.slots[0], name)[:] = value
        getattr(s_dev.slots[0], name).copy_to_device(value)
    adamnp.step(host, grads, s_ref)
    adamnp.step(dev, to_device(grads), s_dev)
    assert s_ref.slots[0].absmax_m[0] == np.float32(2.0**-120)
    assert_step_same(host, dev, s_ref, s_dev, 1)
