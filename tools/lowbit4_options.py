"""Candidate 4-bit state formats: the hazard battery, the shuffled quadratic, the demo problems.

A float32 NumPy simulation of the step with 4-bit moments (dequantize, the float32 AdamW step
in the library's order, requantize per block), NumPy's generator for stochastic rounding (the
library uses a counter hash; the distribution is what matters). Leaves under 4096 elements
keep float32 moments, as ``min_8bit_size`` does. The numbers go into the 4-bit table of
docs/eight_bit.md.

    python tools/lowbit4_options.py                 # every option, about 30 minutes
    python tools/lowbit4_options.py sqrt4 --quick   # options whose name holds "sqrt4"; battery
    python tools/lowbit4_options.py "M1x7.5|torchao" --noquad  # battery and demo problems

Demo problems: final loss after 3000 steps against float32's, rounding seeds 0, 1, 2.
"""

import sys

import lowbit_options as eight  # tools/ is on the path when this file runs as a script
import numpy as np

from adamnp.cli.problems import MLP, Logistic

F32 = np.float32
BLOCK = 128
B1, B2, EPS = 0.9, 0.999, 1e-8


def _blocks(x, block):
    return x.reshape(-1, block)


def _pad(x, block):
    n = -(-x.size // block) * block
    out = np.zeros(n, F32)
    out[: x.size] = x
    return out


def _safe(a):
    return np.where(a > 0, a, F32(1))


def _round(scaled, qmap, rounding, rng, power=1):
    """Codes of ``scaled`` on the increasing ``qmap``: nearest, stochastic (unbiased in
    ``scaled**power``; below the map: its smallest value) or up (the next value at or above)."""
    k = qmap.size
    if rounding == "nearest":
        mids = (qmap[:-1].astype(np.float64) + qmap[1:]) / 2
        return np.searchsorted(mids, scaled.astype(np.float64), side="left")
    hi = np.clip(np.searchsorted(qmap, scaled, side="left"), 0, k - 1)
    if rounding == "up":
        return hi
    hi = np.clip(hi, 1, k - 1)
    lo = hi - 1
    a, b = qmap[lo].astype(np.float64) ** power, qmap[hi].astype(np.float64) ** power
    x = np.maximum(scaled.astype(np.float64), qmap[0]) ** power  # below the map: round up
    p = np.clip((x - a) / np.where(b > a, b - a, 1), 0, 1)
    return np.where(rng.random(scaled.shape) < p, hi, lo)


def _roundtrip(x, qmap, rounding, rng, block, power=1):
    n = x.size
    xb = _blocks(_pad(x, block), block)
    a = np.abs(xb).max(axis=1, keepdims=True)
    scaled = (xb / _safe(a)).reshape(-1)
    c = _round(scaled, qmap, rounding, rng, power)
    return (qmap[c].reshape(-1, block) * a).reshape(-1)[:n]


def log_map(ratio, k=16):
    """``k`` values ``ratio**-j`` down from 1, no zero."""
    return (float(ratio) ** -np.arange(k - 1, -1, -1)).astype(F32)


def linear_map(k=16):
    """``j / k`` for j = 1..k: torchao's 4-bit second-moment map (no zero)."""
    return (np.arange(1, k + 1) / k).astype(F32)


def signed_de4():
    """A 4-bit signed dynamic-exponent map (Dettmers' construction with 3 exponent bits)."""
    vals = [0.0, 1.0]
    for i in range(3):  # decades 1e-2, 1e-1, 1e0: one mean each, and the extra point
        bounds = np.linspace(0.1, 1, 3)
        means = (bounds[:-1] + bounds[1:]) / 2
        vals += list(10.0 ** (i - 2) * means)
    vals = sorted(set(vals))
    vals = [-x for x in vals[::-1] if x > 0] + vals
    return np.array(sorted(vals)[:16], F32)


class Exact:
    def store(self, m, v, rng):
        return m, v


class Ao:
    """torchao's AdamW4bit: m on a signed 4-bit dynamic map, v on j/16, nearest."""

    def __init__(self, block=BLOCK):
        self.block = block
        self.mmap, self.vmap = np.sort(signed_de4()), linear_map()

    def store(self, m, v, rng):
        mb = _blocks(_pad(m, self.block), self.block)
        a = np.abs(mb).max(axis=1, keepdims=True)
        c = _round((mb / _safe(a)).reshape(-1), self.mmap, "nearest", rng)
        mq = (self.mmap[c].reshape(-1, self.block) * a).reshape(-1)[: m.size]
        return mq, _roundtrip(v, self.vmap, "nearest", rng, self.block)


class Weyl:
    """Stand-in for the generator's ``random``: the ``k``-th draw of a store for an array of
    ``n`` elements is ``frac(offset + t * phi)``, an offset per element (drawn once) moved by
    the golden ratio at each use (``t``): the library's rounding of ``s``
    (``adamnp.lowbit.stochastic.root_keys``), here for any draw."""

    PHI = (5**0.5 - 1) / 2

    def __init__(self, seed=7):
        self.rng, self.offsets, self.uses, self.k = np.random.default_rng(seed), {}, {}, 0

    def begin(self):
        self.k = 0

    def random(self, shape, dtype=np.float64):
        key = (int(np.prod(shape)), self.k)
        self.k += 1
        if key not in self.offsets:
            self.offsets[key], self.uses[key] = self.rng.random(shape), 0
        self.uses[key] += 1
        return np.mod(self.offsets[key] + self.uses[key] * self.PHI, 1.0).astype(dtype)


class Sqrt4:
    """``s = sqrt(v)`` on a zero-free map, ``r = m / s`` as ``q * R / levels``; with ``weyl``
    both stochastic roundings draw from :class:`Weyl` sequences instead of the generator."""

    def __init__(self, smap, srounding, rrounding, levels=7, block=BLOCK, power=2, on="s",
                 rmap=None, exact="", weyl=False):  # fmt: skip
        self.smap, self.sr, self.rr = smap.astype(F32), srounding, rrounding
        self.levels, self.block, self.power, self.on = levels, block, power, on
        self.rmap, self.exact = rmap, exact
        self.weyl = Weyl() if weyl else None

    def store(self, m, v, rng):
        if self.weyl is not None:
            self.weyl.begin()
            rng = self.weyl
        s = np.sqrt(v)
        if self.on == "v":  # the map is of v itself
            sq = np.sqrt(_roundtrip(v, self.smap, self.sr, rng, self.block, 1))
        else:
            sq = _roundtrip(s, self.smap, self.sr, rng, self.block, self.power)
        if self.exact == "v":
            sq = s
        r = np.where(s > 0, m / _safe(s), F32(0)).astype(F32)
        if self.exact == "m":
            return m, (sq * sq).astype(F32)
        if self.rmap is not None:
            rq = _roundtrip(r, self.rmap, self.rr, rng, self.block)
            return (rq * sq).astype(F32), (sq * sq).astype(F32)
        rb = _blocks(_pad(r, self.block), self.block)
        scale = np.abs(rb).max(axis=1, keepdims=True) / F32(self.levels)
        t = (rb / _safe(scale)).reshape(-1)
        if self.rr == "nearest":
            q = np.rint(t)
        else:
            q = np.floor(t + rng.random(t.shape, dtype=F32))
        q = np.clip(q, -self.levels, self.levels).astype(F32)
        rq = (q.reshape(-1, self.block) * scale).reshape(-1)[: m.size]
        return (rq * sq).astype(F32), (sq * sq).astype(F32)


def signed_log(ratio=2.0, k=7):
    """0 and ``+-ratio**-j`` for j = 0..k-1: 15 values."""
    pos = float(ratio) ** -np.arange(k - 1, -1, -1)
    return np.concatenate([-pos[::-1], [0.0], pos]).astype(F32)


SIGNED_LOG = signed_log()


def minifloat(mbits, binades, signed=False):
    """Zero-free ``2**e * (1 + k / 2**mbits)`` values down from 1 over ``binades``; signed:
    a zero and the values with both signs (15 in all for 7 magnitudes)."""
    one = 0x3F800000
    count = int(binades * (1 << mbits))
    pats = one - np.arange(count, -1, -1) * (1 << (23 - mbits))
    vals = pats.astype(np.int32).view(F32)
    if signed:
        vals = np.concatenate([-vals[::-1], [0.0], vals]).astype(F32)
    return vals


SR, NR, UP = "stochastic", "nearest", "up"
OPTIONS = {
    "float32": Exact(),
    "torchao-like: m signed DE4, v j/16, nearest": Ao(),
    "sqrt4: s ratio 2^(1/2) sr; r int4 sr": Sqrt4(log_map(2**0.5), SR, SR),
    "sqrt4: s ratio 2^(1/2) nearest; r int4 sr": Sqrt4(log_map(2**0.5), NR, SR),
    "sqrt4: s ratio 2^(1/2) up; r int4 sr": Sqrt4(log_map(2**0.5), UP, SR),
    "sqrt4: s ratio 2^(1/3) sr; r int4 sr": Sqrt4(log_map(2 ** (1 / 3)), SR, SR),
    "sqrt4: s ratio 2 sr; r int4 sr": Sqrt4(log_map(2.0), SR, SR),
    "sqrt4: s ratio 2^(1/2) nearest; r int4 nearest": Sqrt4(log_map(2**0.5), NR, NR),
    "sqrt4: v j/16 nearest; r int4 sr": Sqrt4(linear_map(), NR, SR, on="v"),
    "sqrt4: v j/16 sr; r int4 sr": Sqrt4(linear_map(), SR, SR, on="v"),
    "sqrt4: s ratio 2^(1/3) sr; m exact": Sqrt4(log_map(2 ** (1 / 3)), SR, SR, exact="m"),
    "sqrt4: v exact; r int4 sr": Sqrt4(log_map(2 ** (1 / 3)), SR, SR, exact="v"),
    "sqrt4: v exact; r signed log sr": Sqrt4(log_map(2), SR, SR, exact="v", rmap=SIGNED_LOG),
    "sqrt4: s M1x7.5 sr; r M0x6 sr": Sqrt4(minifloat(1, 7.5), SR, SR, rmap=minifloat(0, 6, True)),
    "sqrt4: s M1x7.5 sr; r M1x3 sr": Sqrt4(minifloat(1, 7.5), SR, SR, rmap=minifloat(1, 3, True)),
    "sqrt4: s M2x3.75 sr; r M0x6 sr": Sqrt4(minifloat(2, 3.75), SR, SR, rmap=minifloat(0, 6, True)),
    "sqrt4: s M1x7.5 sr; r M0x6 sr, block 64": Sqrt4(
        minifloat(1, 7.5), SR, SR, rmap=minifloat(0, 6, True), block=64
    ),
    "sqrt4: s ratio 2^(1/3) sr; r signed log sr": Sqrt4(
        log_map(2 ** (1 / 3)), SR, SR, rmap=SIGNED_LOG
    ),
    "sqrt4: s ratio 2^(1/3) weyl; r int4 weyl": Sqrt4(log_map(2 ** (1 / 3)), SR, SR, weyl=True),
    "sqrt4: v exact; r int4 weyl": Sqrt4(log_map(2), SR, SR, exact="v", weyl=True),
    "sqrt4: v exact; r signed log weyl": Sqrt4(
        log_map(2), SR, SR, exact="v", rmap=SIGNED_LOG, weyl=True
    ),
    "sqrt4: v exact; r int4 weyl, block 64": Sqrt4(
        log_map(2), SR, SR, exact="v", weyl=True, block=64
    ),
    "sqrt4: v exact; r int4 weyl, block 32": Sqrt4(
        log_map(2), SR, SR, exact="v", weyl=True, block=32
    ),
    "sqrt4: v exact; r int5 sr": Sqrt4(log_map(2), SR, SR, exact="v", levels=15),
    "sqrt4: v exact; r int5 weyl": Sqrt4(log_map(2), SR, SR, exact="v", levels=15, weyl=True),
    "sqrt4: s 8 values ratio 2 weyl; r int5 weyl": Sqrt4(
        log_map(2, k=8), SR, SR, levels=15, weyl=True
    ),
    "sqrt4: s 8 values ratio 2^1.5 weyl; r int5 weyl": Sqrt4(
        log_map(2**1.5, k=8), SR, SR, levels=15, weyl=True
    ),
}


def run(fmt, grad, shapes, steps, lr=1e-3, wd=1e-2, p0=None, seed=0, loss=None, small=4096):
    """Train a list of leaves; return (largest |dp|, final loss or None). A format with a
    ``reset(seed)`` (``tools/lowbit4_rank1.py``'s) is reset for the run and stores with
    ``store(m, v, shape, leaf index)``; the others with ``store(m, v, rng)``."""
    rng = np.random.default_rng(seed + 1000)
    per_leaf = hasattr(fmt, "reset")
    if per_leaf:
        fmt.reset(seed)
    if getattr(fmt, "weyl", None) is not None:  # its own offsets for this run's seed
        fmt.weyl = Weyl(seed + 2000)
    p = [np.zeros(s, F32) for s in shapes] if p0 is None else [x.copy() for x in p0]
    m = [np.zeros(x.size, F32) for x in p]
    v = [np.zeros(x.size, F32) for x in p]
    worst = 0.0
    for t in range(1, steps + 1):
        gs = grad(p, t)
        bc1 = 1 - B1**t
        bc2s = F32(np.sqrt(1 - B2**t))
        for i, (x, g) in enumerate(zip(p, gs)):
            g = g.reshape(-1).astype(F32)
            flat = x.reshape(-1)
            old = flat.copy()
            flat *= F32(1 - lr * wd)
            m[i] = m[i] + F32(1 - B1) * (g - m[i])
            v[i] = v[i] * F32(B2) + (F32(1 - B2) * g) * g
            d = np.sqrt(v[i]) / bc2s + F32(EPS)
            flat += (F32(-lr / bc1) * m[i]) / d
            worst = max(worst, float(np.abs(flat - old).max()))
            if x.size >= small:
                if per_leaf:
                    m[i], v[i] = fmt.store(m[i], v[i], x.shape, i)
                else:
                    m[i], v[i] = fmt.store(m[i].astype(F32), v[i].astype(F32), rng)
    return worst, (loss(p) if loss else None)


def _one_leaf(grad, n):
    """A problem of ``tools/lowbit_options.py`` (one array) as a list of one leaf."""
    return (lambda p, t: [grad(p[0], t)]), [(n,)]


# the 8-bit study's battery: the same cases, data and seeds
BATTERY = {name: (lambda make=make: _one_leaf(*make())) for name, make in eight.BATTERY.items()}


def quadratic(n, start, seed=5):
    """The 8-bit study's shuffled quadratic, as one leaf."""
    grad, loss, x0 = eight.quadratic(n, start, seed)
    return (lambda p, t: [grad(p[0], t)]), (lambda p: loss(p[0])), [x0]


def demo(problem, fmt, steps=3000, seed=0, seeds=(0, 1, 2)):
    keys = list(problem.params0())
    p0 = [problem.params0()[k] for k in keys]
    cfg = problem.config()

    def grad(p, t):
        g = problem.grad(dict(zip(keys, p)), t - 1)
        return [g[k] for k in keys]

    def loss(p):
        return problem.loss(dict(zip(keys, p)))

    seeds = (0,) if isinstance(fmt, Exact) else seeds
    return [run(fmt, grad, None, steps, lr=cfg.lr, wd=cfg.weight_decay, p0=p0, seed=sd,
                loss=loss)[1] for sd in seeds]  # fmt: skip


def main(only=None, quick=False):
    wanted = None if only is None else only.split("|")
    names = [
        n for n in OPTIONS if n != "float32" and (wanted is None or any(w in n for w in wanted))
    ]
    ref = {c: run(Exact(), *make(), 200)[0] for c, make in BATTERY.items()}
    quads = [] if quick or "--noquad" in sys.argv else [(256, 5000, "ones"), (256, 5000, "normal")]
    qref = {}
    for q in quads:
        g, loss, x0 = quadratic(q[0], q[2])
        qref[q] = run(Exact(), g, None, q[1], wd=0, p0=x0, loss=loss, small=1)[1]
    probs = [] if quick else [Logistic(), MLP()]
    dref = {pr.name: demo(pr, Exact())[0] for pr in probs}
    print("float32:", {q: f"{x:.3g}" for q, x in qref.items()}, dref, flush=True)
    for name in names:
        fmt = OPTIONS[name]
        ratios = [run(fmt, *make(), 200)[0] / ref[c] for c, make in BATTERY.items()]
        row = [f"worst {max(ratios):.3g}"]
        for q in quads:
            g, loss, x0 = quadratic(q[0], q[2])
            row.append(
                f"quad {q[2]} {run(fmt, g, None, q[1], wd=0, p0=x0, loss=loss, small=1)[1]:.3g}"
            )
        for pr in probs:
            diffs = " / ".join(f"{x / dref[pr.name] - 1:+.2%}" for x in demo(pr, fmt))
            row.append(f"{pr.name} {diffs}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)
        print("   per case:", " ".join(f"{r:.2f}" for r in ratios), flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(only=args[0] if args else None, quick="--quick" in sys.argv)
