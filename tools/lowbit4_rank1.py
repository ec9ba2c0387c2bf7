"""4-bit state study, second round: rank-1 scales, subtractive dither, how many bits ``s`` needs.

Continues ``tools/lowbit4_options.py`` (same battery, demo problems and float32 step; its
numbers are in docs/eight_bit.md). The moments are stored as ``s = sqrt(v)`` and
``r = m / s_q`` (``s_q`` the stored ``s``), each with a scale per element taken from either

* a block of 128 consecutive elements (the largest magnitude in the block), or
* rank-1 (Li et al. 2023): for a 2-D leaf, the smaller of the largest magnitude in the
  element's row and in its column; 1-D leaves fall back to blocks.

``s / scale`` goes on a zero-free logarithmic grid of ``2**bits`` values, rounded
stochastically, unbiased in ``s**power``. ``r / scale`` goes either on -7..7 with stochastic
rounding or on the 16 half-integers -7.5..7.5 with *subtractive* dither: the code is
``floor(y - d)`` with ``d`` uniform in [-1/2, 1/2), and decoding adds ``d`` back, so the
error is uniform in half a level and independent of ``y`` (a decoder regenerates ``d`` from
the element and the step, as the library's counter hash does). Every per-element draw here
comes from a Weyl sequence ``frac(offset + t * 0.618...)``.

    python tools/lowbit4_rank1.py              # every option, about 10 minutes
    python tools/lowbit4_rank1.py "v exact"    # options whose name holds "v exact"
    python tools/lowbit4_rank1.py --factored   # diagnosis: Adafactor's factored v
    python tools/lowbit4_rank1.py "pairs, s 8 bits rank-1, unbiased in v; r 16" --seeds 9
                                               # rounding seeds 0-8 instead of 0-2
    python tools/lowbit4_rank1.py "pairs exact|bits per element)" --quadratic
                                               # the shuffled quadratics, seeds 0-2
"""

import sys

import lowbit4_options as four  # tools/ is on the path when this file runs as a script
import numpy as np

from adamnp.cli.problems import MLP, Logistic

F32 = np.float32
PHI = (5**0.5 - 1) / 2


class Dither:
    """Per-element uniforms in [0, 1): ``frac(offset + t * PHI)`` for the t-th use of a key."""

    def __init__(self, seed):
        self.rng, self.offsets, self.uses = np.random.default_rng(seed), {}, {}

    def draw(self, key, n):
        if key not in self.offsets:
            self.offsets[key], self.uses[key] = self.rng.random(n), 0
        self.uses[key] += 1
        return np.mod(self.offsets[key] + self.uses[key] * PHI, 1.0)


def block_scale(a, block=128):
    """The largest of ``a`` (non-negative, flat) in each block, repeated per element."""
    n = a.size
    padded = np.zeros(-(-n // block) * block)
    padded[:n] = a
    return np.repeat(padded.reshape(-1, block).max(axis=1), block)[:n]


def rank1_scale(a, shape):
    """min(row max, column max) per element of a 2-D leaf; blocks for any other shape."""
    if len(shape) != 2:
        return block_scale(a)
    x = a.reshape(shape)
    return np.minimum(x.max(axis=1, keepdims=True), x.max(axis=0, keepdims=True)).reshape(-1)


def log_grid(bits, binades):
    """``2**bits`` zero-free values ``2**(-k * binades / 2**bits)``, increasing, top 1."""
    n = 2**bits
    return 2.0 ** (-np.arange(n - 1, -1, -1) * binades / n)


class Format:
    """``s`` on ``grid`` (or exact), ``r`` by ``rmode`` ("sr", "sub" or "exact")."""

    def __init__(self, grid=None, power=1, snorm="rank1", rmode="sub", rnorm="rank1", rcodes=16):
        self.grid, self.power, self.snorm = grid, power, snorm
        self.rmode, self.rnorm, self.rcodes = rmode, rnorm, rcodes
        self.dither = None

    def _scale(self, a, shape, kind):
        s = rank1_scale(a, shape) if kind == "rank1" else block_scale(a)
        return np.where(s > 0, s, 1.0)

    def _store_s(self, s, shape, key):
        if self.grid is None:
            return s
        q, scale = self.grid, self._scale(s, shape, self.snorm)
        x = s / scale
        hi = np.clip(np.searchsorted(q, x, side="left"), 1, q.size - 1)
        lo = hi - 1
        a, b = q[lo] ** self.power, q[hi] ** self.power
        p = np.clip((np.maximum(x, q[0]) ** self.power - a) / (b - a), 0, 1)  # below: up
        code = np.where(self.dither.draw((key, "s"), s.size) < p, hi, lo)
        return np.where(s > 0, q[code] * scale, 0.0)

    def reset(self, seed):
        """Fresh draws (and state) for a run of rounding seed ``seed``."""
        self.dither = Dither(seed + 2000)

    def _store_r(self, r, shape, key, scale=None):
        if self.rmode == "exact":
            return r
        if scale is None:
            scale = self._scale(np.abs(r), shape, self.rnorm)
        u = self.dither.draw((key, "r"), r.size)
        if self.rmode == "sr":
            return np.clip(np.floor(r / scale * 7 + u), -7, 7) * scale / 7
        d = u - 0.5  # subtractive: rcodes codes c + 1/2, c = -h..h-1 (16: -8..7)
        h = self.rcodes // 2
        code = np.clip(np.floor(r / scale * (h - 0.5) - d), -h, h - 1)
        return (code + 0.5 + d) * scale / (h - 0.5)

    def store(self, m, v, shape, key):
        s = np.sqrt(v.astype(np.float64))
        sq = self._store_s(s, shape, key)
        r = np.where(sq > 0, m / np.where(sq > 0, sq, 1.0), 0.0)
        return (self._store_r(r, shape, key) * sq).astype(F32), (sq * sq).astype(F32)


LOG3 = log_grid(4, 16 / 3)  # lowbit4_options' 2^(-k/3)
OPTIONS = {
    "v exact; r -7..7 stochastic, blocks": Format(rmode="sr", rnorm="block"),
    "v exact; r 16 codes subtractive, blocks": Format(rnorm="block"),
    "v exact; r 16 codes subtractive, rank-1": Format(),
    "s 4 bits 2^(-k/3) rank-1, unbiased in v; m exact": Format(LOG3, power=2, rmode="exact"),
    "s 4 bits 2^(-k/3) rank-1, unbiased in s; m exact": Format(LOG3, rmode="exact"),
    "s 4 bits 2^(-k/3) rank-1, unbiased in 1/s; m exact": Format(LOG3, power=-1, rmode="exact"),
    "s 4 bits 2^(-k/3) blocks, unbiased in v; m exact": Format(
        LOG3, power=2, snorm="block", rmode="exact"
    ),
    **{
        f"s {b} bits over 8 binades rank-1, unbiased in {w}; m exact": Format(
            log_grid(b, 8), power=pw, rmode="exact"
        )
        for b in (5, 6, 7, 8)
        for w, pw in (("v", 2), ("s", 1))
    },
    "s 4 bits 2^(-k/3) rank-1, unbiased in s; r 16 codes subtractive, rank-1": Format(LOG3),
    "s 7 bits over 8 binades rank-1, unbiased in s; r 16 codes subtractive, rank-1": Format(
        log_grid(7, 8)
    ),
    "s 8 bits over 8 binades rank-1, unbiased in s; r 16 codes subtractive, rank-1": Format(
        log_grid(8, 8)
    ),
}


R16 = "r 16 codes subtractive, rank-1"
R0 = (1 - four.B1) / (1 - four.B2) ** 0.5  # |r| of every element after the first step


class Pairs(Format):
    """``v`` shared by pairs of consecutive elements (their mean, stored back to both): one
    ``s`` per pair on ``grid`` with rank-1 scales over the (rows, columns / 2) pairs of a
    2-D leaf or blocks of 128 pairs (``snorm``); ``r`` per element as in :class:`Format`.
    With ``delayed``, ``r``'s rank-1 scales are the maxima of the previous step's ``r``
    (``R0`` at the first), values beyond them clipped: a one-pass encoding."""

    def __init__(self, grid=None, delayed=False, **kw):
        super().__init__(grid, **kw)
        self.delayed, self.previous = delayed, {}

    def reset(self, seed):
        super().reset(seed)
        self.previous = {}

    def store(self, m, v, shape, key):
        pairs = np.sqrt(v.astype(np.float64).reshape(-1, 2).mean(axis=1))
        pair_shape = (shape[0], shape[1] // 2) if len(shape) == 2 else pairs.shape
        sq = np.repeat(self._store_s(pairs, pair_shape, key), 2)
        r = np.where(sq > 0, m / np.where(sq > 0, sq, 1.0), 0.0)
        scale = None
        if self.delayed and len(shape) == 2:
            a = np.abs(r).reshape(shape)
            first = (np.full(shape[0], R0), np.full(shape[1], R0))
            rows, cols = self.previous.get(key, first)
            self.previous[key] = (a.max(axis=1), a.max(axis=0))
            scale = np.minimum(rows[:, None], cols[None, :]).reshape(-1)
            scale = np.where(scale > 0, scale, 1.0)
            r = np.clip(r, -scale, scale)
        rq = self._store_r(r, shape, key, scale)
        return (rq * sq).astype(F32), (sq * sq).astype(F32)


class Fours(Format):
    """``v`` shared by groups of 4 consecutive elements, exact (a diagnosis)."""

    def store(self, m, v, shape, key):
        mean = np.repeat(v.astype(np.float64).reshape(-1, 4).mean(axis=1), 4)
        return m, mean.astype(F32)


OPTIONS.update(
    {
        "v of pairs exact; m exact": Pairs(rmode="exact"),
        "v of 4 elements exact; m exact": Fours(rmode="exact"),
        **{
            f"v of pairs, s {b} bits rank-1, unbiased in {w}; {R16}": Pairs(
                log_grid(b, 8), power=pw
            )
            for b in (8, 7)
            for w, pw in (("v", 2), ("s", 1))
        },
        **{
            f"v of pairs, s 8 bits rank-1, unbiased in {w}; r {2**b} codes subtractive, rank-1 "
            f"({4 + b} bits per element)": Pairs(log_grid(8, 8), power=pw, rcodes=2**b)
            for b in (5, 6, 8)
            for w, pw in (("v", 2), ("s", 1))
        },
        **{
            f"s 8 bits per element rank-1, unbiased in {w}; r {2**b} codes subtractive, rank-1 "
            f"({8 + b} bits per element)": Format(log_grid(8, 8), power=pw, rcodes=2**b)
            for b in (5, 6)
            for w, pw in (("v", 2), ("s", 1))
        },
        **{
            f"s 8 bits per element over 16 binades rank-1, unbiased in v; r {2**b} codes "
            f"subtractive, rank-1 ({8 + b} bits per element)": Format(
                log_grid(8, 16), power=2, rcodes=2**b
            )
            for b in (4, 5, 6)
        },
        "s 8 bits per element over 16 binades rank-1, unbiased in v; m exact": Format(
            log_grid(8, 16), power=2, rmode="exact"
        ),
        "v of pairs, s 8 bits rank-1, unbiased in v; r exact": Pairs(
            log_grid(8, 8), power=2, rmode="exact"
        ),
        "v of pairs, s 8 bits blocks, unbiased in v; r 16 codes subtractive, rank-1": Pairs(
            log_grid(8, 8), power=2, snorm="block"
        ),
        "v of pairs, s 8 bits rank-1, unbiased in v; r 16 codes subtractive, blocks": Pairs(
            log_grid(8, 8), power=2, rnorm="block"
        ),
        "v of pairs, s 8 bits rank-1, unbiased in v; r 16 codes subtractive, rank-1 of the "
        "previous step (delayed)": Pairs(log_grid(8, 8), power=2, delayed=True),
    }
)


def factored(problem, quantize_m, seed=0, steps=3000):
    """Diagnosis: ``v`` of 2-D leaves from float64 row and column sums of g^2 (Adafactor);
    ``m`` exact or as 16-code subtractive ``r`` with rank-1 scales. Returns the final loss."""
    keys = list(problem.params0())
    p = [problem.params0()[k].copy() for k in keys]
    cfg = problem.config()
    fmt = Format()
    fmt.reset(seed)
    m = [np.zeros(x.size, F32) for x in p]
    v = [np.zeros(x.size, F32) for x in p]
    rows, cols = {}, {}
    for t in range(1, steps + 1):
        gs = problem.grad(dict(zip(keys, p)), t - 1)
        bc1, bc2s = 1 - four.B1**t, F32(np.sqrt(1 - four.B2**t))
        for i, x in enumerate(p):
            g2d = gs[keys[i]].astype(F32)
            g, flat, big = g2d.reshape(-1), x.reshape(-1), x.size >= 4096
            flat *= F32(1 - cfg.lr * cfg.weight_decay)
            m[i] = m[i] + F32(1 - four.B1) * (g - m[i])
            if big:
                sq = g2d.astype(np.float64) ** 2
                rows[i] = rows.get(i, 0) * four.B2 + (1 - four.B2) * sq.sum(axis=1)
                cols[i] = cols.get(i, 0) * four.B2 + (1 - four.B2) * sq.sum(axis=0)
                v[i] = (np.outer(rows[i], cols[i]) / rows[i].sum()).reshape(-1).astype(F32)
            else:
                v[i] = v[i] * F32(four.B2) + (F32(1 - four.B2) * g) * g
            flat += (F32(-cfg.lr / bc1) * m[i]) / (np.sqrt(v[i]) / bc2s + F32(four.EPS))
            if big and quantize_m:
                m[i] = fmt.store(m[i], v[i], x.shape, i)[0]
    return problem.loss(dict(zip(keys, p)))


def main(only=None):
    probs = [Logistic(), MLP()]
    dref = {pr.name: four.demo(pr, four.Exact())[0] for pr in probs}
    if "--factored" in sys.argv:
        for pr in probs:
            exact = factored(pr, False) / dref[pr.name] - 1
            quant = [factored(pr, True, seed=sd) / dref[pr.name] - 1 for sd in (0, 1, 2)]
            print(f"{pr.name}: factored v, m exact {exact:+.2%}; m as r 16 codes rank-1 "
                  + " / ".join(f"{x:+.2%}" for x in quant), flush=True)  # fmt: skip
        return
    wanted = None if only is None else only.split("|")
    if "--quadratic" in sys.argv:
        quadratics(wanted)
        return
    ref = {c: four.run(four.Exact(), *make(), 200)[0] for c, make in four.BATTERY.items()}
    for name, fmt in OPTIONS.items():
        if wanted is not None and not any(w in name for w in wanted):
            continue
        worst = max(four.run(fmt, *make(), 200)[0] / ref[c] for c, make in four.BATTERY.items())
        row = [f"{worst:.2f}"]
        for pr in probs:
            losses = four.demo(pr, fmt, seeds=tuple(range(SEEDS)))
            row.append(" / ".join(f"{x / dref[pr.name] - 1:+.2%}" for x in losses))
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


def quadratics(wanted):
    """Final loss of the first round's shuffled quadratics (256 elements, 5000 steps, every
    element quantized) for the options named in ``wanted``, rounding seeds 0-2."""
    for start in ("ones", "normal"):
        grad, loss, x0 = four.quadratic(256, start)
        exact = four.run(four.Exact(), grad, None, 5000, wd=0, p0=x0, loss=loss, small=1)[1]
        print(f"quadratic, x0 {start}: float32 {exact:.3g}", flush=True)
        for name, fmt in OPTIONS.items():
            if wanted is not None and not any(w in name for w in wanted):
                continue
            losses = [
                four.run(fmt, grad, None, 5000, wd=0, p0=x0, loss=loss, small=1, seed=sd)[1]
                for sd in (0, 1, 2)
            ]
            print(f"| {name} | " + " / ".join(f"{x:.3g}" for x in losses) + " |", flush=True)


SEEDS = int(sys.argv[sys.argv.index("--seeds") + 1]) if "--seeds" in sys.argv else 3

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--") and not a.isdigit()]
    main(args[0] if args else None)
