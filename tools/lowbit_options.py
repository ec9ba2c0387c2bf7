"""Candidate 8-bit state formats on the hazard battery and the shuffled quadratic.

A float32 NumPy simulation of the 8-bit step (dequantize the stored moments, do the float32
AdamW step in the library's order, requantize per block of 256) for each candidate format,
with NumPy's generator for the stochastic roundings (the library uses a counter hash; the
distribution is what matters here). The numbers go into the option table of
docs/eight_bit.md; the formats the library ships are measured again through the library by
``tools/lowbit_battery.py``.

    python tools/lowbit_options.py            # all options, about 10 minutes on 2 cores
    python tools/lowbit_options.py --quick    # battery only
"""

import sys

import numpy as np

from adamnp.lowbit.maps import dynamic_map

F32 = np.float32
BLOCK = 256
LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 1e-2


def _blocks(x):
    return x.reshape(-1, BLOCK)


def _absmax(x):
    return np.abs(_blocks(x)).max(axis=1, keepdims=True)


def _safe(a):
    return np.where(a > 0, a, F32(1))


def _nearest(scaled, qmap):
    mids = (qmap[:-1].astype(np.float64) + qmap[1:]) / 2
    return np.searchsorted(mids, scaled.astype(np.float64), side="left")


def _stochastic(scaled, qmap, rng, power=1):
    """Round to one of the two map values around ``scaled``, unbiased in ``scaled**power``."""
    hi = np.clip(np.searchsorted(qmap, scaled, side="left"), 1, 255)
    lo = hi - 1
    a, b = qmap[lo].astype(np.float64) ** power, qmap[hi].astype(np.float64) ** power
    x = np.maximum(scaled.astype(np.float64), qmap[0]) ** power  # below the map: round up
    p = np.clip((x - a) / np.where(b > a, b - a, 1), 0, 1)
    return np.where(rng.random(scaled.shape) < p, hi, lo)


class MapQuant:
    """Blockwise absmax + a 256-value map (bitsandbytes' layout)."""

    def __init__(self, qmap, rounding, power=1):
        self.qmap, self.rounding, self.power = qmap.astype(F32), rounding, power

    def roundtrip(self, x, rng):
        a = _absmax(x)
        s = (_blocks(x) / _safe(a)).reshape(-1)
        if self.rounding == "nearest":
            c = _nearest(s, self.qmap)
        else:
            c = _stochastic(s, self.qmap, rng, self.power)
        return (self.qmap[c].reshape(-1, BLOCK) * a).reshape(-1)


def minifloat_map(mbits, nonzero=True):
    """256 unsigned values: float32 patterns ``bits(1.0) - k * 2**(23 - mbits)``, k = 0..255."""
    k = np.arange(255, -1, -1, dtype=np.int64)
    bits = (np.int64(0x3F800000) - k * (1 << (23 - mbits))).astype(np.int32)
    return bits.view(F32)


def graded_map(regions):
    """Zero-free unsigned 8-bit float with finer mantissas near the top: ``(mantissa bits,
    binades)`` per region from 1 down; 256 values ending at 1.0."""
    one = 0x3F800000
    pats, top = [one], one
    for mbits, binades in regions:
        step = 1 << (23 - mbits)
        count = round(binades * (1 << mbits))
        pats += [top - k * step for k in range(1, count + 1)]
        top -= count * step
    assert len(pats) == 256, len(pats)
    return np.array(sorted(pats), np.int32).view(F32)


def log_map(decades):
    return (10.0 ** np.linspace(-decades, 0, 256)).astype(F32)


class SqrtV:
    """sqrt(v) on an unsigned map with blockwise absmax; m either on its own map or as r = m / s."""

    def __init__(self, smap, srounding, m_mode, mrounding, power=1):
        self.s = MapQuant(smap, srounding, power)
        self.m_mode, self.mrounding = m_mode, mrounding
        self.mq = MapQuant(dynamic_map(True), mrounding)

    def round_s(self, s, rng):
        return self.s.roundtrip(s, rng)

    def store(self, m, v, rng):
        s = np.sqrt(v)
        sq = self.round_s(s, rng)
        if self.m_mode == "dynamic":
            return self.mq.roundtrip(m, rng), sq * sq
        if self.m_mode == "exactm":
            return m, sq * sq
        base = s if self.m_mode == "ratio" else sq  # ratio: r = m / s (unquantized)
        r = np.where(base > 0, m / _safe(base), F32(0)).astype(F32)
        a = _absmax(r)
        scale = a / F32(127)
        t = (_blocks(r) / _safe(scale)).reshape(-1)
        if self.mrounding == "nearest":
            q = np.rint(t)
        else:
            q = np.floor(t + rng.random(t.shape, dtype=F32))
        q = np.clip(q, -127, 127).astype(F32)
        rq = (_blocks(q) * scale).reshape(-1)
        return (rq * sq).astype(F32), (sq * sq).astype(F32)


class DualSqrt(SqrtV):
    """:class:`SqrtV` (ratio ``m``, stochastic) with two maps of ``s``: per block the narrow
    one, or the wide one where a positive ``s`` is below ``2**-below`` of the block's largest
    (adamnp's ``"sqrt"`` format)."""

    def __init__(self, narrow, wide, below=13, power=1):
        super().__init__(narrow, SR, "ratio", SR, power)
        self.wide = MapQuant(wide, SR, power)
        self.below = below

    def round_s(self, s, rng):
        a = _absmax(s)
        x = _blocks(s) / _safe(a)
        wide = (np.where(x > 0, x, np.inf).min(axis=1) < 2.0**-self.below)[:, None]
        sq = np.where(wide, _blocks(self.wide.roundtrip(s, rng)), _blocks(self.s.roundtrip(s, rng)))
        return sq.reshape(-1).astype(F32)


class Bnb:
    def __init__(self, vrounding):
        self.m = MapQuant(dynamic_map(True), "nearest")
        self.v = MapQuant(dynamic_map(False), vrounding)

    def store(self, m, v, rng):
        return self.m.roundtrip(m, rng), self.v.roundtrip(v, rng)


class Exact:
    def store(self, m, v, rng):
        return m, v


SR, NR = "stochastic", "nearest"


def _sv(smap, srounding, m_mode, mrounding, power=1):
    return SqrtV(smap, srounding, m_mode, mrounding, power)


_NO_ZERO = dynamic_map(False).copy()
_NO_ZERO[0] = _NO_ZERO[1] / 2
_BNB_NO_ZERO = Bnb(SR)
_BNB_NO_ZERO.v = MapQuant(_NO_ZERO, SR)
E = minifloat_map
ADAMNP = (
    "sqrt(v) graded M6/M4, or M6/M4/M3 where a block spans > 13 binades, unbiased in s; "
    "m/sqrt(v) int8 stochastic (adamnp's 'sqrt')"
)

OPTIONS = {
    "float32": Exact(),
    "bnb: m, v dynamic maps, nearest": Bnb(NR),
    "bnb, v stochastic": Bnb(SR),
    "v without zero (dynamic map, 0 -> smallest), v stochastic": _BNB_NO_ZERO,
    "sqrt(v) dynamic unsigned, nearest; m dynamic": _sv(dynamic_map(False), NR, "dynamic", NR),
    "sqrt(v) log map 10 decades, stochastic; m dynamic nearest": _sv(
        log_map(10), SR, "dynamic", NR
    ),
    "sqrt(v) E4M4 stochastic; m dynamic nearest": _sv(E(4), SR, "dynamic", NR),
    "sqrt(v) E4M4 stochastic; m dynamic stochastic": _sv(E(4), SR, "dynamic", SR),
    "sqrt(v) E4M4 stochastic; m/sqrt(v_q) int8 stochastic": _sv(E(4), SR, "ratio_q", SR),
    "sqrt(v) E4M4 nearest; m/sqrt(v) int8 nearest": _sv(E(4), NR, "ratio", NR),
    "sqrt(v) E4M4 stochastic; m/sqrt(v) int8 nearest": _sv(E(4), SR, "ratio", NR),
    "sqrt(v) E4M4 stochastic; m/sqrt(v) int8 stochastic": _sv(E(4), SR, "ratio", SR),
    "sqrt(v) E5M3 stochastic; m/sqrt(v) int8 stochastic": _sv(E(3), SR, "ratio", SR),
    "sqrt(v) E3M5 stochastic; m/sqrt(v) int8 stochastic": _sv(E(5), SR, "ratio", SR),
    "sqrt(v) E5M3 stochastic unbiased in v; m/sqrt(v) int8 stochastic": _sv(
        E(3), SR, "ratio", SR, power=2
    ),
    "sqrt(v) graded M6/M5/M4/M2, unbiased in v; m/sqrt(v) int8 stochastic": _sv(
        graded_map(((6, 1), (5, 2), (4, 2), (2, 23.75))), SR, "ratio", SR, power=2
    ),
    "sqrt(v) graded M6/M5/M4, unbiased in v; m/sqrt(v) int8 stochastic": _sv(
        graded_map(((6, 1), (5, 2), (4, 7.9375))), SR, "ratio", SR, power=2
    ),
    "sqrt(v) graded M6/M4, unbiased in v; m/sqrt(v) int8 stochastic": _sv(
        graded_map(((6, 1), (4, 11.9375))), SR, "ratio", SR, power=2
    ),
    "sqrt(v) graded M6/M4/M3 (20.9 binades), unbiased in s; m/sqrt(v) int8 stochastic": _sv(
        graded_map(((6, 1), (4, 4), (3, 15.875))), SR, "ratio", SR, power=1
    ),
    "sqrt(v) graded M6/M4, unbiased in s; m/sqrt(v) int8 stochastic": _sv(
        graded_map(((6, 1), (4, 11.9375))), SR, "ratio", SR, power=1
    ),
    ADAMNP: DualSqrt(graded_map(((6, 1), (4, 11.9375))), graded_map(((6, 1), (4, 4), (3, 15.875)))),
}


def run(fmt, grad, n, steps, lr=LR, wd=WD, p0=None, seed=0, loss=None):
    """Train; return (largest |dp| over all steps and elements, final loss or None)."""
    rng = np.random.default_rng(seed + 1000)  # the roundings' generator
    p = np.zeros(n, F32) if p0 is None else p0.copy()
    m = np.zeros(n, F32)
    v = np.zeros(n, F32)
    worst = 0.0
    for t in range(1, steps + 1):
        g = grad(p, t)
        bc1 = 1 - B1**t
        bc2s = F32(np.sqrt(1 - B2**t))
        old = p.copy()
        p *= F32(1 - lr * wd)
        m = m + F32(1 - B1) * (g - m)
        v = v * F32(B2) + (F32(1 - B2) * g) * g
        d = np.sqrt(v) / bc2s + F32(EPS)
        p += (F32(-lr / bc1) * m) / d
        worst = max(worst, float(np.abs(p - old).max()))
        m, v = fmt.store(m.astype(F32), v.astype(F32), rng)
    return worst, (loss(p) if loss else None)


def hazard(ratio):
    rng = np.random.default_rng(7)

    def grad(p, t):
        g = rng.standard_normal(BLOCK).astype(F32)
        g[0] *= F32(ratio)
        return g

    return grad, BLOCK


def spread(redraw, n=65536, seed=3):
    rng = np.random.default_rng(seed)
    fixed = (10.0 ** rng.uniform(-4, 0, n)).astype(F32)

    def grad(p, t):
        sc = (10.0 ** rng.uniform(-4, 0, n)).astype(F32) if redraw else fixed
        return (sc * rng.standard_normal(n)).astype(F32)

    return grad, n


def sparse_then_zero():
    """Elements of a block with gradients 1e-8..1 and exact zeros, switching off at step 100."""
    rng = np.random.default_rng(11)
    sc = (10.0 ** rng.uniform(-8, 0, BLOCK)).astype(F32)
    sc[rng.random(BLOCK) < 0.1] = 0

    def grad(p, t):
        g = (sc * rng.standard_normal(BLOCK)).astype(F32)
        if t > 100:
            g[::2] = 0
        return g

    return grad, BLOCK


def steady(ratio, noise=1.0):
    """One block: element 0's gradient 1, the others ``ratio``, all ``* (1 + noise * normal)``:
    one sign, a noisy size. Run for 3000 steps (:data:`STEPS`), the noise that rounding leaves
    in ``v`` builds up fully."""
    rng = np.random.default_rng(8)

    def grad(p, t):
        g = np.full(BLOCK, ratio, F32)
        g[0] = 1
        return (g * (1 + noise * rng.standard_normal(BLOCK))).astype(F32)

    return grad, BLOCK


def quadratic(n, start, seed=5):
    """``0.5 * sum(c * x**2)``, curvatures log-spaced 1..1e6 and shuffled; x0 ones or normal."""
    rng = np.random.default_rng(seed)
    c = np.geomspace(1, 1e6, n).astype(F32)
    rng.shuffle(c)
    x0 = np.ones(n, F32) if start == "ones" else rng.standard_normal(n).astype(F32)
    return (lambda p, t: c * p), (lambda p: float(0.5 * np.sum(c.astype(np.float64) * p**2))), x0


BATTERY = {
    "block, element 0 at 1e-2": lambda: hazard(1e-2),
    "block, element 0 at 1e-3": lambda: hazard(1e-3),
    "block, element 0 at 3e-4": lambda: hazard(3e-4),
    "block, element 0 at 1e-4": lambda: hazard(1e-4),
    "block, element 0 at 1e-6": lambda: hazard(1e-6),
    "block, element 0 at 1e-8": lambda: hazard(1e-8),
    "65536, scales 1e-4..1 redrawn": lambda: spread(True),
    "65536, scales 1e-4..1 fixed": lambda: spread(False),
    "block, 1e-8..1 and zeros, half off": sparse_then_zero,
    "block, others at 1e-3, one sign, noisy": lambda: steady(1e-3),
}
#: Steps of a battery case (default 200)
STEPS = {"block, others at 1e-3, one sign, noisy": 3000}


def steps(case):
    return STEPS.get(case, 200)


def main(quick=False, only=None):
    names = ["float32"] + [n for n in OPTIONS if n != "float32" and (only is None or only in n)]
    ref = {}
    for case, make in BATTERY.items():
        grad, n = make()
        ref[case] = run(OPTIONS["float32"], grad, n, steps(case))[0]
    quads = [] if quick else [(256, 5000, "ones"), (256, 5000, "normal"), (16384, 20000, "normal")]
    qref = {}
    for q in quads:
        grad, loss, x0 = quadratic(q[0], q[2])
        qref[q] = run(OPTIONS["float32"], grad, q[0], q[1], wd=0, p0=x0, loss=loss)[1]
    seeds = [] if quick else list(range(10))
    sref = {}
    for seed in seeds:
        grad, loss, x0 = quadratic(256, "normal", seed)
        sref[seed] = run(OPTIONS["float32"], grad, 256, 5000, wd=0, p0=x0, loss=loss)[1]
    heads = [
        f"quadratic {n} x {count}, x0 {start} (float32: {qref[n, count, start]:.3g})"
        for n, count, start in quads
    ]
    if seeds:
        heads.append("quadratic 256 x 5000, x0 normal, seeds 0-9: largest loss / float32's")
    print("| option | worst step / float32's | " + " | ".join(heads) + " |")
    for name in names[1:]:
        fmt = OPTIONS[name]
        ratios = []
        for case, make in BATTERY.items():
            grad, n = make()
            ratios.append(run(fmt, grad, n, steps(case))[0] / ref[case])
        row = [f"{max(ratios):.3g}"]
        for q in quads:
            grad, loss, x0 = quadratic(q[0], q[2])
            fl = run(fmt, grad, q[0], q[1], wd=0, p0=x0, loss=loss)[1]
            row.append(f"{fl:.3g}")
        if seeds:
            worst = 0.0
            for seed in seeds:
                grad, loss, x0 = quadratic(256, "normal", seed)
                fl = run(fmt, grad, 256, 5000, wd=0, p0=x0, loss=loss, seed=seed)[1]
                worst = max(worst, fl / sref[seed])
            row.append(f"{worst:.3g}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)
        print("   per case:", " ".join(f"{r:.2f}" for r in ratios), flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(quick="--quick" in sys.argv, only=args[0] if args else None)
