"""States with float16 and bfloat16 leaves outside the step: checkpoints, convert_state and
the torch / bitsandbytes interop.

* Checkpoints: such states save and load (files and state_dicts, float32 and 8-bit moments),
  the header names the leaf dtypes (``"float16"``, ``"bfloat16"``; ``"<f4"``/``"<f8"`` as
  ever), a resumed run continues bit for bit (stochastic param rounding too: the step count
  keys it), ``param_rounding`` round-trips and files without it load as ``"nearest"``; a
  bad dtype tag and a bfloat16 file without ``ml_dtypes`` are named errors.
* convert_state: a half leaf's moments convert exactly as a float32 leaf's with the same
  moments do (32 -> 8 -> 32 and back).
* interop: torch's half-precision moments are upcast exactly on import and rounded to the
  param's dtype on export; bitsandbytes' float32 / 8-bit state moves exactly. With NumPy
  dicts (no torch needed), and against a live torch when it is installed.

Everything runs on backend="numpy" (the reference).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

import adamnp
from adamnp import interop
from adamnp._checkpoint import _saved_config
from adamnp._checkpoint_header import CheckpointError
from adamnp.lowbit import half

ml_dtypes = pytest.importorskip("ml_dtypes")

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
EIGHT = {
    "sqrt": dict(state_bits=8, min_8bit_size=256, block_size=256),
    "bnb": dict(state_bits=8, min_8bit_size=256, block_size=256, state_format="bnb"),
    "bnb-sr": dict(
        state_bits=8, min_8bit_size=256, block_size=256, state_format="bnb", v_rounding="stochastic"
    ),
}
LAYOUTS = {"fp32": {}, **EIGHT}


def _params(seed=0):
    """A float16 and a bfloat16 leaf big enough for 8-bit state (one ending in a partial
    block), a small bfloat16 one and a float32 one: every kind of slot."""
    rng = np.random.default_rng(seed)
    return {
        "a": rng.standard_normal(1000).astype(F16),
        "b": rng.standard_normal((3, 300)).astype(BF16),
        "c": rng.standard_normal(7).astype(BF16),
        "d": rng.standard_normal(600).astype(F32),
    }


def _grads(params, rng, half_grads=True):
    """Gradients of each leaf's dtype (or float32 for half leaves), over three decades."""
    out = {}
    for k, p in params.items():
        g = rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-3, 0, p.shape)
        out[k] = g.astype(p.dtype if half_grads else F32)
    return out


def _config(rounding="stochastic", amsgrad=False):
    return adamnp.adamw(lr=1e-2, weight_decay=0.01, amsgrad=amsgrad, param_rounding=rounding)


def _trained(steps=3, rounding="stochastic", amsgrad=False, seed=0, **layout):
    params = _params(seed)
    state = adamnp.init(params, _config(rounding, amsgrad), backend="numpy", **layout)
    rng = np.random.default_rng(seed + 1)
    for _ in range(steps):
        adamnp.step(params, _grads(params, rng), state)
    return params, state


def _state_bytes(state) -> dict:
    return {
        (gi, name): (np.asarray(b).dtype.str, np.asarray(b).tobytes())
        for gi, g in enumerate(state.groups)
        for name, b in sorted(g.buffers.items())
    }


def _tree_bytes(tree) -> dict:
    return {k: (a.dtype.name, a.tobytes()) for k, a in tree.items()}


def _copy(tree):
    return {k: a.copy() for k, a in tree.items()}


def _via_file(state):
    buf = io.BytesIO()
    adamnp.save_state(buf, state)
    return adamnp.load_state(io.BytesIO(buf.getvalue()))


def _via_dict(state):
    return adamnp.load_state_dict(adamnp.state_dict(state))


# -- checkpoints


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("via", [_via_file, _via_dict], ids=["file", "state_dict"])
def test_half_leaves_save_and_load_bit_for_bit(via, layout, amsgrad):
    if amsgrad and layout.startswith("bnb"):
        amsgrad = False  # covered by the others; keeps the grid small
    _, state = _trained(amsgrad=amsgrad, **LAYOUTS[layout])
    loaded = via(state)
    assert loaded.dtypes == state.dtypes == (F16, BF16, BF16, F32)
    assert [type(s) for s in loaded.slots] == [type(s) for s in state.slots]
    assert [g.param_dtype for g in loaded.groups] == [g.param_dtype for g in state.groups]
    assert _state_bytes(loaded) == _state_bytes(state)
    assert (loaded.step, loaded.config, loaded.layout) == (state.step, state.config, state.layout)
    if layout != "fp32":
        assert type(loaded.slots[0]).__name__ == "QuantSlot"  # an 8-bit float16 leaf
        assert type(loaded.slots[1]).__name__ == "QuantSlot"  # an 8-bit bfloat16 leaf


def test_header_names_the_leaf_dtypes():
    _, state = _trained(**EIGHT["sqrt"])
    header = adamnp.state_dict(state)["header"]
    leaves = header["leaves"]
    assert [e["dtype"] for e in leaves] == ["float16", "bfloat16", "bfloat16", F32.str]
    assert [e["slot"] for e in leaves] == ["q8", "q8", "fp32", "q8"]
    assert leaves[2]["arrays"]["m"] == {"dtype": F32.str, "shape": [7]}  # float32 moments
    assert header["config"]["param_rounding"] == "stochastic"
    json.dumps(header)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_resume_continues_bit_for_bit(tmp_path, rounding, layout):
    """Save after 3 steps, take 3 more; load, take the same 3 from the saved params: the same
    params and state, bit for bit. Stochastic rounding draws by step: a state loaded at
    another step count gives other params."""
    params, state = _trained(rounding=rounding, **LAYOUTS[layout])
    saved = _copy(params)
    path = tmp_path / "opt.npz"
    adamnp.save_state(path, state)
    rng = np.random.default_rng(7)
    grads = [_grads(params, rng, half_grads=i % 2 == 0) for i in range(3)]
    for g in grads:
        adamnp.step(params, g, state)
    resumed = adamnp.load_state(path)
    again = _copy(saved)
    for g in grads:
        adamnp.step(again, g, resumed)
    assert _tree_bytes(again) == _tree_bytes(params)
    assert _state_bytes(resumed) == _state_bytes(state)
    assert resumed.step == state.step == 6
    if rounding == "stochastic":
        shifted = adamnp.load_state(path)
        shifted.step += 1
        other = _copy(saved)
        adamnp.step(other, grads[0], shifted)
        first = _copy(saved)
        adamnp.step(first, grads[0], adamnp.load_state(path))
        assert _tree_bytes(other)["a"] != _tree_bytes(first)["a"]


def test_param_rounding_round_trips_and_old_files_load_as_nearest():
    _, state = _trained(rounding="stochastic")
    d = adamnp.state_dict(state)
    assert adamnp.load_state_dict(d).config.param_rounding == "stochastic"
    with pytest.raises(ValueError, match="param_rounding"):
        adamnp.load_state_dict(d, config=_config("nearest"))
    assert adamnp.load_state_dict(d, config=_config("stochastic")).config == state.config
    # the default is not stored: such files stay readable by adamnp before the option
    old = adamnp.state_dict(adamnp.init(_params(), _config("nearest"), backend="numpy"))
    assert "param_rounding" not in old["header"]["config"]
    assert _saved_config(old["header"]["config"])["param_rounding"] == "nearest"
    assert adamnp.load_state_dict(old).config.param_rounding == "nearest"
    with pytest.raises(ValueError, match="param_rounding"):
        adamnp.load_state_dict(old, config=_config("stochastic"))


def test_param_rounding_per_label_round_trips():
    configs = {"full": _config("nearest"), "half": _config("stochastic")}
    labels = lambda path, a: "full" if a.dtype == F32 else "half"  # noqa: E731
    params = _params()
    state = adamnp.init(params, configs, labels=labels, backend="numpy")
    adamnp.step(params, _grads(params, np.random.default_rng(0)), state)
    d = adamnp.state_dict(state)
    assert d["header"]["configs"]["half"]["param_rounding"] == "stochastic"
    assert "param_rounding" not in d["header"]["configs"]["full"]
    loaded = _via_file(state)
    assert loaded.configs == state.configs and loaded.labels == state.labels
    assert _state_bytes(loaded) == _state_bytes(state)


def test_float32_only_files_are_unchanged():
    """Leaves of float32 and float64 keep the tags every file has stored."""
    params = {"w": np.ones(3, F32), "x": np.ones(2)}
    d = adamnp.state_dict(adamnp.init(params, adamnp.adam(), backend="numpy"))
    assert [e["dtype"] for e in d["header"]["leaves"]] == [F32.str, np.dtype(np.float64).str]


def _saved_dict():
    return adamnp.state_dict(_trained(steps=1, **EIGHT["sqrt"])[1])


@pytest.mark.parametrize(
    "tag",
    ["<V2", "bf16", "Float16", "<f2", "float8", "|O", "", 5, None, ["bfloat16"]],
)
def test_bad_dtype_tag_names_the_leaf(tag):
    d = _saved_dict()
    d["header"]["leaves"][2]["dtype"] = tag
    with pytest.raises(CheckpointError, match=r"header\['leaves'\]\[2\].*params\['c'\].*dtype"):
        adamnp.load_state_dict(d)


def test_half_leaf_moments_must_be_float32():
    d = _saved_dict()
    leaf = d["header"]["leaves"][2]
    leaf["arrays"]["m"] = {"dtype": "<f2", "shape": [7]}
    d["arrays"]["leaf2/m"] = d["arrays"]["leaf2/m"].astype(np.float16)
    with pytest.raises(CheckpointError, match=r"\['arrays'\]\['m'\].*expected.*<f4"):
        adamnp.load_state_dict(d)


def test_eight_bit_slot_of_a_float64_leaf_is_still_refused():
    params = {"w": np.ones(300, np.float64)}
    d = adamnp.state_dict(adamnp.init(params, adamnp.adam(), backend="numpy"))
    d["header"]["leaves"][0].update(slot="q8")
    with pytest.raises(CheckpointError, match="float16, bfloat16 and float32 leaves only"):
        adamnp.load_state_dict(d)


def test_bfloat16_without_ml_dtypes_is_a_named_error(monkeypatch, tmp_path):
    _, state = _trained(steps=1, **EIGHT["sqrt"])
    path = tmp_path / "opt.npz"
    adamnp.save_state(path, state)
    d = adamnp.state_dict(state)
    monkeypatch.setattr(half, "bfloat16_dtype", lambda: None)
    for load, src in ((adamnp.load_state, path), (adamnp.load_state_dict, d)):
        with pytest.raises(CheckpointError, match="pip install ml_dtypes") as caught:
            load(src)
        assert "params['b']" in str(caught.value)
        assert "bfloat16" in str(caught.value)
    float16_only = {"a": np.ones(300, F16)}
    s = adamnp.init(float16_only, _config(), backend="numpy", **EIGHT["sqrt"])
    assert _via_file(s).dtypes == (F16,)  # float16 needs no ml_dtypes


# -- convert_state


def _twin(state, dtype=F32):
    """A state of float32 leaves (same tree, shapes, layout, config, step) holding the same
    full-precision moments as ``state`` (which must have them)."""
    params = {k: np.zeros(s, dtype) for k, s in zip("abcdefgh", state.shapes)}
    twin = adamnp.init(params, state.config, backend="numpy", state_bits=32)
    for mine, theirs in zip(twin.slots, state.slots):
        for x in ("m", "v", "vmax"):
            if getattr(mine, x) is not None:
                getattr(mine, x)[...] = getattr(theirs, x)
    twin.step = state.step
    return twin


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("layout", sorted(EIGHT))
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_convert_half_leaf_as_a_float32_leaf(dtype, layout, amsgrad):
    """One leaf (so that the group and its hash keys match): 32 -> 8 -> 32 of a half leaf
    gives the bytes the same conversions give a float32 leaf with the same moments."""
    rng = np.random.default_rng(3)
    params = {"a": rng.standard_normal(1000).astype(dtype)}
    state = adamnp.init(params, _config(amsgrad=amsgrad), backend="numpy")
    for _ in range(3):
        adamnp.step(params, _grads(params, rng), state)
    twin = _twin(state)
    eight = adamnp.convert_state(state, **EIGHT[layout])
    eight_twin = adamnp.convert_state(twin, **EIGHT[layout])
    assert type(eight.slots[0]).__name__ == "QuantSlot"
    assert _state_bytes(eight) == _state_bytes(eight_twin)
    back = adamnp.convert_state(eight, state_bits=32)
    back_twin = adamnp.convert_state(eight_twin, state_bits=32)
    assert _state_bytes(back) == _state_bytes(back_twin)
    assert back.dtypes == (dtype,) and back.groups[0].param_dtype == dtype
    again = adamnp.convert_state(back, **EIGHT[layout])
    assert _state_bytes(again) == _state_bytes(adamnp.convert_state(back_twin, **EIGHT[layout]))
    adamnp.step(params, _grads(params, rng), eight)  # and training goes on
    assert params["a"].dtype == dtype and eight.step == 4


def test_convert_mixed_tree_keeps_dtypes_and_copies_what_is_unchanged():
    params, state = _trained(**EIGHT["sqrt"])
    full = adamnp.convert_state(state, state_bits=32)
    assert full.dtypes == state.dtypes
    assert all(type(s).__name__ == "Fp32Slot" for s in full.slots)
    assert all(s.m.dtype == F32 for s in full.slots)
    assert _state_bytes(adamnp.convert_state(state)) == _state_bytes(state)  # same layout: a copy
    small = full.slots[2]  # full precision in both: copied
    assert small.m.tobytes() == state.slots[2].m.tobytes()
    adamnp.step(params, _grads(params, np.random.default_rng(0)), full)


# -- interop: torch with NumPy dicts


def _torch_group(n_params):
    return {"params": list(range(n_params)), "lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8,
            "weight_decay": 0.01, "amsgrad": False, "maximize": False,
            "decoupled_weight_decay": True}  # fmt: skip


def _torch_dict(moments: dict, step=4) -> dict:
    """A torch Adam state dict of leaves in ``state.paths`` order: ``{i: (m, v)}``."""
    state = {i: {"step": np.float32(step), "exp_avg": m, "exp_avg_sq": v}
             for i, (m, v) in moments.items()}  # fmt: skip
    return {"state": state, "param_groups": [_torch_group(len(moments))]}


def _half_moments(rng, shape, dtype):
    m = rng.standard_normal(shape).astype(dtype)
    v = (rng.standard_normal(shape) ** 2 * 1e-3).astype(dtype)
    return m, v


@pytest.mark.parametrize("as_float32", [False, True], ids=["param-dtype", "float32"])
def test_from_torch_upcasts_half_moments_exactly(as_float32):
    rng = np.random.default_rng(4)
    params = {"a": np.zeros(5, F16), "b": np.zeros((2, 3), BF16), "c": np.zeros(4, F32)}
    moments = {0: _half_moments(rng, 5, F16), 1: _half_moments(rng, (2, 3), BF16),
               2: _half_moments(rng, 4, F32)}  # fmt: skip
    if as_float32:
        moments = {i: (m.astype(F32), v.astype(F32)) for i, (m, v) in moments.items()}
    state = interop.from_torch(_torch_dict(moments), params, backend="numpy")
    assert state.step == 4
    for i, (m, v) in moments.items():
        slot = state.slots[i]
        assert slot.m.dtype == F32
        assert slot.m.tobytes() == m.astype(F32).tobytes()  # astype: the independent upcast
        assert slot.v.tobytes() == v.astype(F32).tobytes()


def test_from_torch_names_a_half_leaf_of_the_wrong_dtype():
    params = {"a": np.zeros(5, F16), "b": np.zeros(3, BF16)}
    good = np.zeros(5, F16), np.zeros(5, F16)
    for bad, words in (
        (np.zeros(3, np.float64), r"torch param 1 \(params\['b'\]\): exp_avg is float64 \(3,\), "
         r"expected bfloat16 or float32 \(3,\)"),
        (np.zeros(3, F16), "exp_avg is float16"),
        (np.zeros(4, BF16), r"\(4,\), expected bfloat16 or float32 \(3,\)"),
    ):  # fmt: skip
        sd = _torch_dict({0: good, 1: (bad, np.zeros(3, BF16))})
        with pytest.raises(ValueError, match=words):
            interop.from_torch(sd, params, backend="numpy")


def test_to_torch_rounds_half_moments_to_the_param_dtype():
    _, state = _trained(steps=2)
    sd = interop.to_torch(state)
    for i, dtype in enumerate(state.dtypes):
        entry = sd["state"][i]
        for key, x in (("exp_avg", "m"), ("exp_avg_sq", "v")):
            got, moment = entry[key], getattr(state.slots[i], x)
            assert got.dtype == dtype and got.shape == moment.shape
            with np.errstate(over="ignore"):
                want = moment.astype(dtype)  # NumPy's / ml_dtypes' nearest rounding
            assert got.tobytes() == want.tobytes(), (i, key)
    assert sd["state"][3]["exp_avg"].tobytes() == state.slots[3].m.tobytes()  # float32: as is
    back = interop.from_torch(sd, _params(), backend="numpy")  # the rounded moments, upcast
    for i, dtype in enumerate(state.dtypes):
        want = state.slots[i].m.astype(dtype).astype(F32)
        assert back.slots[i].m.tobytes() == want.tobytes()
    assert (
        interop.to_torch(back)["state"][1]["exp_avg"].tobytes()
        == sd["state"][1]["exp_avg"].tobytes()
    )  # representable moments: an exact round trip


def test_to_torch_still_refuses_8bit_half_leaves():
    _, state = _trained(steps=1, **EIGHT["sqrt"])
    with pytest.raises(ValueError, match=r"torch param 0 \(params\['a'\]\) has 8-bit moments"):
        interop.to_torch(state)


# -- interop: bitsandbytes with NumPy dicts


def test_bnb_round_trip_of_half_leaves_is_exact():
    """bitsandbytes keeps 8-bit codes (large params) or float32 state (small ones) whatever
    the param's dtype; both move exactly, both ways."""
    params, state = _trained(steps=2, **EIGHT["bnb"])
    sd = interop.to_bnb(state)
    q = [sd["state"][i]["__bnb_optimizer_quant_state__"] for i in range(4)]
    assert [x["state1"].dtype for x in q] == [np.uint8, np.uint8, F32, np.uint8]
    assert q[2]["state1"].tobytes() == state.slots[2].m.tobytes()
    back = interop.from_bnb(sd, params, min_8bit_size=256, backend="numpy")
    assert back.dtypes == state.dtypes
    assert [type(s) for s in back.slots] == [type(s) for s in state.slots]
    for mine, theirs in zip(back.slots, state.slots):
        for name, a in mine._asdict().items():
            if isinstance(a, np.ndarray):
                assert a.tobytes() == getattr(theirs, name).tobytes(), name


def test_from_bnb_names_8bit_state_below_min_8bit_size_for_half_leaves():
    params, state = _trained(steps=1, **EIGHT["bnb"])
    sd = interop.to_bnb(state)
    with pytest.raises(ValueError, match=r"param 0 \(params\['a'\]\) has 8-bit state.*float16"):
        interop.from_bnb(sd, params, min_8bit_size=4096, backend="numpy")


# -- interop against a live torch


def _tensor(a: np.ndarray):
    torch = pytest.importorskip("torch")
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _numpy(t) -> np.ndarray:
    torch = pytest.importorskip("torch")
    if t.dtype == torch.bfloat16:
        return t.detach().cpu().view(torch.int16).numpy().view(BF16).copy()
    return t.detach().cpu().numpy().copy()


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_live_torch_half_moments_move_as_documented(dtype):
    """torch's own half-precision state imports exactly (tensors as they come from
    ``state_dict()``, bfloat16 ones too); the export loads into torch, which keeps the
    moments we rounded."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    p = torch.nn.Parameter(_tensor(rng.standard_normal(50).astype(dtype)))
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.01)
    for _ in range(3):
        p.grad = _tensor(rng.standard_normal(50).astype(dtype))
        opt.step()
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == p.dtype  # torch keeps them in the param dtype
    params = {"w": _numpy(p)}
    state = interop.from_torch(sd, params, backend="numpy")  # tensors as they are
    for x, key in (("m", "exp_avg"), ("v", "exp_avg_sq")):
        want = sd["state"][0][key].float().numpy()
        assert getattr(state.slots[0], x).tobytes() == want.tobytes()
    adamnp.step(params, {"w": rng.standard_normal(50).astype(dtype)}, state)
    out = interop.to_torch(state, param_groups=sd["param_groups"])
    tensors = {0: {k: torch.from_numpy(np.asarray(v)) if k == "step" else _tensor(v)
                   for k, v in out["state"][0].items()}}  # fmt: skip
    opt.load_state_dict({"state": tensors, "param_groups": out["param_groups"]})
    loaded = opt.state_dict()["state"][0]
    assert loaded["exp_avg"].dtype == p.dtype
    assert _numpy(loaded["exp_avg"]).tobytes() == out["state"][0]["exp_avg"].tobytes()
    assert float(loaded["step"]) == 4
