"""The compiled leaf check (adamnp.backends.numba.leaves) against the same checks in Python:
it may only say True where every check passes, and must say False where one fails."""

from __future__ import annotations

import numpy as np
import pytest

from adamnp import backends

if not backends.available("numba"):
    pytest.skip("the numba backend is not available", allow_module_level=True)

from adamnp.backends.numba import leaves

if leaves.FIELDS is None:
    pytest.skip("NumPy's array struct could not be verified here", allow_module_level=True)

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [(3,), (2, 5), (0,), (), (4, 1, 3), (257,)]
DTYPES = [np.float32, np.float64, np.float16, BF16, np.float32, np.float64]


def _alt(dtype):
    return np.dtype(np.float32) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)


def _oracle(p_leaves, g_leaves, shapes, dtypes, arenas) -> bool:
    """The checks written plainly."""
    for i, (p, g) in enumerate(zip(p_leaves, g_leaves)):
        if p.shape != shapes[i] or g.shape != shapes[i] or p.dtype != dtypes[i]:
            return False
        if g.dtype not in (np.dtype(dtypes[i]), _alt(dtypes[i])):
            return False
        if not (p.flags.c_contiguous and p.flags.writeable and g.flags.c_contiguous):
            return False
    spans = [_span(a) for a in p_leaves + g_leaves + list(arenas)]
    spans = [(lo, hi) for lo, hi in spans if hi > lo]  # empty arrays overlap nothing
    return not any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :])


def _span(a):
    lo = a.__array_interface__["data"][0]
    return lo, lo + a.nbytes


def _fresh(rng):
    p = [
        rng.standard_normal(s).astype(d) if s else np.array(1.5, d) for s, d in zip(SHAPES, DTYPES)
    ]
    g = [
        rng.standard_normal(s).astype(d) if s else np.array(0.5, d) for s, d in zip(SHAPES, DTYPES)
    ]
    arena = np.zeros(64, np.float32)
    return p, g, [arena]


def _verdict(p, g, arenas):
    spec = leaves.LeafSpec(SHAPES, DTYPES, [_alt(d) for d in DTYPES])
    lo = np.array([a.__array_interface__["data"][0] for a in arenas], np.int64)
    hi = lo + np.array([a.nbytes for a in arenas], np.int64)
    return leaves.host_leaves_ok(p, g, spec, lo, hi)


def _change(name, p, g, arenas):
    if name == "float32 grad of a half leaf":
        g[2] = g[2].astype(np.float32)
    elif name == "float64 grad of a float32 leaf":
        g[0] = g[0].astype(np.float64)
    elif name == "byte-swapped dtype":
        p[1] = p[1].astype(">f8")
    elif name == "float16 param where bfloat16 expected":
        p[3] = p[3].astype(np.float32).astype(np.float16)
    elif name == "transposed":
        p[1] = np.ascontiguousarray(p[1].T).T
    elif name == "strided grad":
        g[5] = np.repeat(g[5], 2)[::2]
    elif name == "read-only param":
        p[0].flags.writeable = False
    elif name == "read-only grad":
        g[0].flags.writeable = False
    elif name == "grad is its param":
        g[1] = p[1]
    elif name == "grad is a view of another param":
        g[0] = p[5][10:13]
    elif name == "params overlap":
        p[0] = p[5][:3]
    elif name == "param in the state's arena":
        p[0] = arenas[0][5:8]
    elif name == "empty leaves share an address":
        g[2] = p[2]
    elif name == "wrong shape":
        g[4] = g[4].reshape(4, 3, 1)
    elif name == "wrong size":
        p[5] = np.zeros(256, np.float64)
    elif name == "0-d grad shape ()":
        g[3] = np.zeros((1,), BF16)
    elif name == "adjacent, not overlapping":
        base = np.zeros(6, np.float32)
        p[0], g[0] = base[:3], base[3:]
    return p, g, arenas


CHANGES = [
    "none",
    "float32 grad of a half leaf",
    "float64 grad of a float32 leaf",
    "byte-swapped dtype",
    "float16 param where bfloat16 expected",
    "transposed",
    "strided grad",
    "read-only param",
    "read-only grad",
    "grad is its param",
    "grad is a view of another param",
    "params overlap",
    "param in the state's arena",
    "empty leaves share an address",
    "wrong shape",
    "wrong size",
    "0-d grad shape ()",
    "adjacent, not overlapping",
]


@pytest.mark.parametrize("name", CHANGES)
def test_agrees_with_the_checks_in_python(name):
    p, g, arenas = _change(name, *_fresh(np.random.default_rng(0)))
    expected = _oracle(p, g, SHAPES, DTYPES, arenas)
    assert _verdict(p, g, arenas) is expected
    if name in (
        "none",
        "float32 grad of a half leaf",
        "read-only grad",
        "adjacent, not overlapping",
    ):
        assert expected  # the cases that must pass do


def test_random_views_of_one_buffer():
    """Leaves cut from one buffer at random offsets: True exactly when none overlap."""
    rng = np.random.default_rng(1)
    shapes, dtypes = [(5,)] * 4, [np.float32] * 4
    spec = leaves.LeafSpec(shapes, dtypes, dtypes)
    empty = np.empty(0, np.int64)
    seen = set()
    for _ in range(300):
        buf = np.zeros(120, np.float32)
        starts = rng.integers(0, 116, 8)
        cut = [buf[s : s + 5] for s in starts]
        verdict = leaves.host_leaves_ok(cut[:4], cut[4:], spec, empty, empty)
        expected = _oracle(cut[:4], cut[4:], shapes, dtypes, [])
        assert verdict is expected
        seen.add(expected)
    assert seen == {True, False}


def test_other_types_are_left_to_python():
    p, g, arenas = _fresh(np.random.default_rng(2))
    g[0] = np.ma.masked_array(g[0])
    assert _verdict(p, g, arenas) is None


def test_the_scan_s_own_sort_orders_any_spans():
    import numba

    from adamnp.backends.numba.leaves import _sort_spans

    sort = numba.njit(lambda lo, hi: _sort_spans(lo, hi))
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 3, 7, 64, 1000, 5000):
        for high in (3, 2**62):  # many ties, then distinct addresses
            lo = rng.integers(0, high, n).astype(np.int64)
            hi = lo + rng.integers(0, 100, n)
            pairs = sorted(zip(lo.tolist(), hi.tolist()))
            sort(lo, hi)
            assert (np.diff(lo) >= 0).all()
            assert sorted(zip(lo.tolist(), hi.tolist())) == pairs  # the spans moved whole
        lo = np.arange(n, dtype=np.int64)[::-1].copy()
        hi = lo * 2
        sort(lo, hi)
        assert lo.tolist() == list(range(n)) and (hi == 2 * lo).all()


def test_many_leaves_in_any_address_order():
    """Hundreds of leaves, in address order and shuffled, with one overlap put anywhere."""
    rng = np.random.default_rng(3)
    n = 300
    shapes, dtypes = [(4,)] * n, [np.float32] * n
    spec = leaves.LeafSpec(shapes, dtypes, dtypes)
    empty = np.empty(0, np.int64)
    buf = np.zeros(8 * n + 4, np.float32)
    cut = [buf[4 * i : 4 * i + 4] for i in range(2 * n)]  # adjacent, disjoint
    for trial in range(20):
        order = rng.permutation(2 * n) if trial else np.arange(2 * n)
        views = [cut[i] for i in order]
        assert leaves.host_leaves_ok(views[:n], views[n:], spec, empty, empty) is True
        k = rng.integers(0, 2 * n)
        start = 4 * int(order[k]) + int(rng.integers(1, 4))  # overlaps leaf k, no other's start
        views[int(rng.integers(0, 2 * n))] = buf[start : start + 4]
        expected = _oracle(views[:n], views[n:], shapes, dtypes, [])
        assert leaves.host_leaves_ok(views[:n], views[n:], spec, empty, empty) is expected


def test_large_leaves_are_checked_in_python(monkeypatch):
    """Leaves of SCAN_MAX_MEAN_LEAF elements on average skip the compiled scan (no compile
    on first use) and get the same checks: a step goes through, a bad leaf is named and
    nothing is written."""
    import adamnp
    from adamnp import _validate

    def refuse(*args):
        raise AssertionError("the compiled scan ran for large leaves")

    monkeypatch.setattr(leaves, "host_leaves_ok", refuse)
    monkeypatch.setattr(adamnp.backends.get("numba"), "host_leaves_ok", refuse)
    n = _validate.SCAN_MAX_MEAN_LEAF
    p = {"a": np.ones(n + 1, np.float32), "b": np.ones(n - 1, np.float32)}
    g = {"a": np.full(n + 1, 0.5, np.float32), "b": np.full(n - 1, 0.5, np.float32)}
    state = adamnp.init(p, adamnp.adamw(lr=0.1), backend="numba")
    adamnp.step(p, g, state)
    assert p["a"][0] < 1 and p["b"][-1] < 1
    before = {k: v.copy() for k, v in p.items()}
    with pytest.raises(ValueError, match=r"shares memory") as refused:
        adamnp.step(p, {"a": g["a"], "b": p["b"]}, state)
    assert "grads['b']" in str(refused.value)
    with pytest.raises(TypeError, match=r"grads\['a'\]"):
        adamnp.step(p, {"a": g["a"].astype(np.float64), "b": g["b"]}, state)
    for k in p:
        np.testing.assert_array_equal(p[k], before[k])
