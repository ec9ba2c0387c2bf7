"""Hypothesis property tests: invariants of step() on random trees and hyperparameters."""

from __future__ import annotations

import warnings

import numpy as np
from conftest import HOST_BACKENDS, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import adamnp

dtypes = st.sampled_from([np.float32, np.float64])
sizes = st.one_of(st.integers(0, 5), st.integers(250, 260), st.sampled_from([4095, 4096, 20000]))
leaf_specs = st.lists(st.tuples(sizes, dtypes), min_size=1, max_size=5)
configs = st.builds(
    lambda decoupled, lr, b1, b2, eps, wd, ams, maxi: (adamnp.adamw if decoupled else adamnp.adam)(
        lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, amsgrad=ams, maximize=maxi
    ),
    st.booleans(),
    st.floats(0, 1.0),
    st.floats(0, 0.99),
    st.floats(0, 0.9999),
    st.floats(0, 1e-3),
    st.floats(0, 0.5),
    st.booleans(),
    st.booleans(),
)


def build(specs, seed):
    rng = np.random.default_rng(seed)
    params = {f"p{i}": rng.standard_normal(n).astype(d) for i, (n, d) in enumerate(specs)}
    grads = {k: rng.standard_normal(a.shape).astype(a.dtype) for k, a in params.items()}
    return params, grads


@settings(max_examples=40, deadline=None)
@given(leaf_specs, configs, st.sampled_from(HOST_BACKENDS), st.integers(1, 3), st.integers(0, 99))
def test_step_preserves_structure_and_counts(specs, cfg, backend, n_steps, seed):
    params, grads = build(specs, seed)
    ids = {k: id(a) for k, a in params.items()}
    state = adamnp.init(params, cfg, backend=backend)
    for _ in range(n_steps):
        adamnp.step(params, grads, state)
    assert state.step == n_steps and state.skipped_steps == 0
    for (n, d), (k, a) in zip(specs, sorted(params.items(), key=lambda kv: int(kv[0][1:]))):
        assert id(a) == ids[k] and a.dtype == d and a.shape == (n,)
    for slot, dtype in zip(state.slots, state.dtypes):
        assert slot.m.dtype == dtype and slot.v.dtype == dtype
        assert np.all(slot.v >= 0)
    # with finite data everything stays finite (eps = 0 and v = 0 can give 0/0 only if m = 0)
    if cfg.eps > 0:
        assert all(np.isfinite(a).all() for a in params.values())


@settings(max_examples=30, deadline=None)
@given(leaf_specs, configs, st.sampled_from(HOST_BACKENDS), st.integers(0, 99))
def test_zero_lr_touches_only_moments(specs, cfg, backend, seed):
    params, grads = build(specs, seed)
    cfg = (adamnp.adamw if cfg.decoupled else adamnp.adam)(
        lr=0.0, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    before = {k: a.copy() for k, a in params.items()}
    state = adamnp.init(params, cfg, backend=backend)
    adamnp.step(params, grads, state)
    # AdamW decays by 1 - 0 * wd = 1 exactly; Adam's L2 term only enters g and the moments.
    for k in params:
        assert params[k].tobytes() == before[k].tobytes()
    assert state.step == 1


@settings(max_examples=30, deadline=None)
@given(
    leaf_specs,
    st.sampled_from(HOST_BACKENDS),
    st.integers(0, 99),
    st.sampled_from(["shape", "dtype", "nan", "alias"]),
)
def test_bad_input_never_mutates(specs, backend, seed, problem):
    params, grads = build(specs, seed)
    state = adamnp.init(params, adamnp.adamw(), backend=backend)
    adamnp.step(params, grads, state)
    key = "p0"
    if problem == "shape":
        grads[key] = np.zeros(params[key].size + 1, params[key].dtype)
    elif problem == "dtype":
        other = np.float64 if params[key].dtype == np.float32 else np.float32
        grads[key] = grads[key].astype(other)
    elif problem == "nan":
        if grads[key].size == 0:
            return
        grads[key] = grads[key].copy()
        grads[key][-1] = np.nan
    else:
        if params[key].size == 0:
            return
        grads[key] = params[key]
    before = snapshot(params, state)
    try:
        adamnp.step(params, grads, state)
    except (ValueError, TypeError):
        pass
    else:
        raise AssertionError("bad input was accepted")
    assert snapshot(params, state) == before


layouts = st.fixed_dictionaries(
    {
        "state_bits": st.sampled_from([32, 8]),
        "block_size": st.sampled_from([64, 256, 4096]),
        "min_8bit_size": st.sampled_from([0, 1, 4, 255, 4096, 5000]),
        "format": st.sampled_from([("sqrt", None), ("bnb", "nearest"), ("bnb", "stochastic")]),
    }
)


@settings(max_examples=40, deadline=None)
@given(leaf_specs, layouts, st.lists(st.booleans(), min_size=5, max_size=5), st.integers(0, 99))
def test_checkpoint_keeps_the_layout(tmp_path_factory, specs, options, keep, seed):
    """A checkpoint restores the layout; one without min_8bit_size / keep_fp32 (older files)
    gets a layout that gives the same slots."""
    import json

    params, grads = build(specs, seed)
    kept = [f"params[{name!r}]" for name, k in zip(sorted(params), keep) if k]
    with warnings.catch_warnings():  # layouts where no leaf is 8-bit warn; fine here
        warnings.simplefilter("ignore", UserWarning)
        options = dict(options)
        options["state_format"], options["v_rounding"] = options.pop("format")
        state = adamnp.init(params, adamnp.adamw(), backend="numpy", keep_fp32=kept, **options)
    adamnp.step(params, grads, state)
    path = tmp_path_factory.mktemp("ckpt") / "s.npz"
    adamnp.save_state(path, state)
    loaded = adamnp.load_state(path)
    assert loaded.layout == state.layout
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(str(arrays["__adamnp__"][()]))
    del header["min_8bit_size"], header["keep_fp32"]
    arrays["__adamnp__"] = np.array(json.dumps(header))
    np.savez(path, **arrays)
    old = adamnp.load_state(path)
    kinds = [type(s) for s in state.slots]
    assert [type(s) for s in old.slots] == kinds
    assert old.layout.eight_bit(old.paths, old.shapes, old.dtypes) == [
        k is adamnp.QuantSlot for k in kinds
    ]
    assert snapshot(params, old) == snapshot(params, state)
