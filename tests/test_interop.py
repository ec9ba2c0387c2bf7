"""adamnp.interop against torch.optim and bitsandbytes' 8-bit Adam.

Without torch: the state dicts recorded by ``tools/make_interop_vectors.py``
(``tests/vectors/interop_*.npz``) are imported, the recorded M steps replayed, and the result
compared with the peer's after the same steps; plus named errors. With torch (and
bitsandbytes) installed, the same checks run on freshly recorded peers, and an exported state
is continued in the peer.

Budgets: float32 moments move exactly, so the import is exact and the continued runs differ
only by the kernels' roundings (torch fuses two operations, adamnp does not: a few ulp per
step). Measured after 5 steps (``python tools/make_interop_vectors.py --report``): torch at
most 2e-8 of max|p|, bitsandbytes' float32 leaf 5e-8, its 8-bit leaves 2e-5 (a code that
rounds the other way at a midpoint moves an element by a fraction of ``lr``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

import adamnp
from adamnp import interop

ROOT = Path(__file__).resolve().parents[1]
VECTORS = sorted((ROOT / "tests" / "vectors").glob("interop_*.npz"))
TOL = {"fp32": 1e-6, "q8": 1e-4}  # max|p - peer| / max|peer| after M continued steps


def _tool():
    spec = importlib.util.spec_from_file_location("miv", ROOT / "tools" / "make_interop_vectors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TOOL = _tool()


def load(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def rel(got, want) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def replay_and_compare(arrays, backend="numpy"):
    """Import the peer's state after N steps, take its M recorded steps, compare; return
    (params, state, meta)."""
    meta = json.loads(str(arrays["meta"]))
    params = {k: arrays[f"params_n/{k}"].copy() for k in meta["leaves"]}
    how = {"order": meta["order"]} if "order" in meta else {"names": meta["names"]}
    torch_peer = meta["peer"] == "torch"
    load_fn = interop.from_torch if torch_peer else interop.from_bnb
    state = load_fn(TOOL.state_dict_of(arrays), params, backend=backend, **how)
    assert state.step == meta["n_steps"]
    for t in range(meta["m_steps"]):
        grads = {k: arrays[f"grads/{k}"][t].astype(np.float32) for k in params}
        adamnp.step(params, grads, state)
    for i, path in enumerate(state.paths):
        leaf = path[len("params['") : -2]
        kind = "q8" if isinstance(state.slots[i], adamnp.QuantSlot) else "fp32"
        got, want = params[leaf], arrays[f"params_end/{leaf}"]
        assert rel(got, want) <= TOL[kind], (meta["case"], leaf, rel(got, want))
    # export: the continued moments against the peer's, after N + M steps
    export = interop.to_torch if torch_peer else interop.to_bnb
    out = export(state, param_groups=meta["param_groups"], **how)
    peer = TOOL.state_dict_of(arrays, "state_end")
    for pid, entry in out["state"].items():
        want = peer["state"][pid]
        if not torch_peer:
            entry, want = entry[interop._BNB_WRAP], want[interop._BNB_WRAP]
        for key, got in entry.items():
            w = np.asarray(want[key])
            assert got.dtype == w.dtype and got.shape == w.shape, key
            if got.dtype == np.uint8:  # codes: a few round the other way at a midpoint
                assert np.mean(got != w) <= 0.02, (meta["case"], pid, key, np.mean(got != w))
                n, qmap = key[-1], adamnp.dynamic_map(key == "state1")
                absmax = np.asarray(want[f"absmax{n}"])
                diff = adamnp.dequantize_blockwise(got, entry[f"absmax{n}"], qmap) - (
                    adamnp.dequantize_blockwise(w, absmax, qmap)
                )
                assert np.all(np.abs(diff.reshape(-1)) <= 0.05 * np.repeat(absmax, 256)[: w.size])
            elif key == "step" or key.startswith("qmap"):
                assert np.array_equal(got, w)
            else:
                np.testing.assert_allclose(got, w, rtol=1e-2 if "absmax" in key else 1e-5,
                                           atol=1e-6 * np.abs(w).max())  # fmt: skip
    return params, state, meta


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_recorded_peer_continues_in_adamnp(path):
    replay_and_compare(load(path))


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_import_export_round_trip_is_exact(path):
    arrays = load(path)
    meta = json.loads(str(arrays["meta"]))
    params = {k: arrays[f"params_n/{k}"].copy() for k in meta["leaves"]}
    how = {"order": meta["order"]} if "order" in meta else {"names": meta["names"]}
    sd = TOOL.state_dict_of(arrays)
    if meta["peer"] == "torch":
        back = interop.to_torch(interop.from_torch(sd, params, **how), **how,
                                param_groups=meta["param_groups"])  # fmt: skip
    else:
        back = interop.to_bnb(interop.from_bnb(sd, params, **how), **how,
                              param_groups=meta["param_groups"])  # fmt: skip
    assert json.loads(json.dumps(back["param_groups"])) == meta["param_groups"]
    for pid, entry in sd["state"].items():
        want, got = _flat(entry), _flat(back["state"][pid])
        assert set(got) == set(want) and float(got.pop("step")) == float(want.pop("step"))
        for key, w in want.items():  # every moment, code and absmax bit for bit
            assert got[key].dtype == w.dtype and got[key].tobytes() == w.tobytes(), key


def _flat(entry):
    flat = {k: np.asarray(v) for k, v in entry.items() if k != interop._BNB_WRAP}
    flat.update(entry.get(interop._BNB_WRAP, {}))
    return flat


def test_bnb_vector_has_both_kinds_of_leaves():
    arrays = load(ROOT / "tests" / "vectors" / "interop_bnb_adamw8bit.npz")
    params = {k: arrays[f"params_n/{k}"] for k in ("b", "emb", "w")}
    order = json.loads(str(arrays["meta"]))["order"]
    state = interop.from_bnb(TOOL.state_dict_of(arrays), params, order=order)
    kinds = [type(s).__name__ for s in state.slots]
    assert kinds == ["Fp32Slot", "QuantSlot", "QuantSlot"]  # b (80) keeps float32 in bnb
    assert state.state_format == "bnb" and state.step == 10


# -- named errors, nothing changed


def _torch_sd(step_b=3, step_w=3, **group):
    g = {"params": [0, 1], "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
         "amsgrad": False, "maximize": False, "decoupled_weight_decay": True, **group}  # fmt: skip
    one = np.ones
    return {"state": {0: {"step": np.float32(step_b), "exp_avg": one(2, np.float32),
                          "exp_avg_sq": one(2, np.float32)},
                      1: {"step": np.float32(step_w), "exp_avg": one((2, 3), np.float32),
                          "exp_avg_sq": one((2, 3), np.float32)}},
            "param_groups": [g]}  # fmt: skip


def _params():
    return {"b": np.zeros(2, np.float32), "w": np.zeros((2, 3), np.float32)}


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        (lambda sd: None, {"order": ["params['b']"]}, "torch has 2 params, order/names give 1"),
        (lambda sd: None, {"order": ["params['b']", "params['x']"]},
         re.escape("params['x']\", which is")),
        (lambda sd: None, {"order": ["params['b']", "params['b']"]}, "both matched to params"),
        (lambda sd: None, {"names": {"bias": "params['b']"}}, "torch has 2 params but 1 names"),
        (lambda sd: sd["param_groups"][0].update(param_names=["bias", "weight"]),
         {"names": {"bias": "params['b']", "w": "params['w']"}},
         re.escape("('weight') is not a key")),
        (lambda sd: sd["state"][1].update(exp_avg=np.ones(6, np.float32)), {},
         r"torch param 1 \(params\['w'\]\): exp_avg is float32 \(6,\), expected float32 \(2, 3\)"),
        (lambda sd: sd["state"][0].update(exp_avg_sq=np.ones(2)), {},
         r"param 0 \(params\['b'\]\): exp_avg_sq is float64 \(2,\), expected float32"),
        (lambda sd: sd["state"][0].update(step=np.float32(5)), {},
         r"param 1 \(params\['w'\]\) is at step 3, param 0 \(params\['b'\]\) at step 5; adamnp"),
        (lambda sd: sd["state"].pop(0), {}, r"param 0 \(params\['b'\]\) is at step 0"),
        (lambda sd: sd["state"][0].update(max_exp_avg_sq=np.ones(2, np.float32)), {},
         "has max_exp_avg_sq, but its config has amsgrad=False"),
        (lambda sd: sd["param_groups"][0].pop("decoupled_weight_decay"), {},
         "no 'decoupled_weight_decay'"),
        (lambda sd: sd.pop("state"), {}, "not a torch state dict"),
    ],
)  # fmt: skip
def test_from_torch_names_the_mistake(change, kwargs, message):
    sd, params = _torch_sd(), _params()
    change(sd)
    before = copy.deepcopy(sd)
    with pytest.raises(ValueError, match=message):
        interop.from_torch(sd, params, backend="numpy", **kwargs)
    assert not any(a.any() for a in params.values())  # nothing changed
    assert repr(sd) == repr(before)


def test_from_torch_checks_a_given_config():
    sd = _torch_sd(weight_decay=0.1)
    with pytest.raises(ValueError, match=r"params\['b'\]\): config has weight_decay=0.01, its"):
        interop.from_torch(sd, _params(), adamnp.adamw(weight_decay=0.01), backend="numpy")
    with pytest.raises(ValueError, match="config has decoupled=False"):
        interop.from_torch(sd, _params(), adamnp.adam(weight_decay=0.1), backend="numpy")
    with pytest.raises(ValueError, match="has no max_exp_avg_sq, but its config has amsgrad"):
        interop.from_torch(_torch_sd(amsgrad=True), _params(), backend="numpy")
    state = interop.from_torch(sd, _params(), adamnp.adamw(lr=5.0, weight_decay=0.1))
    assert state.config.lr == 5.0  # lr is not compared


def test_from_torch_groups_become_labels():
    sd = _torch_sd()
    sd["param_groups"] = [
        {**sd["param_groups"][0], "params": [0], "weight_decay": 0.0},
        {**sd["param_groups"][0], "params": [1], "weight_decay": 0.1, "lr": 2e-3},
    ]
    state = interop.from_torch(sd, _params(), backend="numpy")
    assert state.labels == ("group0", "group1")
    assert state.configs["group1"].weight_decay == 0.1 and state.configs["group1"].lr == 2e-3
    out = interop.to_torch(state)
    assert [g["params"] for g in out["param_groups"]] == [[0], [1]]
    assert out["param_groups"][1]["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="torch param group 0 holds leaves with different"):
        interop.to_torch(state, param_groups=[{"params": [0, 1]}])


def test_fresh_state_exports_and_imports():
    state = adamnp.init(_params(), adamnp.adam(amsgrad=True), backend="numpy")
    sd = interop.to_torch(state)
    assert sd["state"][0]["max_exp_avg_sq"].shape == (2,)
    assert interop.from_torch(sd, _params()).step == 0
    empty = {"state": {}, "param_groups": sd["param_groups"]}  # a torch optimizer before step 1
    assert interop.from_torch(empty, _params()).step == 0


def _bnb_sd(**q):
    w = {"state1": np.full(300, 127, np.uint8), "state2": np.zeros(300, np.uint8),
         "absmax1": np.zeros(2, np.float32), "absmax2": np.zeros(2, np.float32),
         "qmap1": adamnp.dynamic_map(True), "qmap2": adamnp.dynamic_map(False), **q}  # fmt: skip
    b = {"state1": np.zeros(4, np.float32), "state2": np.zeros(4, np.float32)}
    return {"state": {0: {"step": 2, interop._BNB_WRAP: w}, 1: {"step": 2, interop._BNB_WRAP: b}},
            "param_groups": [{"params": [0, 1], "lr": 1e-3, "betas": (0.9, 0.999),
                              "eps": 1e-8, "weight_decay": 0.0}]}  # fmt: skip


def _bnb_params():
    return {"b": np.zeros(4, np.float32), "w": np.zeros(300, np.float32)}


@pytest.mark.parametrize(
    ("q", "kwargs", "message"),
    [
        ({"qmap1": adamnp.dynamic_map(False)}, {}, "qmap1 is not bitsandbytes' signed dynamic"),
        ({"qmap2": np.linspace(0, 1, 256, dtype=np.float32)}, {}, "qmap2 is not bitsandbytes'"),
        ({"absmax1": np.zeros(3, np.float32)}, {}, r"absmax1 is float32 \(3,\), expected"),
        ({"state2": np.zeros(300, np.int8)}, {}, r"state2 is int8 \(300,\), expected uint8"),
        ({}, {"min_8bit_size": 4096}, r"param 0 \(params\['w'\]\) has 8-bit state, but adamnp"),
        ({}, {"config": adamnp.adamw(amsgrad=True)}, "bitsandbytes' Adam has none"),
    ],
)
def test_from_bnb_names_the_mistake(q, kwargs, message):
    sd, params = _bnb_sd(**q), _bnb_params()
    kwargs = {"min_8bit_size": 256, **kwargs}
    with pytest.raises(ValueError, match=message):
        interop.from_bnb(sd, params, order=["params['w']", "params['b']"], backend="numpy",
                         **kwargs)  # fmt: skip
    assert not any(a.any() for a in params.values())


def test_to_bnb_refuses_what_bnb_cannot_read():
    params = {"w": np.zeros(300, np.float32)}
    sqrt = adamnp.init(params, adamnp.adamw(), state_bits=8, min_8bit_size=1, backend="numpy")
    with pytest.raises(ValueError, match=r"state_format='sqrt' with block_size=256"):
        interop.to_bnb(sqrt)
    with pytest.raises(ValueError, match=r"has 8-bit moments; torch\.optim\.Adam keeps them"):
        interop.to_torch(sqrt)
    f64 = adamnp.init({"w": np.zeros(3)}, adamnp.adamw(), backend="numpy")
    with pytest.raises(ValueError, match="is float64; bitsandbytes keeps float32"):
        interop.to_bnb(f64)


def test_import_does_not_pull_in_torch():
    import subprocess
    import sys

    code = (
        "import sys, adamnp.interop; "
        "print([m for m in ('torch', 'bitsandbytes') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- live peers: record now, compare, and continue an exported state in the peer


def _continue_in_peer(name, params, state, meta, steps=5):
    """Export ``state`` into a fresh peer optimizer over copies of ``params``; take the same
    ``steps`` in both; compare."""
    import torch

    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = TOOL.make_optimizer(name, tparams)
    how = {"order": meta["order"]} if "order" in meta else {"names": meta["names"]}
    export = interop.to_torch if meta["peer"] == "torch" else interop.to_bnb
    sd = export(state, param_groups=opt.state_dict()["param_groups"], **how)

    def tensors(x):
        if isinstance(x, dict):
            return {k: tensors(v) for k, v in x.items()}
        return torch.from_numpy(x) if isinstance(x, np.ndarray) else x

    opt.load_state_dict(tensors(sd))
    rng = np.random.default_rng(1)
    for _ in range(steps):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        for k, p in tparams.items():
            p.grad = torch.from_numpy(grads[k].copy())
        opt.step()
        adamnp.step(params, grads, state)
    worst = {}
    for i, path in enumerate(state.paths):
        leaf = path[len("params['") : -2]
        kind = "q8" if isinstance(state.slots[i], adamnp.QuantSlot) else "fp32"
        worst[leaf] = rel(params[leaf], tparams[leaf].detach().numpy())
        assert worst[leaf] <= TOL[kind], (name, leaf, worst[leaf])
    return worst


@pytest.mark.parametrize("name", [n for n in TOOL.CASES if n.startswith("torch_")])
def test_live_torch(name):
    pytest.importorskip("torch")
    params, state, meta = replay_and_compare(TOOL.run(name))
    _continue_in_peer(name, params, state, meta)


@pytest.mark.parametrize("name", [n for n in TOOL.CASES if n.startswith("bnb_")])
def test_live_bitsandbytes(name):
    pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    params, state, meta = replay_and_compare(TOOL.run(name))
    _continue_in_peer(name, params, state, meta)
