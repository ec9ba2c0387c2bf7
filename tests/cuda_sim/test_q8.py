"""8-bit state of bitsandbytes' format (``state_format="bnb"``) on the CUDA backend gives the
NumPy reference's bits (in the simulator); the ``"sqrt"`` format is test_q8_sqrt.py's, and
the tests of what both formats share run here for both.

Params and absmax must be bitwise equal. Codes must be equal too: the kernel divides by
the same float32 absmax (IEEE division) and looks codes up with the same exact table as
the reference, so even a scaled value at a float32 midpoint of two map values gets the
same code. A code mismatch is still classified (next to a midpoint, within one float32
rounding of the scaled value, or not) so that a failure says which rule broke.
"""

from __future__ import annotations

import numpy as np
import pytest

import adamnp
from adamnp import quant
from adamnp._tree import flatten
from adamnp.backends import cuda as be
from adamnp.lowbit import reference as _q8_numpy

from .helpers import edge_grads, grads_like, to_device, to_host

FIELDS = ("codes_m", "codes_v", "codes_vmax", "absmax_m", "absmax_v", "absmax_vmax")


def run_q8(params, grads_seq, config, monkeypatch, block_size=64, min_8bit_size=1, **kw):
    """Run both backends on ``"bnb"``-format state; return ``(host params, device params,
    ref state, cuda state, the reference's unquantized float32 moments of the last step, per
    leaf and moment)``."""
    leaves, treedef, _ = flatten(params)
    host = adamnp._tree.unflatten(treedef, [a.copy() for a in leaves])
    dev = to_device(params)
    init = dict(state_bits=8, block_size=block_size, min_8bit_size=min_8bit_size,
                state_format="bnb", **kw)  # fmt: skip
    s_ref = adamnp.init(host, config, backend="numpy", **init)
    s_dev = adamnp.init(dev, config, backend="cuda", **init)
    seen = []
    original = _q8_numpy.requantize_into

    def record(x, code, zero_code, block_size, codes_out, absmax_out):
        seen.append(x.copy())
        original(x, code, zero_code, block_size, codes_out, absmax_out)

    monkeypatch.setattr(_q8_numpy, "requantize_into", record)
    for grads in grads_seq:
        seen.clear()
        adamnp.step(host, grads, s_ref)
        adamnp.step(dev, to_device(grads), s_dev)
    return host, dev, s_ref, s_dev, _moments(s_ref, seen)


def _moments(state, seen) -> dict:
    """``{(leaf, field): x}`` from the reference's requantize calls of one step (in its
    order: groups, leaves, chunks, then m, v, vmax)."""
    out, calls = {}, iter(seen)
    names = ("m", "v", "vmax") if state.config.amsgrad else ("m", "v")
    for group in state.groups:
        if group.kind != "q8":
            continue
        for j, leaf in enumerate(group.leaf_ids):
            n = int(group.offsets[j + 1] - group.offsets[j])
            parts = {x: [] for x in names}
            for _ in range(-(-n // max(_chunk(group.block_size), 1))):
                for x in names:
                    parts[x].append(next(calls))
            for x in names:
                out[int(leaf), f"codes_{x}"] = np.concatenate(parts[x])
    return out


def _chunk(bs):
    from adamnp.backends.numpy import CHUNK

    return max(bs, CHUNK // bs * bs)


def classify_codes(got, expected, x, absmax, code, block_size):
    """``(mismatches, at a float32 midpoint)``: code mismatches, and those whose scaled
    value ``x / absmax`` lies within one float32 rounding of the midpoint of the two codes."""
    bad = np.flatnonzero(got.reshape(-1) != expected.reshape(-1))
    if bad.size == 0:
        return 0, 0
    scale = np.repeat(absmax, block_size)[: x.size][bad]
    s = x[bad] / np.where(scale > 0, scale, np.float32(1))
    lo = np.minimum(got.reshape(-1)[bad], expected.reshape(-1)[bad]).astype(np.int64)
    mid = (code[lo].astype(np.float64) + code[np.minimum(lo + 1, 255)]) / 2
    near = np.abs(s.astype(np.float64) - mid) <= np.spacing(np.abs(s)).astype(np.float64)
    return int(bad.size), int(near.sum())


def assert_q8_same(host, dev, s_ref, s_dev, moments) -> dict:
    """Params bitwise, absmax bitwise (NaN blocks included), codes equal; return counts."""
    for a, b in zip(flatten(to_host(dev))[0], flatten(host)[0], strict=True):
        assert a.tobytes() == b.tobytes()
    counts = {"codes": 0, "mismatches": 0, "at_midpoint": 0}
    for i, (ref, got) in enumerate(zip(s_ref.slots, s_dev.slots, strict=True)):
        if not isinstance(ref, adamnp._state.QuantSlot):
            for name in ("m", "v", "vmax"):
                if getattr(ref, name) is not None:
                    expected, actual = getattr(ref, name), be.to_host(getattr(got, name))
                    assert actual.tobytes() == expected.tobytes(), (i, name)
            continue
        for name in FIELDS:
            expected = getattr(ref, name)
            if expected is None:
                assert getattr(got, name) is None
                continue
            actual = be.to_host(getattr(got, name))
            assert actual.dtype == expected.dtype and actual.shape == expected.shape
            if name.startswith("absmax"):
                assert actual.tobytes() == expected.tobytes(), (i, name)
                continue
            absmax = getattr(ref, name.replace("codes", "absmax"))
            code = quant.dynamic_map(name == "codes_m")
            n, near = classify_codes(actual, expected, moments[i, name], absmax, code,
                                     ref.block_size)  # fmt: skip
            counts["codes"] += expected.size
            counts["mismatches"] += n
            counts["at_midpoint"] += near
    assert (s_dev.step, s_dev.skipped_steps) == (s_ref.step, s_ref.skipped_steps)
    assert counts["mismatches"] == 0, counts
    return counts


SIZES = [1, 255, 256, 257, 2000]


@pytest.mark.parametrize("block_size", [64, 256])
def test_sizes_match_reference(block_size, monkeypatch):
    # One group of five leaves (one launch per step), partial last blocks and tiles.
    rng = np.random.default_rng(block_size)
    params = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    grads = grads_like(params, rng, 3)
    cfg = adamnp.adamw(lr=1e-2, weight_decay=0.1)
    counts = assert_q8_same(*run_q8(params, grads, cfg, monkeypatch, block_size))
    assert counts["codes"] == 2 * sum(SIZES)


@pytest.mark.parametrize("block_size", [128, 4096])
def test_other_block_sizes(block_size, monkeypatch):
    # 128: a full warp per block in the simulator's launch; 4096: tiles of one block with
    # many elements per thread.
    rng = np.random.default_rng(7)
    sizes = (5000, 130) if block_size == 4096 else (1500, 130)
    params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    cfg = adamnp.adam(lr=1e-2, amsgrad=True)
    assert_q8_same(*run_q8(params, grads_like(params, rng, 2), cfg, monkeypatch, block_size))


CONFIGS = {
    "adam-l2": adamnp.adam(lr=1e-2, weight_decay=0.05),
    "amsgrad": adamnp.adamw(lr=1e-2, weight_decay=0.1, amsgrad=True),
    "maximize": adamnp.adam(lr=1e-2, maximize=True, amsgrad=True),
    "small-beta1": adamnp.adamw(lr=1e-2, betas=(0.3, 0.9)),  # torch's lerp with weight >= 0.5
    "schedule": adamnp.adamw(lr=lambda t: 1e-2 / (1 + t), eps=1e-6),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_match_reference(name, monkeypatch):
    rng = np.random.default_rng(len(name))
    params = [rng.standard_normal(n).astype(np.float32) for n in (257, 700)]
    bs = 256 if name in ("amsgrad", "schedule") else 64
    assert_q8_same(*run_q8(params, grads_like(params, rng, 3), CONFIGS[name], monkeypatch, bs))


def test_clipping_scale_matches_reference(monkeypatch):
    # The gradient norm is summed in another order than NumPy's. The float32 clipping
    # factor the kernels multiply by is the same here (checked first), so all bits are.
    from adamnp.backends import numpy as ref
    from adamnp.backends.math import kernel_scalars

    rng = np.random.default_rng(11)
    params = [rng.standard_normal(n).astype(np.float32) for n in (300, 500)]
    grads = grads_like(params, rng, 2, scale=10.0)
    cfg = adamnp.adamw(lr=1e-2, max_grad_norm=0.5)
    for g in grads:
        norms = ref.grad_sq_norm(g), be.grad_sq_norm(to_device(g))
        scales = [
            kernel_scalars(adamnp.backends.math.host_scalars(cfg, 1, 1e-2, 0.5 / (x**0.5 + 1e-6)),
                           np.float32).grad_scale for x in norms
        ]  # fmt: skip
        assert scales[0] == scales[1] < 1
    assert_q8_same(*run_q8(params, grads, cfg, monkeypatch))


def test_nan_block_propagates_like_reference(monkeypatch):
    rng = np.random.default_rng(12)
    params = [rng.standard_normal(n).astype(np.float32) for n in (700, 200)]
    grads = grads_like(params, rng, 3)
    grads[1][0][300] = np.nan  # block 4 of leaf 0 (block size 64), at step 2
    cfg = adamnp.adamw(lr=1e-2, nonfinite="propagate", amsgrad=True)
    out = run_q8(params, grads, cfg, monkeypatch)
    assert_q8_same(*out)
    slot = out[3].slots[0]
    for name in ("m", "v", "vmax"):
        absmax = be.to_host(getattr(slot, f"absmax_{name}"))
        codes = be.to_host(getattr(slot, f"codes_{name}"))
        assert np.isnan(absmax[4]) and np.isfinite(np.delete(absmax, 4)).all()
        zero = int(np.flatnonzero(quant.dynamic_map(name == "m") == 0)[0])
        assert (codes[256:320] == zero).all()
    p = to_host(out[1])[0]
    assert np.isnan(p[256:320]).all() and np.isfinite(np.delete(p, np.s_[256:320])).all()


@pytest.mark.parametrize("name", ["amsgrad", "maximize", "small-beta1"])
def test_subnormal_and_near_limit_blocks_match_reference(name, monkeypatch):
    # Blocks whose absmax is subnormal (v from gradients ~1e-20; m from 1e-44..1e-38) or
    # comes from gradients just below the limit (2**63), next to ordinary blocks.
    rng = np.random.default_rng(18)
    params = [rng.standard_normal(n).astype(np.float32) for n in (320, 257)]
    out = run_q8(params, edge_grads(params, rng, 3), CONFIGS[name], monkeypatch)
    assert_q8_same(*out)
    tiny = np.finfo(np.float32).tiny
    for slot in out[3].slots:
        absmax_m, absmax_v = be.to_host(slot.absmax_m), be.to_host(slot.absmax_v)
        assert ((absmax_v > 0) & (absmax_v < tiny)).any()
        assert ((absmax_m > 0) & (absmax_m < tiny)).any()
        assert np.isfinite(absmax_v).all() and absmax_v.max() > 1e33


@pytest.mark.parametrize("state_format", ["sqrt", "bnb"])
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_huge_gradient_leaves_8bit_state_unchanged(policy, state_format):
    # 1e21 is finite, but its square overflows v: "raise" and "skip" reject it first.
    rng = np.random.default_rng(19)
    params = to_device({"w": rng.standard_normal(300).astype(np.float32)})
    state = adamnp.init(params, adamnp.adamw(nonfinite=policy), backend="cuda", state_bits=8,
                        block_size=64, min_8bit_size=1, state_format=state_format)  # fmt: skip
    adamnp.step(params, to_device(grads_like(to_host(params), rng, 1)[0]), state)
    grads = grads_like(to_host(params), rng, 1)[0]
    grads["w"][100] = 1e21

    def snap():
        buffers = {k: be.to_host(b).tobytes() for k, b in state.groups[0].buffers.items()}
        return to_host(params)["w"].tobytes(), buffers, state.step

    before = snap()
    if policy == "raise":
        with pytest.raises(ValueError, match=r"grads\['w'\].*nonfinite='raise'"):
            adamnp.step(params, to_device(grads), state)
    else:
        adamnp.step(params, to_device(grads), state)
    assert snap() == before
    assert state.skipped_steps == (policy == "skip")


STOCHASTIC = {
    # Two 8-bit leaves in one group (partial last blocks, the second at offset 257).
    "adamw": (adamnp.adamw(lr=1e-2, weight_decay=0.1), 1),
    # vmax stays nearest; a float32 leaf first, so the group's hash tag is leaf 1, not 0.
    "amsgrad": (adamnp.adam(lr=1e-2, amsgrad=True), 100),
    # A NaN block (leaf "b", block 4 from step 2) keeps the zero code of v.
    "nan": (adamnp.adamw(lr=1e-2, nonfinite="propagate"), 100),
}


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_v_matches_reference(name, monkeypatch):
    config, min_size = STOCHASTIC[name]
    rng = np.random.default_rng(16)
    params = {"a": rng.standard_normal(40).astype(np.float32),
              "b": rng.standard_normal(700).astype(np.float32),
              "c": rng.standard_normal(257).astype(np.float32)}  # fmt: skip
    if min_size == 1:
        del params["a"]
    grads = grads_like(params, rng, 3)
    if name == "nan":
        grads[1]["b"][300] = np.nan
    out = run_q8(params, grads, config, monkeypatch, min_8bit_size=min_size,
                 v_rounding="stochastic")  # fmt: skip
    assert_q8_same(*out)
    (group,) = [g for g in out[3].groups if g.kind == "q8"]
    assert group.v_rounding == "stochastic" and len(group.leaf_ids) == 2
    assert int(group.leaf_ids[0]) == (0 if min_size == 1 else 1)
    # The same steps rounded to nearest (the reference) store other codes of v, the same of
    # m (which does not depend on v; amsgrad's vmax does).
    host = {k: v.copy() for k, v in params.items()}
    nearest = adamnp.init(host, config, backend="numpy", state_bits=8, block_size=64,
                          min_8bit_size=min_size, state_format="bnb")  # fmt: skip
    for g in grads:
        adamnp.step(host, g, nearest)
    for got, ref in zip(out[3].slots, nearest.slots, strict=True):
        if isinstance(ref, adamnp._state.QuantSlot):
            assert (be.to_host(got.codes_v) != ref.codes_v).any()
            assert be.to_host(got.codes_m).tobytes() == ref.codes_m.tobytes()
    if name == "nan":
        slot = out[3].slots[1]
        zero = int(np.flatnonzero(quant.dynamic_map(False) == 0)[0])
        assert np.isnan(be.to_host(slot.absmax_v)[4])
        assert (be.to_host(slot.codes_v)[256:320] == zero).all()


def test_mixed_tree_with_fp32_leaves(monkeypatch):
    # 8-bit leaves, float32 leaves below min_8bit_size and float64 leaves: three groups.
    rng = np.random.default_rng(13)
    params = {
        "w": rng.standard_normal((17, 31)).astype(np.float32),
        "b": rng.standard_normal(40).astype(np.float32),
        "d": rng.standard_normal(300).astype(np.float64),
        "e": np.zeros(0, np.float32),
    }
    out = run_q8(params, grads_like(params, rng, 2), adamnp.adam(lr=1e-2), monkeypatch,
                 min_8bit_size=100)  # fmt: skip
    assert {g.kind for g in out[3].groups} == {"q8", "fp32"} and len(out[3].groups) == 3
    assert_q8_same(*out)


def test_many_leaves_one_launch(monkeypatch):
    # More tiles than blocks: each CUDA block loops over tiles of different leaves.
    rng = np.random.default_rng(14)
    params = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(1, 300, 16)]
    assert_q8_same(*run_q8(params, grads_like(params, rng, 2), adamnp.adamw(lr=1e-2),
                           monkeypatch))  # fmt: skip


@pytest.mark.parametrize("state_format", ["sqrt", "bnb"])
@pytest.mark.parametrize("target", ["cuda", "numpy"])
def test_checkpoint_round_trip(tmp_path, target, state_format):
    # 8-bit cuda state -> file -> `target` backend; continuing gives the uninterrupted bits.
    rng = np.random.default_rng(15)
    start = {"w": rng.standard_normal((9, 31)).astype(np.float32),
             "b": rng.standard_normal(7).astype(np.float32)}  # fmt: skip
    grads = grads_like(start, rng, 4)
    cfg = adamnp.adamw(lr=1e-2, amsgrad=True)
    kw = dict(state_bits=8, min_8bit_size=100, block_size=64, state_format=state_format)
    full = to_device(start)
    s_full = adamnp.init(full, cfg, backend="cuda", **kw)
    for g in grads:
        adamnp.step(full, to_device(g), s_full)
    part = to_device(start)
    s_part = adamnp.init(part, cfg, backend="cuda", **kw)
    for g in grads[:2]:
        adamnp.step(part, to_device(g), s_part)
    adamnp.save_state(tmp_path / "state.npz", s_part)
    loaded = adamnp.load_state(tmp_path / "state.npz", backend=target)
    assert loaded.backend == target and loaded.step == 2 and loaded.block_size == 64
    assert loaded.state_format == state_format
    resumed = part if target == "cuda" else to_host(part)
    for g in grads[2:]:
        adamnp.step(resumed, to_device(g) if target == "cuda" else g, loaded)
    for a, b in zip(flatten(to_host(resumed) if target == "cuda" else resumed)[0],
                    flatten(to_host(full))[0]):  # fmt: skip
        assert a.tobytes() == b.tobytes()
    for x, y in zip(loaded.slots, s_full.slots, strict=True):
        for a, b in zip(x, y, strict=True):
            if a is None or isinstance(a, (int, str)):
                assert a == b
            else:
                got = a if target == "numpy" else be.to_host(a)
                assert got.tobytes() == be.to_host(b).tobytes()


@pytest.mark.parametrize("state_format", ["sqrt", "bnb"])
def test_state_bytes_on_the_device(state_format):
    params = to_device({"w": np.zeros(1000, np.float32)})
    state = adamnp.init(params, adamnp.adamw(amsgrad=True), backend="cuda", state_bits=8,
                        min_8bit_size=1, block_size=256, state_format=state_format)  # fmt: skip
    assert all(be.owns(b) for g in state.groups for b in g.buffers.values())
    assert state.nbytes() == 3 * (1000 + 4 * 4)
    slot = state.slots[0]
    codes = [be.to_host(c) for c in (slot.codes_m, slot.codes_v, slot.codes_vmax)]
    assert all((be.to_host(a) == 0).all() for a in (slot.absmax_m, slot.absmax_v))
    if state_format == "bnb":  # the code of 0 in each map
        assert (quant.dynamic_map(True)[codes[0]] == 0).all()
        assert all((quant.dynamic_map(False)[c] == 0).all() for c in codes[1:])
    else:  # code 0 (r = 0; any s times absmax 0 is 0)
        assert all((c == 0).all() for c in codes)
