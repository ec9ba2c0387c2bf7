"""The NumPy reference against trajectories recorded from torch.optim (tests/vectors/).

The vectors were written by ``tools/make_torch_vectors.py`` from torch's single-tensor
Adam/AdamW; this test needs no torch. Both sides run the same operations, but torch fuses two of
them into FMAs and its ``sqrt`` is not correctly rounded, so per step the two updates differ
by a few float32 roundings. The bounds below are derived from that, not fitted:

* moments ``m`` and ``v`` are exponential averages of the same recorded gradients (open loop;
  except with the L2 term, which feeds ``p`` back): every step adds at most a few rounding
  errors of relative size ``eps`` and the average forgets old ones, so they agree to
  ``RTOL_MOMENT = 16 eps`` relative, plus an absolute floor of ``16 eps * max|term|`` where
  cancellation leaves a value near zero;
* each update of ``p`` (size at most ``lr * U``, with ``U`` = max |m_hat / (sqrt(v_hat)+eps)|
  measured on our trajectory) differs by at most ``16 eps`` relative, and ``p += u`` rounds
  once (half an ulp of ``|p|``, on each side); over ``T`` steps the differences add up at most
  linearly: ``|dp| <= sum_t (16 eps lr_t U + ulp(max|p|))``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import adamnp

VECTORS = sorted((Path(__file__).parent / "vectors").glob("torch_*.npz"))
K = 16  # roundings per step budgeted on each side (about 10 ops, plus torch's sqrt error)


def load_case(path):
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    return json.loads(str(data.pop("meta"))), data


def replay(meta, data, backend):
    leaves = meta["leaves"]
    params = {k: data[f"p0/{k}"].copy() for k in leaves}
    lrs = data["lr_per_step"]
    make = adamnp.adamw if meta["optimizer"] == "adamw" else adamnp.adam
    groups = meta.get("groups") or {}

    def config(leaf):  # torch's param group of a leaf (one group if the case has none)
        group = groups.get(leaf, {})
        scale = group.get("lr_scale", 1.0)
        return make(
            lr=(lambda count: float(lrs[count]) * scale),
            betas=tuple(meta["betas"]),
            eps=meta["eps"],
            weight_decay=group.get("weight_decay", meta["weight_decay"]),
            amsgrad=meta["amsgrad"],
            maximize=meta["maximize"],
            max_grad_norm=meta.get("max_grad_norm"),
        )

    if groups:  # one label per leaf, one state, one step: clipped by the global norm
        configs = {leaf: config(leaf) for leaf in leaves}
        state = adamnp.init(params, configs, labels=lambda path, a: path.split("'")[1],
                            backend=backend)  # fmt: skip
    else:
        state = adamnp.init(params, config(None), backend=backend)
    hist = {k: [] for k in leaves}
    worst_u = 0.0
    for t in range(meta["steps"]):
        before = {k: params[k].copy() for k in leaves}
        adamnp.step(params, {k: data[f"grads/{k}"][t] for k in leaves}, state)
        for k in leaves:
            if lrs[t] > 0:
                u = np.abs(params[k] - before[k]).max() / (lrs[t] * _lr_scale(meta, k))
                worst_u = max(worst_u, float(u))
            if (t + 1) % meta["hist_every"] == 0:
                hist[k].append(params[k].copy())
    return params, state, hist, worst_u


def _lr_scale(meta, leaf):
    return ((meta.get("groups") or {}).get(leaf) or {}).get("lr_scale", 1.0)


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_reference_matches_torch(path, backend):
    meta, data = load_case(path)
    params, state, hist, worst_u = replay(meta, data, backend)
    dtype = np.dtype(meta["dtype"])
    eps = np.finfo(dtype).eps
    lrs = data["lr_per_step"]
    for i, k in enumerate(state.paths):
        leaf = k.split("'")[1]
        slot = state.slots[i]
        g_scale = np.abs(data[f"grads/{leaf}"]).max()
        for name in ("m", "v", "vmax") if meta["amsgrad"] else ("m", "v"):
            ours, theirs = getattr(slot, name), data[f"{name}/{leaf}"]
            floor = K * eps * (g_scale if name == "m" else g_scale**2)
            np.testing.assert_allclose(ours, theirs, rtol=K * eps, atol=floor, err_msg=name)
        p_scale = max(np.abs(data[f"p_hist/{leaf}"]).max(), np.abs(data[f"p0/{leaf}"]).max())
        ulp = np.spacing(dtype.type(p_scale))
        for j, snap in enumerate(hist[leaf]):
            steps = (j + 1) * meta["hist_every"]
            lr_leaf = lrs[:steps] * _lr_scale(meta, leaf)
            bound = float(np.sum(K * eps * lr_leaf * worst_u) + steps * ulp)
            dev = np.abs(snap - data[f"p_hist/{leaf}"][j]).max()
            assert dev <= bound, (leaf, steps, dev, bound)
        np.testing.assert_array_equal(hist[leaf][-1], params[leaf])


def test_vectors_are_present():
    assert len(VECTORS) >= 10, "tests/vectors/torch_*.npz missing: run tools/make_torch_vectors.py"
