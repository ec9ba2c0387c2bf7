"""Write the peer-state vectors of adamnp.interop's tests (``tests/vectors/interop_*.npz``).

Run by hand on a machine with torch (and bitsandbytes for the ``bnb_*`` cases)::

    python tools/make_interop_vectors.py              # (re)write every case
    python tools/make_interop_vectors.py --only bnb_adamw8bit
    python tools/make_interop_vectors.py --report     # no files: adamnp vs the live peer

Each case builds three leaves, runs the peer optimizer (``torch.optim.Adam``/``AdamW`` with
``foreach=False, fused=False``, or bitsandbytes' ``AdamW8bit`` on CPU) for ``N`` steps, stores
its ``state_dict()`` as plain arrays and its params, then ``M`` more steps with the recorded
gradients and stores the params and state after them. Gradients are seeded normal draws times
a per-step scale ``10**U(-2, 0)``, rounded to float16 values (stored as float16; cast them
to float32, exactly), and do not depend on the params (an open-loop replay).

Keys: ``meta`` (JSON: case, peer, optimizer, the param groups as the state dict has them,
``order`` (adamnp path of each peer param) or ``names`` (peer name -> adamnp path), steps,
versions), ``params_n/<leaf>``, ``grads/<leaf>`` (M, *shape), ``params_end/<leaf>``, and the
peer's per-parameter state after ``N`` steps, ``state_n/<id>/<key>``, and after ``N + M``,
``state_end/<id>/<key>`` (bitsandbytes' nested ``__bnb_optimizer_quant_state__`` is
flattened; ``step`` is stored as the peer has it: a float32 for torch, an int64 for
bitsandbytes). ``numpy.load(path, allow_pickle=False)`` reads them without torch.
:func:`state_dict_of` rebuilds the peer's state dict from a file.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import zlib
from pathlib import Path

import numpy as np

N_STEPS, M_STEPS = 10, 5
OUT = Path(__file__).resolve().parents[1] / "tests" / "vectors"
WRAP = "__bnb_optimizer_quant_state__"

TORCH_SHAPES = {"b": (16,), "emb": (5, 3, 4), "w": (8, 16)}
BNB_SHAPES = {"b": (80,), "emb": (70, 60), "w": (64, 64)}  # w, emb >= 4096: 8-bit in bnb

CASES = {
    # torch's order w, b, emb (not adamnp's sorted b, emb, w); matched by order
    "torch_adamw": dict(peer="torch", cls="AdamW", groups=[dict(leaves=("w", "b", "emb"))],
                        lr=1e-2, weight_decay=0.01, match="order"),
    "torch_adam_amsgrad": dict(peer="torch", cls="Adam", groups=[dict(leaves=("emb", "w", "b"))],
                               lr=1e-2, weight_decay=0.01, amsgrad=True, match="order"),
    # two param groups (lr and decay differ): built from named params, matched by name
    "torch_adamw_groups": dict(peer="torch", cls="AdamW", lr=1e-2, match="names", groups=[
        dict(leaves=("w", "emb"), lr=2e-2, weight_decay=0.1),
        dict(leaves=("b",), lr=1e-2, weight_decay=0.0)]),
    # bitsandbytes: w and emb have 8-bit state, b (80 < min_8bit_size) float32 state
    "bnb_adamw8bit": dict(peer="bnb", cls="AdamW8bit", groups=[dict(leaves=("w", "b", "emb"))],
                          lr=1e-3, weight_decay=0.01, match="order"),
    "bnb_adamw8bit_groups": dict(peer="bnb", cls="AdamW8bit", lr=1e-3, match="names", groups=[
        dict(leaves=("emb", "w"), weight_decay=0.1), dict(leaves=("b",), weight_decay=0.0)]),
}  # fmt: skip


def path(leaf: str) -> str:
    return f"params[{leaf!r}]"


def inputs(name: str) -> dict:
    """Seeded initial params and the N + M recorded gradients of one case (no torch)."""
    case = CASES[name]
    shapes = TORCH_SHAPES if case["peer"] == "torch" else BNB_SHAPES
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    scale = 10.0 ** rng.uniform(-2, 0, size=N_STEPS + M_STEPS)
    grads = {}
    for k, s in shapes.items():
        g = rng.standard_normal((N_STEPS + M_STEPS, *s)) * scale.reshape(-1, *[1] * len(s))
        grads[k] = g.astype(np.float16).astype(np.float32)  # stored as float16, exactly
    return {"p0": p0, "grads": grads}


def make_optimizer(name: str, tparams: dict):
    """The peer optimizer of a case over torch tensors ``tparams`` (leaf -> Parameter)."""
    import torch

    case = CASES[name]
    extra = {k: case[k] for k in ("lr", "weight_decay", "amsgrad") if k in case}
    groups = []
    for g in case["groups"]:
        ps = [(leaf, tparams[leaf]) if case["match"] == "names" else tparams[leaf]
              for leaf in g["leaves"]]  # fmt: skip
        groups.append({"params": ps, **{k: v for k, v in g.items() if k != "leaves"}})
    if case["peer"] == "torch":
        cls = getattr(torch.optim, case["cls"])
        return cls(groups, **extra, foreach=False, fused=False)
    import bitsandbytes as bnb

    return getattr(bnb.optim, case["cls"])(groups, **extra)


def torch_order(name: str) -> list[str]:
    return [leaf for g in CASES[name]["groups"] for leaf in g["leaves"]]


def flat_state(sd: dict) -> dict[str, np.ndarray]:
    """``state/<id>/<key>`` arrays of a peer state dict (bitsandbytes' nesting flattened)."""
    out = {}
    for pid, entry in sd["state"].items():
        entry = dict(entry)
        entry.update(entry.pop(WRAP, {}))
        for key, v in entry.items():
            a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v, np.int64)
            out[f"{pid}/{key}"] = a.copy()
    return out


def run(name: str) -> dict[str, np.ndarray]:
    """Run the peer N + M steps; the arrays of one file."""
    import torch

    case, data = CASES[name], inputs(name)
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in data["p0"].items()}
    opt = make_optimizer(name, tparams)

    def steps(lo, hi):
        for t in range(lo, hi):
            for k, p in tparams.items():
                p.grad = torch.from_numpy(data["grads"][k][t].copy())
            opt.step()

    steps(0, N_STEPS)
    arrays = {f"params_n/{k}": p.detach().numpy().copy() for k, p in tparams.items()}
    sd = opt.state_dict()
    arrays.update({f"state_n/{k}": v for k, v in flat_state(sd).items()})
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]  # fmt: skip
    steps(N_STEPS, N_STEPS + M_STEPS)
    arrays.update({f"params_end/{k}": p.detach().numpy().copy() for k, p in tparams.items()})
    arrays.update({f"state_end/{k}": v for k, v in flat_state(opt.state_dict()).items()})
    arrays.update({f"grads/{k}": g[N_STEPS:].astype(np.float16) for k, g in data["grads"].items()})
    order = [path(leaf) for leaf in torch_order(name)]
    meta = {
        "case": name,
        "peer": case["peer"],
        "optimizer": case["cls"],
        "param_groups": groups,
        "n_steps": N_STEPS,
        "m_steps": M_STEPS,
        "leaves": sorted(tparams),
        "torch_version": torch.__version__,
        "machine": platform.machine(),
        "produced_by": "tools/make_interop_vectors.py",
    }
    if case["match"] == "names":
        meta["names"] = {leaf: path(leaf) for leaf in torch_order(name)}
    else:
        meta["order"] = order
    if case["peer"] == "bnb":
        import bitsandbytes

        meta["bitsandbytes_version"] = bitsandbytes.__version__
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    return arrays


def state_dict_of(arrays: dict, when: str = "state_n") -> dict:
    """The peer's ``state_dict()`` stored in a file's arrays (NumPy arrays for tensors)."""
    meta = json.loads(str(arrays["meta"]))
    state: dict = {}
    for key, a in arrays.items():
        if key.startswith(when + "/"):
            _, pid, name = key.split("/")
            state.setdefault(int(pid), {})[name] = a
    if meta["peer"] == "bnb":
        state = {pid: {"step": int(e.pop("step")), WRAP: e} for pid, e in state.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def report(name: str, arrays: dict) -> str:
    """Import the stored state into adamnp, replay M steps, compare with the peer."""
    import adamnp
    from adamnp import interop

    meta = json.loads(str(arrays["meta"]))
    params = {k: arrays[f"params_n/{k}"].copy() for k in meta["leaves"]}
    how = {"order": meta["order"]} if "order" in meta else {"names": meta["names"]}
    load = interop.from_torch if meta["peer"] == "torch" else interop.from_bnb
    state = load(state_dict_of(arrays), params, backend="numpy", **how)
    for t in range(meta["m_steps"]):
        adamnp.step(params, {k: arrays[f"grads/{k}"][t].astype(np.float32) for k in params}, state)
    parts = []
    for k in meta["leaves"]:
        got, want = params[k], arrays[f"params_end/{k}"]
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        parts.append(f"{k} {rel:.2e}")
    return f"{name:22s} max|p - peer| / max|peer| after {meta['m_steps']} steps: " + ", ".join(
        parts
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=())
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report", action="store_true", help="compare only, write nothing")
    args = ap.parse_args(argv)
    for name in CASES:
        if args.only and name not in args.only:
            continue
        arrays = run(name)
        if not args.report:
            file = args.out / f"interop_{name}.npz"
            np.savez_compressed(file, **arrays)
            print(f"wrote {file} ({file.stat().st_size} bytes)")
        print(report(name, arrays))
    return 0


if __name__ == "__main__":
    sys.exit(main())
