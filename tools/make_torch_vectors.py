"""Write the torch.optim reference vectors used by adamnp's tests (``tests/vectors/torch_*.npz``).

Run by hand, once, on a machine with torch installed::

    python tools/make_torch_vectors.py            # (re)write tests/vectors/torch_*.npz
    python tools/make_torch_vectors.py --only adamw_groups_clip   # write one case
    python tools/make_torch_vectors.py --check    # regenerate in memory, compare with the files
    python tools/make_torch_vectors.py --replay   # numpy-only replay of the stored files

Each case runs ``torch.optim.Adam`` or ``torch.optim.AdamW`` with ``foreach=False, fused=False``
(the single-tensor path, ``torch.optim.adam._single_tensor_adam``) on CPU for 300 steps over two
leaves, ``b`` (16,) and ``w`` (8, 16). The gradients are drawn up front from a seeded generator and
do not depend on the parameters, so a replay is open-loop: feed ``grads/<leaf>[k]`` at step k with
learning rate ``lr_per_step[k]`` and compare with ``p/``, ``m/``, ``v/``, ``vmax/`` and ``p_hist/``.

Gradient recipe (per case, from ``numpy.random.default_rng(seed)``; ``seed`` is in ``meta``): a
standard normal draw times a per-step scale ``10**U(-3, 1)``; about 2% of the entries are set to
exactly 0; element ``b[0]`` has a zero gradient at every step; every leaf's gradient is all zeros
at step ``meta["zero_grad_step"]``. Initial parameters are standard normal draws.

The stored files hold only numeric arrays plus ``meta``, a JSON string in a 0-d unicode array, so
``numpy.load(path, allow_pickle=False)`` reads them without torch.

``--replay`` (numpy only) is an executable transcription of torch's element-wise operation order
on x86-64 CPUs with FMA (AVX2/AVX512 builds); see ``replay_case``. Everything except the square
root is bit-exact; torch takes ``Tensor.sqrt`` from MKL VML (``vmsSqrt``/``vmdSqrt`` in ``VML_HA``
mode), which is not correctly rounded, so the replay's correctly rounded ``np.sqrt`` leaves an
ulp-level difference in the parameters. ``--replay --torch-sqrt`` borrows torch's sqrt for that one
operation and must then match every stored array bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np

STEPS = 300
HIST_EVERY = 50
LEAVES = ("b", "w")  # sorted; also the order the params are given to torch
SHAPES = {"b": (16,), "w": (8, 16)}
ZERO_FRACTION = 0.02
SCALE_LOG10 = (-3.0, 1.0)
BASE_SEED = 0x5EED_ADA

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "vectors"


def _case(
    optimizer: str,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    dtype: str = "float32",
    schedule: dict | None = None,
    groups: dict | None = None,
    max_grad_norm: float | None = None,
) -> dict:
    return dict(
        groups=groups,
        max_grad_norm=max_grad_norm,
        optimizer=optimizer,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        dtype=dtype,
        schedule=schedule,
    )


WARMUP_COSINE = dict(
    kind="warmup_cosine", init=0.0, peak=3e-3, warmup_steps=30, decay_steps=270, end=1e-4
)

# name -> hyperparameters; "schedule" is None (constant lr) or the warmup-cosine parameters.
CASES: dict[str, dict] = {
    "adamw_default": _case("adamw", weight_decay=1e-2),
    "adam_plain": _case("adam"),
    "adam_l2": _case("adam", weight_decay=0.1),
    "adamw_amsgrad": _case("adamw", weight_decay=1e-2, amsgrad=True),
    "adamw_maximize": _case("adamw", weight_decay=1e-2, maximize=True),
    "adam_all_f64": _case("adam", weight_decay=0.05, amsgrad=True, maximize=True, dtype="float64"),
    "adamw_f64": _case("adamw", weight_decay=0.01, dtype="float64"),
    "adamw_schedule": _case("adamw", lr=3e-3, weight_decay=1e-2, schedule=WARMUP_COSINE),
    "adam_hot": _case("adam", lr=1e-2, betas=(0.5, 0.9), eps=1e-6),
    "adamw_strong_decay": _case("adamw", lr=1e-2, weight_decay=0.5),
    # torch param groups: "b" without weight decay at 3x the lr, "w" with decay; every step
    # clips the gradients of both leaves together (clip_grad_norm_ over all parameters).
    "adamw_groups_clip": _case(
        "adamw",
        lr=2e-3,
        weight_decay=5e-2,
        schedule=WARMUP_COSINE,
        groups={"b": {"lr_scale": 3.0, "weight_decay": 0.0}, "w": {"lr_scale": 1.0}},
        max_grad_norm=1.0,
    ),
}


def case_seed(name: str) -> int:
    """Seed of one case; depends only on its name, so adding a case changes no other."""
    return BASE_SEED ^ zlib.crc32(name.encode())


def lr_sequence(hp: dict, steps: int = STEPS) -> np.ndarray:
    """Learning rate used by step k (k = completed steps before it), float64 of shape (steps,).

    The warmup-cosine formula is written out here on purpose, independently of
    ``adamnp.schedules``: linear from ``init`` to ``peak`` over ``warmup_steps`` counts, then a
    half cosine from ``peak`` to ``end`` over ``decay_steps`` counts, then ``end``.
    """
    sched = hp.get("schedule")
    if sched is None:
        return np.full(steps, float(hp["lr"]), dtype=np.float64)
    assert sched["kind"] == "warmup_cosine"
    init, peak, end = sched["init"], sched["peak"], sched["end"]
    warm, decay = sched["warmup_steps"], sched["decay_steps"]
    out = np.empty(steps, dtype=np.float64)
    for k in range(steps):
        if k < warm:
            out[k] = init + (peak - init) * (k / warm)
        elif k < warm + decay:
            frac = (k - warm) / decay
            out[k] = end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
        else:
            out[k] = end
    return out


def make_inputs(name: str, hp: dict) -> dict:
    """Seeded initial params and recorded gradients of one case (independent of torch)."""
    dtype = np.dtype(hp["dtype"])
    rng = np.random.default_rng(case_seed(name))
    p0 = {leaf: rng.standard_normal(SHAPES[leaf]).astype(dtype) for leaf in LEAVES}
    scales = 10.0 ** rng.uniform(*SCALE_LOG10, size=STEPS)
    zero_step = int(rng.integers(STEPS // 4, 3 * STEPS // 4))
    grads = {}
    for leaf in LEAVES:
        shape = (STEPS, *SHAPES[leaf])
        g = rng.standard_normal(shape) * scales.reshape((STEPS,) + (1,) * len(SHAPES[leaf]))
        g[rng.random(shape) < ZERO_FRACTION] = 0.0
        if leaf == "b":
            g[:, 0] = 0.0  # one element that never sees a gradient: m = v = 0, denom = eps
        g[zero_step] = 0.0
        grads[leaf] = g.astype(dtype)
    return {"p0": p0, "grads": grads, "zero_step": zero_step, "lr_per_step": lr_sequence(hp)}


def run_torch(hp: dict, inputs: dict) -> dict:
    """Run torch's single-tensor Adam/AdamW over the recorded gradients."""
    import torch
    import torch.optim.adam as torch_adam

    calls = 0
    original = torch_adam._single_tensor_adam

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    tdtype = getattr(torch, hp["dtype"])
    params = {
        leaf: torch.tensor(inputs["p0"][leaf], dtype=tdtype, requires_grad=True) for leaf in LEAVES
    }
    cls = torch.optim.AdamW if hp["optimizer"] == "adamw" else torch.optim.Adam
    groups = hp.get("groups") or {}
    param_groups = [
        {"params": [params[leaf]], **{k: v for k, v in groups.get(leaf, {}).items()
                                       if k != "lr_scale"}}
        for leaf in LEAVES
    ] if groups else [{"params": [params[leaf] for leaf in LEAVES]}]  # fmt: skip
    scale = {leaf: groups.get(leaf, {}).get("lr_scale", 1.0) for leaf in LEAVES}
    opt = cls(
        param_groups,
        lr=hp["lr"],
        betas=hp["betas"],
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
        amsgrad=hp["amsgrad"],
        maximize=hp["maximize"],
        foreach=False,
        fused=False,
        capturable=False,
        differentiable=False,
    )
    lrs = inputs["lr_per_step"]
    hist = {leaf: [] for leaf in LEAVES}
    torch_adam._single_tensor_adam = counting
    try:
        for k in range(STEPS):
            for group in opt.param_groups:
                (leaf,) = {n for n in LEAVES if params[n] is group["params"][0]}
                group["lr"] = float(lrs[k]) * scale[leaf]
            for leaf in LEAVES:
                params[leaf].grad = torch.from_numpy(inputs["grads"][leaf][k].copy())
            if hp.get("max_grad_norm") is not None:
                torch.nn.utils.clip_grad_norm_(
                    [params[leaf] for leaf in LEAVES], hp["max_grad_norm"]
                )
            opt.step()
            if (k + 1) % HIST_EVERY == 0:
                for leaf in LEAVES:
                    hist[leaf].append(params[leaf].detach().numpy().copy())
    finally:
        torch_adam._single_tensor_adam = original
    if calls != STEPS * len(param_groups):  # once per param group and step
        raise RuntimeError(f"_single_tensor_adam ran {calls} times, expected {STEPS}")

    out = {
        "p_hist": {leaf: np.stack(hist[leaf]) for leaf in LEAVES},
        "p": {},
        "m": {},
        "v": {},
        "vmax": {},
    }
    for leaf in LEAVES:
        st = opt.state[params[leaf]]
        if float(st["step"]) != STEPS:
            raise RuntimeError("unexpected step count in torch state")
        out["p"][leaf] = params[leaf].detach().numpy().copy()
        out["m"][leaf] = st["exp_avg"].numpy().copy()
        out["v"][leaf] = st["exp_avg_sq"].numpy().copy()
        if hp["amsgrad"]:
            out["vmax"][leaf] = st["max_exp_avg_sq"].numpy().copy()
    return out


def build_arrays(name: str, hp: dict) -> dict[str, np.ndarray]:
    """All arrays of one npz file, keyed as stored."""
    import torch

    inputs = make_inputs(name, hp)
    res = run_torch(hp, inputs)
    cls_name = "AdamW" if hp["optimizer"] == "adamw" else "Adam"
    meta = {
        "case": name,
        "optimizer": hp["optimizer"],
        "lr": float(hp["lr"]),
        "betas": list(hp["betas"]),
        "eps": hp["eps"],
        "weight_decay": hp["weight_decay"],
        "amsgrad": hp["amsgrad"],
        "maximize": hp["maximize"],
        "dtype": hp["dtype"],
        "steps": STEPS,
        "hist_every": HIST_EVERY,
        "leaves": list(LEAVES),
        "schedule": hp.get("schedule"),
        "groups": hp.get("groups"),
        "max_grad_norm": hp.get("max_grad_norm"),
        "seed": case_seed(name),
        "zero_grad_step": inputs["zero_step"],
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "produced_by": (
            f"tools/make_torch_vectors.py: torch.optim.{cls_name}"
            "(foreach=False, fused=False) on CPU, stepped once per recorded gradient with "
            "param_group['lr'] = lr_per_step[k] set before step k; p/m/v/vmax are the params and "
            "torch state (exp_avg, exp_avg_sq, max_exp_avg_sq) after the last step."
        ),
        "numerics": (
            "Element-wise ops ran with FMA where torch's CPU kernels use it (lerp_, add with "
            "alpha, addcmul_); Tensor.sqrt is MKL VML (VML_HA), not correctly rounded, so a "
            "replay with a correctly rounded sqrt agrees to ulp level, not bit for bit."
        ),
    }
    arrays: dict[str, np.ndarray] = {
        "meta": np.array(json.dumps(meta, sort_keys=True)),
        "lr_per_step": inputs["lr_per_step"],
    }
    for leaf in LEAVES:
        arrays[f"p0/{leaf}"] = inputs["p0"][leaf]
        arrays[f"grads/{leaf}"] = inputs["grads"][leaf]
        for key in ("p", "m", "v", "vmax", "p_hist"):
            if leaf in res[key]:
                arrays[f"{key}/{leaf}"] = res[key][leaf]
    return arrays


# --------------------------------------------------------------------------------------------
# numpy-only replay: the operation order of torch's _single_tensor_adam on an FMA-capable CPU
# --------------------------------------------------------------------------------------------


def _unfused(a: np.ndarray, b: np.ndarray, c: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``a*b + c`` rounded twice (after the product and after the sum)."""
    return np.asarray(a, dtype) * np.asarray(b, dtype) + np.asarray(c, dtype)


def _fused(a: np.ndarray, b: np.ndarray, c: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Fused multiply-add ``a*b + c`` with a single rounding to ``dtype`` (float32 or float64)."""
    a, b, c = np.broadcast_arrays(np.asarray(a, dtype), np.asarray(b, dtype), np.asarray(c, dtype))
    if dtype == np.float32:
        # a*b is exact in float64; TwoSum gives hi + lo == a*b + c exactly; rounding hi to odd
        # before the final float64 -> float32 rounding makes that rounding correct.
        s = a.astype(np.float64) * b.astype(np.float64)
        cc = c.astype(np.float64)
        hi = s + cc
        bb = hi - s
        lo = (s - (hi - bb)) + (cc - bb)
        fix = (lo != 0) & ((hi.view(np.int64) & 1) == 0)
        hi = np.where(fix, np.nextafter(hi, np.where(lo > 0, np.inf, -np.inf)), hi)
        return hi.astype(np.float32)
    flat = [
        float(Fraction(x) * Fraction(y) + Fraction(z))
        if math.isfinite(x) and math.isfinite(y) and math.isfinite(z)
        else x * y + z
        for x, y, z in zip(a.ravel().tolist(), b.ravel().tolist(), c.ravel().tolist(), strict=True)
    ]
    return np.array(flat, dtype=np.float64).reshape(a.shape)


def replay_case(arrays, sqrt=np.sqrt, fma: bool = True) -> dict[str, np.ndarray]:
    """Replay one stored case in numpy, transcribing torch's operation order.

    Scalars are Python floats (float64) until they meet an array; there they are rounded once to
    the leaf's dtype (``dt(...)`` below), which is what torch does with a Python scalar operand.
    ``fma=False`` rounds the product and the sum separately, as torch's kernels do on a CPU
    without FMA (``ATEN_CPU_CAPABILITY=default``); the stored files were made with FMA.
    """
    meta = json.loads(arrays["meta"][()])
    dtype = np.dtype(meta["dtype"])
    _fma = _fused if fma else _unfused
    dt = dtype.type
    b1, b2 = meta["betas"]
    eps, wd = meta["eps"], meta["weight_decay"]
    lrs = arrays["lr_per_step"]
    out: dict[str, np.ndarray] = {}
    for leaf in meta["leaves"]:
        p = arrays[f"p0/{leaf}"].copy()
        m = np.zeros_like(p)
        v = np.zeros_like(p)
        vmax = np.zeros_like(p)
        hist = []
        for k in range(meta["steps"]):
            lr = float(lrs[k])
            step = float(k + 1)
            g = arrays[f"grads/{leaf}"][k]
            if meta["maximize"]:
                g = -g
            if wd != 0:
                if meta["optimizer"] == "adamw":
                    p = p * dt(1 - lr * wd)  # param.mul_(1 - lr*wd)
                else:
                    g = _fma(p, dt(wd), g, dtype)  # grad.add(param, alpha=wd)
            w = dt(1 - b1)  # exp_avg.lerp_(grad, 1 - b1)
            if abs(w) < 0.5:
                m = _fma(w, g - m, m, dtype)
            else:
                m = _fma(w - dt(1), g - m, g, dtype)
            v = v * dt(b2)  # exp_avg_sq.mul_(b2)
            v = _fma(dt(1 - b2) * g, g, v, dtype)  #   .addcmul_(g, g, 1 - b2)
            bias_correction1 = 1 - b1**step
            bias_correction2 = 1 - b2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5  # pow, not math.sqrt
            if meta["amsgrad"]:
                vmax = np.maximum(vmax, v)
                vv = vmax
            else:
                vv = v
            denom = sqrt(vv) / dt(bias_correction2_sqrt) + dt(eps)
            p = p + (dt(-step_size) * m) / denom  # param.addcdiv_(m, denom, -ss)
            if (k + 1) % meta["hist_every"] == 0:
                hist.append(p)
        out[f"p/{leaf}"] = p
        out[f"m/{leaf}"] = m
        out[f"v/{leaf}"] = v
        if meta["amsgrad"]:
            out[f"vmax/{leaf}"] = vmax
        out[f"p_hist/{leaf}"] = np.stack(hist)
    return out


def ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in units in the last place between two arrays of the same float dtype."""
    itype = np.int32 if a.dtype == np.float32 else np.int64
    ia = a.view(itype).astype(np.int64)
    ib = b.view(itype).astype(np.int64)
    # map the sign-magnitude encoding onto a monotonic integer line
    top = np.int64(np.iinfo(itype).min)
    ia = np.where(ia < 0, top - ia, ia)
    ib = np.where(ib < 0, top - ib, ib)
    return int(np.abs(ia - ib).max()) if ia.size else 0


# --------------------------------------------------------------------------------------------


def _file(out_dir: Path, name: str) -> Path:
    return out_dir / f"torch_{name}.npz"


def cmd_write(out_dir: Path, only=()) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    print(
        f"{'case':22s} {'opt':5s} {'dtype':7s} {'lr':>8s} {'wd':>6s} ams max  "
        f"{'|p-p0|max':>10s} {'bytes':>8s}"
    )
    for name, hp in CASES.items():
        if only and name not in only:
            continue
        arrays = build_arrays(name, hp)
        path = _file(out_dir, name)
        np.savez_compressed(path, **arrays)
        size = path.stat().st_size
        total += size
        moved = max(
            float(np.abs(arrays[f"p/{leaf}"] - arrays[f"p0/{leaf}"]).max()) for leaf in LEAVES
        )
        print(
            f"{name:22s} {hp['optimizer']:5s} {hp['dtype']:7s} {hp['lr']:8.1e} "
            f"{hp['weight_decay']:6.3g} {int(hp['amsgrad']):3d} {int(hp['maximize']):3d}  "
            f"{moved:10.3e} {size:8d}"
        )
    print(f"{len(CASES)} files, {total} bytes in all, in {out_dir}")
    return 0


def cmd_check(out_dir: Path) -> int:
    bad = 0
    for name, hp in CASES.items():
        fresh = build_arrays(name, hp)
        with np.load(_file(out_dir, name), allow_pickle=False) as z:
            stored = {k: z[k] for k in z.files}
        keys = sorted(set(fresh) | set(stored))
        diff = [
            k
            for k in keys
            if k != "meta"
            and (
                k not in fresh
                or k not in stored
                or fresh[k].dtype != stored[k].dtype
                or not np.array_equal(fresh[k].view(np.uint8), stored[k].view(np.uint8))
            )
        ]
        print(f"{name:22s} {'identical' if not diff else 'DIFFERS: ' + ', '.join(diff)}")
        bad += bool(diff)
    return int(bad > 0)


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (0 for empty or all-zero ``b``)."""
    scale = float(np.abs(b).max()) if b.size else 0.0
    return float(np.abs(a.astype(np.float64) - b).max()) / scale if scale else 0.0


def cmd_replay(out_dir: Path, torch_sqrt: bool, fma: bool) -> int:
    sqrt = np.sqrt
    if torch_sqrt:
        import torch

        def sqrt(x):
            return torch.from_numpy(np.ascontiguousarray(x)).sqrt().numpy()

    worst_exact = 0
    for name in CASES:
        if CASES[name].get("groups") or CASES[name].get("max_grad_norm"):
            print(f"{name:20s} not replayed (the transcription has no groups or clipping)")
            continue
        with np.load(_file(out_dir, name), allow_pickle=False) as z:
            stored = {k: z[k] for k in z.files}
        got = replay_case(stored, sqrt=sqrt, fma=fma)
        parts = []
        for key in sorted(got):
            d = ulp_distance(got[key], stored[key])
            parts.append(f"{key} {d}" + (f" ({rel_error(got[key], stored[key]):.1e})" if d else ""))
            worst_exact = max(worst_exact, d)
        print(f"{name:20s} " + ", ".join(parts))
    print("(max ulp distance per array; in parentheses max|replay - torch| / max|torch|)")
    if torch_sqrt and fma and worst_exact:
        print("replay with torch's sqrt is NOT bit-exact")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="vector directory")
    ap.add_argument("--only", nargs="*", default=(), help="write only these cases")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--check",
        action="store_true",
        help="regenerate with torch and compare with the stored files",
    )
    mode.add_argument(
        "--replay",
        action="store_true",
        help="replay the stored files in numpy and print ulp distances",
    )
    ap.add_argument(
        "--torch-sqrt",
        action="store_true",
        help="with --replay: use torch's sqrt (then the replay must be bit-exact)",
    )
    ap.add_argument(
        "--no-fma",
        action="store_true",
        help="with --replay: round products and sums separately (non-FMA CPUs)",
    )
    args = ap.parse_args(argv)
    if args.check:
        return cmd_check(args.out)
    if args.replay:
        return cmd_replay(args.out, args.torch_sqrt, not args.no_fma)
    return cmd_write(args.out, args.only)


if __name__ == "__main__":
    sys.exit(main())
