"""``python -m adamnp verify``: every available backend against the NumPy reference, here.

Each check runs the same few steps (same initial parameters, same gradients) on a backend and
on the reference, then compares parameters and optimizer state:

* floating-point values in units of ``ulp(ref) + eps * scale``: one unit in the last place of
  the reference value plus one of the largest value in play (for parameters the largest update
  of the leaf, for moments the largest moment). Bit-identical results give 0; a budget of
  ``2 * steps`` units allows a few differently rounded operations per step (e.g. a GPU that
  fuses a multiply and an add);
* 8-bit codes exactly: the number of codes that differ. A code may differ by one where the
  scaled moment lies on a midpoint between two map values (rounded differently by a fused
  operation); up to ``max(2, n / 10^4)`` such codes pass, and then the parameters must agree
  to 10% of the largest update instead of to ulps.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .._tree import flatten
from ..backends.cuda import INSTALL as CUDA_INSTALL
from . import common as cli


def hyperparameter_sets():
    """``{label: AdamConfig}``: the configurations each check runs."""
    import adamnp

    return {
        "adamw": adamnp.adamw(lr=1e-3, weight_decay=1e-2),
        "adam+l2+amsgrad": adamnp.adam(lr=1e-2, weight_decay=1e-3, amsgrad=True),
        "b1=.4,maximize,clip": adamnp.adamw(
            lr=3e-2, betas=(0.4, 0.99), eps=1e-6, maximize=True, max_grad_norm=1.0
        ),
        "lr schedule,wd=.1": adamnp.adamw(
            lr=lambda count: 1e-3 * (count + 1), betas=(0.8, 0.95), weight_decay=0.1
        ),
    }


def leaf_shapes(size: int) -> dict:
    """The tree of a check: partial, exact and multi-block sizes plus one leaf of ``size``."""
    return {"a": (1,), "b": (255,), "c": (257,), "d": (64, 65), "e": (size,)}


def _problem(shapes: dict, dtype, steps: int, seed: int = 0):
    """Initial params and per-step gradients (host), magnitudes spread over 1e-4 .. 10."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = []
    for _ in range(steps):
        g = {}
        for k, s in shapes.items():
            scale = 10.0 ** rng.uniform(-4, 1, s)
            g[k] = (rng.standard_normal(s) * scale).astype(dtype)
        g["e"].reshape(-1)[:256] = 0  # one all-zero block: absmax 0 in 8-bit state
        grads.append(g)
    return params, grads


@dataclass
class Outcome:
    """Final params and state buffers of one run (host arrays), or why it could not run."""

    params: dict | None = None
    buffers: list | None = None  # per group: {name: array}
    error: str | None = None


def run_once(
    backend, config, bits, params0, grads, state_format="sqrt", v_rounding=None
) -> Outcome:
    """Take ``len(grads)`` steps from ``params0`` on ``backend``; return host copies."""
    import adamnp

    mover = cli.Mover(backend)
    params = mover.to_backend({k: v.copy() for k, v in params0.items()})
    try:
        state = adamnp.init(params, config, backend=backend, state_bits=bits, min_8bit_size=0,
                            state_format=state_format, v_rounding=v_rounding)  # fmt: skip
        for i, g in enumerate(grads):
            if i == 0:
                with cli.compile_notice(f"{backend}, {bits}-bit state"):
                    adamnp.step(params, mover.to_backend(g), state)
            else:
                adamnp.step(params, mover.to_backend(g), state)
        mover.sync()
    except cli.EIGHT_BIT_ERRORS as exc:
        if bits != 8:
            raise
        return Outcome(error=f"8-bit state not available: {type(exc).__name__}: {exc}")
    buffers = [
        {name: mover.array_to_host(buf) for name, buf in group.buffers.items()}
        for group in state.groups
    ]
    return Outcome(mover.to_host(params, copy=True), buffers)


def float_units(got, ref, scale) -> float:
    """Max of ``|got - ref| / (ulp(ref) + eps * scale)``; inf where NaN-ness differs.

    Examples
    --------
    >>> ref = np.array([1.0, 2.0], np.float32)
    >>> float_units(ref, ref, 2.0), float_units(np.nextafter(ref, 3), ref, 0.0)
    (0.0, 1.0)
    """
    if got.size == 0:
        return 0.0
    nan_got, nan_ref = np.isnan(got), np.isnan(ref)
    if np.any(nan_got != nan_ref):
        return float("inf")
    ok = ~nan_ref
    g, r = got[ok].astype(np.float64), ref[ok].astype(np.float64)
    unit = np.spacing(np.abs(ref[ok])).astype(np.float64) + np.finfo(ref.dtype).eps * scale
    return float(np.max(np.abs(g - r) / unit, initial=0.0))


def compare(out: Outcome, ref: Outcome, params0: dict, steps: int) -> dict:
    """Deviations of ``out`` from ``ref`` and the verdict (see the module docstring)."""
    dev_p, rel_p = 0.0, 0.0
    p_leaves, _, _ = flatten(out.params)
    r_leaves, _, _ = flatten(ref.params)
    z_leaves, _, _ = flatten(params0)
    for got, want, start in zip(p_leaves, r_leaves, z_leaves):
        update = float(np.max(np.abs(want.astype(np.float64) - start), initial=0.0))
        dev_p = max(dev_p, float_units(got, want, update))
        diff = float(np.max(np.abs(got.astype(np.float64) - want), initial=0.0))
        rel_p = max(rel_p, diff / update if update > 0 else (0.0 if diff == 0 else np.inf))
    dev_s, mismatched, codes, worst_code = 0.0, 0, 0, 0
    for got_g, ref_g in zip(out.buffers, ref.buffers):
        for name, want in ref_g.items():
            got = got_g[name]
            if name.startswith("codes_"):
                delta = np.abs(got.astype(np.int16) - want.astype(np.int16))
                mismatched += int(np.count_nonzero(delta))
                worst_code = max(worst_code, int(delta.max(initial=0)))
                codes += want.size
            else:
                scale = float(np.max(np.abs(want), initial=0.0))
                dev_s = max(dev_s, float_units(got, want, scale))
    budget = 2 * steps
    allowed = max(2, codes // 10_000)
    if mismatched == 0:
        ok = dev_p <= budget and dev_s <= budget
    else:
        ok = mismatched <= allowed and worst_code <= 1 and rel_p <= 0.1
    return {
        "params": dev_p,
        "state": dev_s,
        "mismatched": mismatched,
        "codes": codes,
        "ok": ok,
    }


def _units(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.2f}"


def verify(backends, bits, size, steps, out=None) -> tuple[list, int]:
    """Run every check, printing ``.`` (pass), ``F`` (fail) or ``s`` (skip) for each.

    Returns ``(table rows, number of failures, reasons for skips)``.
    """
    out = sys.stdout if out is None else out
    shapes = leaf_shapes(size)
    configs = hyperparameter_sets()
    rows, failures, notes = [], 0, {}
    refs, problems = {}, {}
    for backend in [b for b in backends if b != "numpy"]:
        for k in bits:
            dtypes = (np.float32, np.float64) if k == 32 else (np.float32,)
            runs = [(label, config, ("sqrt", None)) for label, config in configs.items()]
            if k == 8:  # and bitsandbytes' format, v rounded to nearest and stochastically
                for rounding in ("nearest", "stochastic"):
                    runs.append((f"adamw, bnb, v {rounding}", configs["adamw"], ("bnb", rounding)))
            for dtype in dtypes:
                for label, config, rounding in runs:
                    key = (k, np.dtype(dtype).name, label)
                    if dtype not in problems:
                        problems[dtype] = _problem(shapes, dtype, steps)
                    params0, grads = problems[dtype]
                    if key not in refs:
                        refs[key] = run_once("numpy", config, k, params0, grads, *rounding)
                    ref = refs[key]
                    got = ref
                    if not ref.error:
                        got = run_once(backend, config, k, params0, grads, *rounding)
                    row = [backend, k, np.dtype(dtype).name, label]
                    if got.error:
                        rows.append([*row, "-", "-", "-", "skip"])
                        notes.setdefault(got.error, None)
                        print("s", end="", file=out, flush=True)
                        continue
                    c = compare(got, ref, params0, steps)
                    failures += not c["ok"]
                    codes = f"{c['mismatched']}/{c['codes']}" if k == 8 else "-"
                    verdict = "pass" if c["ok"] else "FAIL"
                    rows.append([*row, _units(c["params"]), _units(c["state"]), codes, verdict])
                    print("." if c["ok"] else "F", end="", file=out, flush=True)
    print(file=out)
    return rows, failures, list(notes)


def main(args, out=None) -> int:
    """Entry point of ``python -m adamnp verify`` (``args`` from argparse)."""
    out = sys.stdout if out is None else out
    backends, skipped = cli.select(args.backend)
    bits = cli.bits_list(args.bits)
    shapes = leaf_shapes(args.size)
    sizes = ", ".join("x".join(map(str, s)) for s in shapes.values())
    print(
        f"adamnp verify: backends vs the NumPy reference, {args.steps} steps, one tree with "
        f"leaves of {sizes} elements",
        file=out,
    )
    cli.print_backends(backends, skipped, bits, out)
    if cli.refuse_unavailable(args.backend, skipped, out):
        return 1
    others = [b for b in backends if b != "numpy"]
    if not others:
        why = (
            "--backend numpy selects the reference only"
            if args.backend == "numpy"
            else "no backend besides the NumPy reference runs here (numba: pip install numba; "
            f"cuda: a CUDA GPU and {CUDA_INSTALL})"
        )
        print(f"nothing to compare: {why}", file=out)
        return 0
    print("checking: ", end="", file=out, flush=True)
    rows, failures, notes = verify(backends, bits, args.size, args.steps, out=out)
    headers = [
        "backend", "bits", "dtype", "hyperparameters", "params [u]", "state [u]",
        "codes differing", "result",
    ]  # fmt: skip
    print(file=out)
    print(cli.table(headers, rows, right={1, 4, 5, 6}), file=out)
    for note in notes:
        print(f"skip: {note}", file=out)
    ran = [r for r in rows if r[-1] != "skip"]
    print(
        f"\n[u]: max |x - x_ref| / (ulp(x_ref) + eps * scale); scale = largest update (params) "
        f"or largest value (moments, absmax); pass <= {2 * args.steps} u.\n"
        "codes differing: 8-bit codes unequal to the reference's after the last step "
        "(up to max(2, n/10^4) off-by-one codes pass).\n"
        f"summary: {len(ran)} checks, {len(ran) - failures} passed, {failures} failed, "
        f"{len(rows) - len(ran)} skipped",
        file=out,
    )
    return 1 if failures else 0
