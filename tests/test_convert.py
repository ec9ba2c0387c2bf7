"""adamnp.convert_state: float32 <-> 8-bit state, between formats and block sizes, across
backends; each property checked against the formats' own encode/decode functions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from conftest import HOST_BACKENDS, snapshot

import adamnp
from adamnp import backends
from adamnp.lowbit import reference as bnb
from adamnp.lowbit import sqrt
from adamnp.lowbit.maps import moment_map, zero_code
from adamnp.lowbit.stochastic import gap_tables, root_keys, step_key

#: (state_format, v_rounding) of every 8-bit variant
FORMATS = [("sqrt", None), ("bnb", "nearest"), ("bnb", "stochastic")]
FORMAT_IDS = ["sqrt", "bnb", "bnb-sr"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(seed=0):
    """Two 8-bit-sized float32 leaves (one ending in a partial block), a small one and a
    float64 one (both always full precision)."""
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((3, 3000)).astype(np.float32),
        "emb": rng.standard_normal(5000).astype(np.float32),
        "b": rng.standard_normal(10).astype(np.float32),
        "d": rng.standard_normal(5000),
    }


def _grads(params, rng):
    """Gradients spanning six decades inside each block."""
    out = {}
    for k, p in params.items():
        scale = 10.0 ** rng.uniform(-6, 0, p.shape)
        out[k] = (rng.standard_normal(p.shape) * scale).astype(p.dtype)
    return out


def _trained(steps=3, amsgrad=False, backend="numpy", seed=0, **init_kw):
    """``(params, state)`` after ``steps`` AdamW steps."""
    params = _params(seed)
    config = adamnp.adamw(lr=1e-3, weight_decay=0.01, amsgrad=amsgrad)
    state = adamnp.init(params, config, backend=backend, **init_kw)
    rng = np.random.default_rng(seed + 1)
    for _ in range(steps):
        adamnp.step(params, _grads(params, rng), state)
    return params, state


def _copy(tree):
    return {k: a.copy() for k, a in tree.items()}


def _fmt(state_format, v_rounding):
    return {"state_format": state_format, "v_rounding": v_rounding}


def _decoded(state, i) -> dict:
    """The moments of leaf ``i`` as the state's format decodes them (float32), or the
    full-precision moments themselves."""
    slot = state.slots[i]
    if isinstance(slot, adamnp.Fp32Slot):
        return {x: a for x, a in zip(("m", "v", "vmax"), slot) if a is not None}
    names = ["m", "v"] + (["vmax"] if slot.codes_vmax is not None else [])
    codes = {x: getattr(slot, f"codes_{x}").reshape(-1) for x in names}
    absmax = {x: getattr(slot, f"absmax_{x}") for x in names}
    out = {x: np.empty(codes[x].size, np.float32) for x in names}
    if state.state_format == "sqrt":
        sqrt.dequantize_into(codes, absmax, slot.block_size, out)
    else:
        for x in names:
            bnb.dequantize_into(codes[x], absmax[x], moment_map(x), slot.block_size, out[x])
    return {x: a.reshape(slot.codes_m.shape) for x, a in out.items()}


def _encoded(state, moments_of, key_step) -> dict:
    """``{buffer name: array}`` of every 8-bit group of ``state`` as the format stores the
    float32 moments ``moments_of(i)`` after step ``key_step`` (the reference step's calls)."""
    out = {}
    for gi, group in enumerate(state.groups):
        if group.kind != "q8":
            continue
        bs = group.block_size
        key = step_key(key_step, int(group.leaf_ids[0]))
        bufs = {name: np.empty_like(b) for name, b in group.buffers.items()}
        for j, leaf in enumerate(group.leaf_ids):
            e0, e1 = group.offsets[j], group.offsets[j + 1]
            b0, b1 = group.block_offsets[j], group.block_offsets[j + 1]
            mom = {x: a.reshape(-1).astype(np.float32) for x, a in moments_of(leaf).items()}
            codes = {x: bufs[f"codes_{x}"][e0:e1] for x in mom}
            absmax = {x: bufs[f"absmax_{x}"][b0:b1] for x in mom}
            if group.state_format == "sqrt":
                roots = root_keys(group, key_step)
                sqrt.requantize_into(
                    mom["m"], mom["v"], mom.get("vmax"), codes, absmax, bs, key, e0, roots
                )
                continue
            for x, a in mom.items():
                qmap = moment_map(x)
                bnb.requantize_into(a, qmap, zero_code(qmap), bs, codes[x], absmax[x])
            if group.v_rounding == "stochastic":
                bnb.round_stochastic(mom["v"], moment_map("v"), bs, codes["v"], absmax["v"],
                                     key, e0)  # fmt: skip
        out.update({(gi, name): b for name, b in bufs.items()})
    return out


def _buffers(state) -> dict:
    be = backends.get(state.backend)
    return {
        (gi, name): np.asarray(be.to_host(b))
        for gi, g in enumerate(state.groups)
        for name, b in g.buffers.items()
    }


def _assert_same_bytes(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        assert got[k].tobytes() == expected[k].tobytes(), k


# -- 8 -> 32: exact


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize(("state_format", "v_rounding"), FORMATS, ids=FORMAT_IDS)
def test_8_to_32_moments_are_the_decoded_codes_bit_for_bit(state_format, v_rounding, amsgrad):
    _, q = _trained(amsgrad=amsgrad, state_bits=8, **_fmt(state_format, v_rounding))
    full = adamnp.convert_state(q, state_bits=32)
    assert full.state_bits == 32 and all(isinstance(s, adamnp.Fp32Slot) for s in full.slots)
    for i in range(len(q.slots)):
        expected = _decoded(q, i)
        got = _decoded(full, i)
        _assert_same_bytes(got, expected)
        assert got["m"].dtype == q.dtypes[i]


# -- 32 -> 8: the format's requantization with the key of the state's step


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize(("state_format", "v_rounding"), FORMATS, ids=FORMAT_IDS)
def test_32_to_8_codes_are_the_formats_requantize(state_format, v_rounding, amsgrad):
    _, full = _trained(steps=4, amsgrad=amsgrad)
    q = adamnp.convert_state(full, state_bits=8, **_fmt(state_format, v_rounding))
    assert (q.state_format, q.v_rounding) == (state_format, v_rounding or "stochastic")
    expected = _encoded(q, lambda i: _decoded(full, i), key_step=full.step)
    got = {k: b for k, b in _buffers(q).items() if k in expected}
    _assert_same_bytes(got, expected)
    for i, slot in enumerate(q.slots):  # full-precision leaves copied
        if isinstance(slot, adamnp.Fp32Slot):
            _assert_same_bytes(_decoded(q, i), _decoded(full, i))


@pytest.mark.parametrize(("state_format", "v_rounding"), FORMATS, ids=FORMAT_IDS)
def test_32_to_8_to_32_is_within_a_code_step(state_format, v_rounding):
    _, full = _trained(steps=4)
    q = adamnp.convert_state(full, state_bits=8, **_fmt(state_format, v_rounding))
    back = adamnp.convert_state(q, state_bits=32)
    for i, slot in enumerate(q.slots):
        if not isinstance(slot, adamnp.QuantSlot):
            continue
        got, want = _decoded(back, i), _decoded(full, i)
        bs = slot.block_size
        if state_format == "sqrt":  # s = sqrt(v) within one gap of its block's map
            s_got, s_want = np.sqrt(got["v"]).ravel(), np.sqrt(want["v"]).ravel()
            absmax = np.repeat(slot.absmax_v, bs)[: s_want.size]
            wide = absmax < 0  # the wide map: 3 mantissa bits below 2**-5, else 4
            floor = np.abs(absmax) * np.where(wide, sqrt.s_map(True)[0], sqrt.s_map()[0])
            ok = s_want > floor  # gradients span six decades: some may lie below the map
            assert ok.mean() > 0.9
            gap = np.where(wide, 1 / 8, 1 / 16) + 1e-6
            np.testing.assert_array_less(np.abs(s_got / s_want - 1)[ok], gap[ok])
            np.testing.assert_array_equal(s_got[~ok], floor[~ok])  # rounded up, never to 0
            # the ratio m / sqrt(v) the step is made of: within one level of its block's scale
            r_got = got["m"].ravel() / s_got
            r_want = want["m"].ravel() / s_want
            scale = np.repeat(slot.absmax_m, bs)[: s_want.size] / 127
            assert np.all(np.abs(r_got - r_want) <= scale * 1.001)
        else:  # each value within one gap of its map around it, times the block's absmax
            for x in ("m", "v"):
                codes = getattr(slot, f"codes_{x}").ravel().astype(int)
                absmax = np.repeat(getattr(slot, f"absmax_{x}"), bs)[: codes.size]
                up, down = (np.nan_to_num(t) for t in gap_tables(moment_map(x)))
                budget = np.maximum(up[codes], down[codes]) * absmax * 1.001
                assert np.all(np.abs(got[x] - want[x]).ravel() <= budget), x


# -- 8-bit step == decode, float32 step, encode (so the conversion's key is the format's)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize(("state_format", "v_rounding"), FORMATS, ids=FORMAT_IDS)
def test_8bit_step_equals_convert_step_convert(state_format, v_rounding, amsgrad, backend):
    params, q = _trained(amsgrad=amsgrad, backend=backend, state_bits=8,
                         **_fmt(state_format, v_rounding))  # fmt: skip
    grads = _grads(params, np.random.default_rng(7))
    p8, p32 = _copy(params), _copy(params)
    full = adamnp.convert_state(q, state_bits=32)
    adamnp.step(p8, grads, q)
    adamnp.step(p32, grads, full)
    again = adamnp.convert_state(full, state_bits=8)
    assert again.layout == q.layout and again.step == q.step == 4
    for k in params:
        assert p8[k].tobytes() == p32[k].tobytes(), k
    _assert_same_bytes(_buffers(again), _buffers(q))


# -- across backends


@pytest.mark.skipif("numba" not in HOST_BACKENDS, reason="needs the numba backend")
@pytest.mark.parametrize(("state_format", "v_rounding"), FORMATS, ids=FORMAT_IDS)
def test_numpy_and_numba_agree_bit_for_bit_after_conversion(state_format, v_rounding):
    params, full = _trained(amsgrad=True)
    kw = _fmt(state_format, v_rounding)
    on_numpy = adamnp.convert_state(full, state_bits=8, **kw)
    on_numba = adamnp.convert_state(full, state_bits=8, backend="numba", **kw)
    assert (on_numpy.backend, on_numba.backend) == ("numpy", "numba")
    _assert_same_bytes(_buffers(on_numba), _buffers(on_numpy))
    p_np, p_nb = _copy(params), _copy(params)
    rng = np.random.default_rng(3)
    for _ in range(3):
        grads = _grads(params, rng)
        adamnp.step(p_np, grads, on_numpy)
        adamnp.step(p_nb, grads, on_numba)
    for k in params:
        assert p_np[k].tobytes() == p_nb[k].tobytes(), k
    _assert_same_bytes(_buffers(on_numba), _buffers(on_numpy))


@pytest.mark.parametrize("bits", [32, 8])
def test_same_layout_on_another_backend_is_a_copy(bits):
    _, state = _trained(state_bits=bits)
    moved = adamnp.convert_state(state, backend="auto")
    assert moved.backend == backends.resolve("auto")
    assert moved.layout == state.layout
    _assert_same_bytes(_buffers(moved), _buffers(state))


# -- what is carried over, and what is not shared


def test_source_is_untouched_and_shares_no_memory(backend):
    params, q = _trained(backend=backend, amsgrad=True, state_bits=8, state_format="bnb")
    before = snapshot(params, q)
    results = [
        adamnp.convert_state(q, state_bits=32),
        adamnp.convert_state(q, state_bits=8),
        adamnp.convert_state(q, state_bits=8, state_format="sqrt", block_size=64),
    ]
    assert snapshot(params, q) == before
    mine = [b for g in q.groups for b in g.buffers.values()]
    for new in results:
        for g in new.groups:
            for b in g.buffers.values():
                assert not any(np.shares_memory(b, a) for a in mine)
        adamnp.step(params, _grads(params, np.random.default_rng(5)), new)
    assert snapshot(params, q)[1:] == before[1:]  # stepping a copy leaves the source


def test_counters_tree_and_configs_are_carried_over():
    params = _params()
    configs = {"decay": adamnp.adamw(weight_decay=0.1, amsgrad=True, nonfinite="skip"),
               "no_decay": adamnp.adamw(weight_decay=0.0, nonfinite="skip")}  # fmt: skip
    state = adamnp.init(params, configs, labels=lambda path, a: "decay" if a.size > 100
                        else "no_decay", backend="numpy")  # fmt: skip
    rng = np.random.default_rng(0)
    adamnp.step(params, _grads(params, rng), state)
    bad = _grads(params, rng)
    bad["w"][0, 0] = np.nan
    adamnp.step(params, bad, state)  # skipped
    q = adamnp.convert_state(state, state_bits=8)
    assert (q.step, q.skipped_steps) == (1, 1)
    assert (q.paths, q.shapes, q.dtypes, q.treedef) == (
        state.paths, state.shapes, state.dtypes, state.treedef)  # fmt: skip
    assert q.config == state.config and q.labels == state.labels
    assert q.configs == state.configs and q.configs is not state.configs
    assert q.slots[q.paths.index("params['w']")].codes_vmax is not None  # "decay": amsgrad
    adamnp.configure(q, label="no_decay", lr=0.5)
    assert state.configs["no_decay"].lr != 0.5
    adamnp.step(params, _grads(params, rng), q)
    assert q.step == 2


def test_opt_outs_are_carried_and_their_moments_exact():
    params = _params()
    kw = {"keep_fp32": "params['emb']", "min_8bit_size": 100}
    _, full = _trained(**kw)
    assert full.layout.keep_fp32 == ("params['emb']",) and full.layout.min_8bit_size == 100
    q = adamnp.convert_state(full, state_bits=8)
    expected = adamnp.init(params, adamnp.adamw(), backend="numpy", state_bits=8, **kw)
    assert q.layout == expected.layout
    kinds = {p: type(s).__name__ for p, s in zip(q.paths, q.slots)}
    assert kinds == {"params['b']": "Fp32Slot", "params['d']": "Fp32Slot",
                     "params['emb']": "Fp32Slot", "params['w']": "QuantSlot"}  # fmt: skip
    for p in ("params['b']", "params['d']", "params['emb']"):
        i = q.paths.index(p)
        _assert_same_bytes(_decoded(q, i), _decoded(full, i))
    # opting an 8-bit leaf out: its moments are the decoded codes
    with pytest.warns(UserWarning, match="no leaf got 8-bit moments"):
        out = adamnp.convert_state(q, keep_fp32=("params['emb']", "params['w']"))
    i = q.paths.index("params['w']")
    assert isinstance(out.slots[i], adamnp.Fp32Slot)
    _assert_same_bytes(_decoded(out, i), _decoded(q, i))
    # opting back in, by a predicate (it sees the leaf's shape and dtype)
    seen = {}
    back = adamnp.convert_state(out, keep_fp32=lambda path, a: seen.update({path: a}) or False,
                                min_8bit_size=4096)  # fmt: skip
    assert {p: (a.shape, a.dtype) for p, a in seen.items()} == dict(
        zip(q.paths, zip(q.shapes, q.dtypes))
    )
    assert back.layout.keep_fp32 == () and back.layout.min_8bit_size == 4096
    assert [type(s).__name__ for s in back.slots] == ["Fp32Slot", "Fp32Slot", "QuantSlot",
                                                      "QuantSlot"]  # fmt: skip


def test_layout_and_groups_are_inits():
    params = _params()
    _, full = _trained()
    opts = {"state_bits": 8, "state_format": "bnb", "block_size": 128, "min_8bit_size": 9000,
            "v_rounding": "stochastic", "keep_fp32": ["params['d']"]}  # fmt: skip
    q = adamnp.convert_state(full, **opts)
    ref = adamnp.init(params, full.config, backend="numpy", **opts)
    assert q.layout == ref.layout
    for g, h in zip(q.groups, ref.groups, strict=True):
        assert (g.kind, g.dtype, g.label) == (h.kind, h.dtype, h.label)
        for a, b in ((g.leaf_ids, h.leaf_ids), (g.offsets, h.offsets),
                     (g.block_offsets, h.block_offsets)):  # fmt: skip
            assert (a is None and b is None) or np.array_equal(a, b)
        assert {n: (b.dtype, b.shape) for n, b in g.buffers.items()} == {
            n: (b.dtype, b.shape) for n, b in h.buffers.items()
        }


def test_none_means_the_source_layout_and_the_new_formats_rounding():
    _, q = _trained(state_bits=8, state_format="bnb", block_size=64, v_rounding="stochastic")
    full = adamnp.convert_state(q, state_bits=32)
    assert full.layout == q.layout.__class__(32, "bnb", 64, 4096, "stochastic", ())
    assert adamnp.convert_state(full, state_bits=8).layout == q.layout
    assert adamnp.convert_state(q, state_format="sqrt").v_rounding == "stochastic"
    nearest = adamnp.convert_state(q, v_rounding="nearest")
    assert nearest.v_rounding == "nearest"
    _assert_same_bytes(_buffers(nearest), _buffers(q))  # same storage: codes copied
    assert adamnp.convert_state(nearest, state_format="sqrt").v_rounding == "stochastic"
    assert (
        adamnp.convert_state(
            adamnp.convert_state(nearest, state_format="sqrt"), state_format="bnb"
        ).v_rounding
        == "nearest"
    )


# -- between 8-bit formats and block sizes: decode, then encode


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ({"state_format": "bnb"}, {"state_format": "sqrt"}),
        ({"state_format": "sqrt"}, {"state_format": "bnb", "v_rounding": "stochastic"}),
        ({"state_format": "sqrt"}, {"block_size": 64}),
        ({"state_format": "bnb", "block_size": 4096}, {"block_size": 128}),
    ],
    ids=["bnb-sqrt", "sqrt-bnb", "sqrt-64", "bnb-4096-128"],
)
def test_8_to_8_is_decode_then_encode(source, target):
    _, q = _trained(amsgrad=True, state_bits=8, **source)
    got = adamnp.convert_state(q, **target)
    for name, value in target.items():
        assert getattr(got, name) == value
    expected = _encoded(got, lambda i: _decoded(q, i), key_step=q.step)
    _assert_same_bytes({k: b for k, b in _buffers(got).items() if k in expected}, expected)
    via_32 = adamnp.convert_state(adamnp.convert_state(q, state_bits=32), state_bits=8, **target)
    _assert_same_bytes(_buffers(got), _buffers(via_32))


# -- round trips through float32: what holds


def test_bnb_nearest_8_to_32_to_8_keeps_v_codes_and_positive_m_blocks():
    _, q = _trained(steps=5, amsgrad=True, state_bits=8, state_format="bnb")
    again = adamnp.convert_state(adamnp.convert_state(q, state_bits=32), state_bits=8)
    got, want = _buffers(again), _buffers(q)
    for k in want:
        if k[1].endswith(("_v", "_vmax")):
            assert got[k].tobytes() == want[k].tobytes(), k
    # m: the block's largest |m| decodes to itself only when it is positive (code 255 =
    # 1.0); a negative one decodes to 0.99297 * absmax, the new absmax
    for g, group in enumerate(q.groups):
        if group.kind != "q8":
            continue
        bs = group.block_size
        codes = want[g, "codes_m"]
        n_blocks = want[g, "absmax_m"].size
        top = np.zeros(n_blocks, bool)
        for j in range(len(group.leaf_ids)):
            e0, e1 = group.offsets[j], group.offsets[j + 1]
            b0 = group.block_offsets[j]
            for b in range(-(-(e1 - e0) // bs)):
                top[b0 + b] = (codes[e0 + b * bs : min(e0 + (b + 1) * bs, e1)] == 255).any()
        assert top.mean() > 0.3 and not top.all()
        np.testing.assert_array_equal(got[g, "absmax_m"][top], want[g, "absmax_m"][top])
        shrunk = got[g, "absmax_m"][~top] / want[g, "absmax_m"][~top]
        np.testing.assert_allclose(shrunk, -moment_map("m")[0], rtol=1e-6)


@pytest.mark.parametrize(("state_format", "v_rounding"), FORMATS, ids=FORMAT_IDS)
def test_8_to_32_to_8_changes_few_codes_by_one(state_format, v_rounding):
    _, q = _trained(steps=5, amsgrad=True, state_bits=8, **_fmt(state_format, v_rounding))
    again = adamnp.convert_state(adamnp.convert_state(q, state_bits=32), state_bits=8)
    got, want = _buffers(again), _buffers(q)
    for k in want:
        if k[1].startswith("codes_"):
            a, b = want[k].astype(int), got[k].astype(int)
            if k[1] == "codes_m" and state_format == "sqrt":
                a, b = want[k].view(np.int8).astype(int), got[k].view(np.int8).astype(int)
            if state_format == "sqrt" and k[1] != "codes_m":
                # A block of s whose only value below 2**-13 of its largest rounded up may
                # come back on the narrow map (all its codes change): few blocks (the maps
                # from each leaf's absmax signs), and codes elsewhere as for other moments.
                name = "absmax_" + k[1][len("codes_") :]
                same = np.concatenate([
                    np.repeat((getattr(x, name) < 0) == (getattr(y, name) < 0), x.block_size)[
                        : getattr(x, k[1]).size
                    ]
                    for x, y in zip(q.slots, again.slots, strict=True)
                    if isinstance(x, adamnp.QuantSlot)
                ])  # fmt: skip
                assert same.size == a.size and (~same).mean() <= 0.05, k
                a, b = a[same], b[same]
            assert (a != b).mean() <= 1e-3 and np.all(np.abs(a - b) <= 1), k
        elif k[1] == "absmax_m" and state_format == "sqrt":  # R / 127 * 127, m / s: roundings
            ulps = np.abs(want[k].view(np.int32) - got[k].view(np.int32))
            assert ulps.max() <= 2, k


# -- options


BAD = [
    ("state_bits", 16, ValueError),
    ("state_bits", 8.0, TypeError),
    ("state_format", "fp8", ValueError),
    ("block_size", 100, ValueError),
    ("block_size", True, TypeError),
    ("min_8bit_size", -1, ValueError),
    ("v_rounding", "up", ValueError),
    ("keep_fp32", "params['nope']", ValueError),
    ("keep_fp32", 3, TypeError),
]


@pytest.mark.parametrize(("option", "value", "error"), BAD)
def test_bad_options_raise_inits_error_and_change_nothing(option, value, error):
    params, q = _trained(state_bits=8)
    before = snapshot(params, q)
    kw = {"state_bits": 8, option: value}
    with pytest.raises(error) as expected:
        adamnp.init(params, q.config, backend="numpy", **kw)
    with pytest.raises(error) as got:
        adamnp.convert_state(q, **kw)
    assert str(got.value) == str(expected.value) and option in str(got.value)
    assert snapshot(params, q) == before


def test_sqrt_refuses_nearest_rounding_and_bad_backends_and_non_states():
    _, q = _trained(state_bits=8, state_format="bnb", v_rounding="nearest")
    with pytest.raises(ValueError, match="v_rounding='nearest'"):
        adamnp.convert_state(q, state_format="sqrt", v_rounding="nearest")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        adamnp.convert_state(q, backend="gpu")
    with pytest.raises(TypeError, match="state must be an AdamState, got dict"):
        adamnp.convert_state({}, state_bits=8)


def test_no_8bit_leaf_warns_as_init():
    _, full = _trained()
    with pytest.warns(UserWarning, match="no leaf got 8-bit moments"):
        q = adamnp.convert_state(full, state_bits=8, min_8bit_size=10**6)
    assert all(isinstance(s, adamnp.Fp32Slot) for s in q.slots)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adamnp.convert_state(full, state_bits=8)


def test_nonfinite_moments_stay_nonfinite():
    params = {"w": np.ones(1000, np.float32)}
    state = adamnp.init(params, adamnp.adam(nonfinite="propagate"), backend="numpy")
    adamnp.step(params, {"w": np.ones(1000, np.float32)}, state)
    state.slots[0].m[300] = np.inf  # as a step with nonfinite="propagate" can leave them
    state.slots[0].v[300] = np.nan
    for fmt in ("sqrt", "bnb"):
        q = adamnp.convert_state(state, state_bits=8, state_format=fmt, min_8bit_size=0)
        assert np.isnan(q.slots[0].absmax_v[1]) and np.isfinite(q.slots[0].absmax_v[0])
        back = adamnp.convert_state(q, state_bits=32)
        v = back.slots[0].v
        assert np.isnan(v[256:512]).all() and np.isfinite(v[:256]).all()


# -- CUDA, in numba-cuda's simulator (a process of its own)


def test_cuda_state_in_the_simulator():
    pytest.importorskip("numba_cuda")
    code = """
        import numpy as np, adamnp
        from adamnp import backends
        params = {"w": np.linspace(-1, 1, 700, dtype=np.float32), "b": np.ones(5, np.float32)}
        grads = {k: np.cos(7 * p).astype(np.float32) for k, p in params.items()}
        host = adamnp.init(params, adamnp.adamw(amsgrad=True), backend="numpy")
        adamnp.step(params, grads, host)
        def buffers(s):
            be = backends.get(s.backend)
            return [be.to_host(b).tobytes() for g in s.groups for b in g.buffers.values()]
        kw = dict(state_bits=8, min_8bit_size=100, block_size=64)
        dev = adamnp.convert_state(host, backend="cuda", **kw)   # host 32 -> device 8
        assert dev.backend == "cuda"
        assert buffers(dev) == buffers(adamnp.convert_state(host, **kw))
        dev32 = adamnp.convert_state(dev, state_bits=32)         # device 8 -> device 32
        back = adamnp.convert_state(dev32, backend="numpy")      # device -> host, a copy
        assert back.backend == "numpy" and buffers(back) == buffers(dev32)
        ref = adamnp.convert_state(adamnp.convert_state(host, **kw), state_bits=32)
        assert buffers(back) == buffers(ref)
        from numba import cuda                                   # a step on the result
        dev_params = {k: cuda.to_device(p) for k, p in params.items()}
        host8 = adamnp.convert_state(host, **kw)
        adamnp.step(params, grads, host8)
        adamnp.step(dev_params, {k: cuda.to_device(g) for k, g in grads.items()}, dev)
        assert buffers(dev) == buffers(host8)
        assert all(dev_params[k].copy_to_host().tobytes() == p.tobytes()
                   for k, p in params.items())
        print("ok")
    """
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr[-5000:]
