"""Per-leaf hyperparameters (``init(params, {label: config}, labels=...)``) and live changes
(``adamnp.configure``).

The element math of a leaf does not depend on which other leaves share its launch, so a
labelled float32 state must step every leaf bit for bit as a single-config state with that
leaf's config does; the global options (``max_grad_norm``, ``nonfinite``) act on all leaves
together. Parity with torch's param groups is in test_torch_parity.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HOST_BACKENDS

import adamnp

F32 = np.float32


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((40, 30)).astype(F32),
        "b": rng.standard_normal(30).astype(F32),
        "head": rng.standard_normal((30, 5)).astype(F32),
    }


def _grads(params, rng, scale=1.0):
    return {k: (scale * rng.standard_normal(a.shape)).astype(a.dtype) for k, a in params.items()}


def _vector_label(path, a):
    return "no_decay" if a.ndim == 1 else "decay"


CONFIGS = {
    "decay": adamnp.adamw(lr=1e-2, weight_decay=0.1),
    "no_decay": adamnp.adamw(lr=3e-2, betas=(0.8, 0.99), weight_decay=0.0),
}


def _run(params, config, grads_seq, backend, **kw):
    params = {k: a.copy() for k, a in params.items()}
    state = adamnp.init(params, config, backend=backend, **kw)
    for g in grads_seq:
        adamnp.step(params, g, state)
    return params, state


def test_each_label_steps_as_its_own_config(backend):
    params = _params()
    rng = np.random.default_rng(1)
    seq = [_grads(params, rng) for _ in range(20)]
    got, state = _run(params, CONFIGS, seq, backend, labels=_vector_label)
    assert state.labels == ("no_decay", "decay", "decay")  # paths sorted: b, head, w
    for label, cfg in CONFIGS.items():
        want, _ = _run(params, cfg, seq, backend)
        for k in params:
            if _vector_label(k, params[k]) == label:
                assert got[k].tobytes() == want[k].tobytes(), (label, k)


def test_labels_as_a_tree():
    params = _params()
    tree = {"w": "decay", "b": "no_decay", "head": "no_decay"}
    state = adamnp.init(params, CONFIGS, labels=tree, backend="numpy")
    assert state.labels == ("no_decay", "no_decay", "decay")
    assert sorted(g.label for g in state.groups) == ["decay", "no_decay"]


def test_one_label_equals_a_single_config(backend):
    params = _params()
    rng = np.random.default_rng(2)
    seq = [_grads(params, rng, 10.0) for _ in range(10)]
    cfg = adamnp.adam(lr=1e-2, weight_decay=0.05, amsgrad=True, max_grad_norm=1.0)
    got, state = _run(params, {"all": cfg}, seq, backend, labels=lambda p, a: "all")
    want, ref = _run(params, cfg, seq, backend)
    for k in params:
        assert got[k].tobytes() == want[k].tobytes(), k
    for s1, s2 in zip(state.slots, ref.slots):
        assert s1.m.tobytes() == s2.m.tobytes() and s1.vmax.tobytes() == s2.vmax.tobytes()


def test_clipping_uses_the_global_norm():
    # Two labels with the same config equal one config: the norm is over all leaves (torch's
    # clip_grad_norm_ over all parameters), not per label.
    params = _params()
    rng = np.random.default_rng(3)
    seq = [_grads(params, rng, 5.0) for _ in range(5)]
    cfg = adamnp.adamw(lr=1e-2, max_grad_norm=0.5)
    got, _ = _run(params, {"a": cfg, "b": cfg}, seq, "numpy", labels=_ab)
    want, _ = _run(params, cfg, seq, "numpy")
    per_label = {}
    for label in "ab":
        sub = {k: a for k, a in params.items() if _ab(k, a) == label}
        out, _ = _run(sub, cfg, [{k: g[k] for k in sub} for g in seq], "numpy")
        per_label.update(out)
    for k in params:
        assert got[k].tobytes() == want[k].tobytes(), k
    assert any(got[k].tobytes() != per_label[k].tobytes() for k in params)  # clipped apart


def _ab(path, a):
    return "a" if a.ndim == 1 else "b"


def test_amsgrad_and_schedule_per_label():
    params = _params()
    sched = adamnp.schedules.warmup_cosine(peak=1e-2, warmup_steps=3, decay_steps=10)
    configs = {"decay": adamnp.adamw(lr=sched, amsgrad=True), "no_decay": adamnp.adam(lr=1e-3)}
    rng = np.random.default_rng(4)
    seq = [_grads(params, rng) for _ in range(8)]
    got, state = _run(params, configs, seq, "numpy", labels=_vector_label)
    for slot, label in zip(state.slots, state.labels):
        assert (slot.vmax is not None) == (label == "decay")
    for label, cfg in configs.items():
        want, _ = _run(params, cfg, seq, "numpy")
        for k in params:
            if _vector_label(k, params[k]) == label:
                assert got[k].tobytes() == want[k].tobytes(), k


@pytest.mark.skipif("numba" not in HOST_BACKENDS, reason="needs numba")
@pytest.mark.parametrize("fmt", ["sqrt", "bnb"])
def test_eight_bit_labels_agree_across_backends(fmt):
    params = {"w": np.random.default_rng(5).standard_normal(5000).astype(F32),
              "v": np.random.default_rng(6).standard_normal(4100).astype(F32)}  # fmt: skip
    labels = {"w": "decay", "v": "no_decay"}
    rng = np.random.default_rng(7)
    seq = [_grads(params, rng) for _ in range(4)]
    kw = dict(labels=labels, state_bits=8, state_format=fmt, v_rounding="stochastic")
    a, sa = _run(params, CONFIGS, seq, "numpy", **kw)
    b, sb = _run(params, CONFIGS, seq, "numba", **kw)
    for k in params:
        assert a[k].tobytes() == b[k].tobytes(), k
    for ga, gb in zip(sa.groups, sb.groups):
        assert ga.label == gb.label
        for name, buf in ga.buffers.items():
            assert buf.tobytes() == gb.buffers[name].tobytes(), (ga.label, name)


# -- errors: named, and nothing built


@pytest.mark.parametrize(
    ("config", "labels", "error", "match"),
    [
        (CONFIGS, None, TypeError, "labels= must say"),
        (adamnp.adam(), _vector_label, ValueError, "single config"),
        ({}, _vector_label, ValueError, "empty mapping"),
        ({"a": adamnp.adam(), 1: adamnp.adam()}, _vector_label, TypeError, "must be str"),
        ({"a": {"lr": 1}}, _vector_label, TypeError, r"config\['a'\] must be an AdamConfig"),
        (CONFIGS, lambda p, a: "other", ValueError, r"params\['b'\] has label 'other'"),
        (CONFIGS, lambda p, a: 3, TypeError, "returned int, not a str"),
        (CONFIGS, {"w": "decay", "b": "decay"}, ValueError, "missing key 'head'"),
        ({"a": adamnp.adam(max_grad_norm=1.0), "b": adamnp.adam()}, _ab, ValueError,
         "max_grad_norm applies to the whole step"),
        ({"a": adamnp.adam(nonfinite="skip"), "b": adamnp.adam()}, _ab, ValueError,
         "nonfinite applies to the whole step"),
    ],
)  # fmt: skip
def test_bad_labels_are_named(config, labels, error, match):
    with pytest.raises(error, match=match):
        adamnp.init(_params(), config, labels=labels, backend="numpy")


# -- live changes


def test_configure_changes_the_next_steps(backend):
    # Changing lr and weight decay after 5 steps equals a schedule that switches at step 5.
    params = _params()
    rng = np.random.default_rng(8)
    seq = [_grads(params, rng) for _ in range(10)]
    live = {k: a.copy() for k, a in params.items()}
    state = adamnp.init(live, adamnp.adamw(lr=1e-2, weight_decay=0.1), backend=backend)
    for t, g in enumerate(seq):
        if t == 5:
            adamnp.configure(state, lr=1e-3)
        adamnp.step(live, g, state)
    sched = adamnp.adamw(lr=lambda count: 1e-2 if count < 5 else 1e-3, weight_decay=0.1)
    want, _ = _run(params, sched, seq, backend)
    for k in params:
        assert live[k].tobytes() == want[k].tobytes(), k
    assert state.config.lr == 1e-3


def test_configure_one_label():
    params = _params()
    state = adamnp.init(params, CONFIGS, labels=_vector_label, backend="numpy")
    adamnp.configure(state, "no_decay", lr=5e-4, betas=(0.5, 0.9))
    assert state.configs["no_decay"].lr == 5e-4 and state.configs["no_decay"].betas == (0.5, 0.9)
    assert state.configs["decay"] == CONFIGS["decay"]
    adamnp.configure(state, max_grad_norm=2.0)  # every label
    assert all(c.max_grad_norm == 2.0 for c in state.configs.values())
    assert state.config.max_grad_norm == 2.0


@pytest.mark.parametrize(
    ("label", "changes", "error", "match"),
    [
        (None, {"lr": -1.0}, ValueError, "lr must be >= 0"),
        (None, {"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be in"),
        (None, {"learning_rate": 1e-3}, TypeError, "unknown option 'learning_rate'"),
        (None, {"amsgrad": True}, ValueError, "amsgrad cannot change"),
        ("decay", {"max_grad_norm": 1.0}, ValueError, "max_grad_norm applies to the whole"),
        ("nope", {"lr": 1.0}, ValueError, "label 'nope' is not one of"),
    ],
)
def test_configure_refuses_and_changes_nothing(label, changes, error, match):
    state = adamnp.init(_params(), CONFIGS, labels=_vector_label, backend="numpy")
    before = (dict(state.configs), state.config)
    with pytest.raises(error, match=match):
        adamnp.configure(state, label, **changes)
    assert (dict(state.configs), state.config) == before


def test_configure_single_config_takes_no_label():
    state = adamnp.init(_params(), adamnp.adam(), backend="numpy")
    with pytest.raises(ValueError, match="single config"):
        adamnp.configure(state, "decay", lr=1.0)
    with pytest.raises(TypeError, match="must be an AdamState"):
        adamnp.configure({"config": 1}, lr=1.0)


# -- checkpoints keep labels and configs


def _labelled_state(backend="numpy", **kw):
    params = _params()
    configs = dict(CONFIGS, decay=adamnp.adamw(lr=1e-2, weight_decay=0.1, amsgrad=True))
    state = adamnp.init(params, configs, labels=_vector_label, backend=backend, **kw)
    rng = np.random.default_rng(9)
    for _ in range(3):
        adamnp.step(params, _grads(params, rng), state)
    return params, state


@pytest.mark.parametrize("state_bits", [32, 8])
def test_checkpoint_keeps_labels_and_continues_bit_for_bit(backend, tmp_path, state_bits):
    params, state = _labelled_state(backend, state_bits=state_bits, min_8bit_size=1)
    path = tmp_path / "opt.npz"
    adamnp.save_state(path, state)
    for loaded in (adamnp.load_state(path), adamnp.load_state_dict(adamnp.state_dict(state))):
        assert loaded.labels == state.labels and loaded.configs == state.configs
        assert [g.label for g in loaded.groups] == [g.label for g in state.groups]
        p1 = {k: a.copy() for k, a in params.items()}
        p2 = {k: a.copy() for k, a in params.items()}
        g = _grads(params, np.random.default_rng(10))
        copy = adamnp.load_state(path)
        adamnp.step(p1, g, copy)
        adamnp.step(p2, g, loaded)
        for k in params:
            assert p1[k].tobytes() == p2[k].tobytes(), k


def test_checkpoint_configure_is_recorded(tmp_path):
    _, state = _labelled_state()
    adamnp.configure(state, "no_decay", lr=7e-4)
    adamnp.save_state(tmp_path / "c.npz", state)
    assert adamnp.load_state(tmp_path / "c.npz").configs["no_decay"].lr == 7e-4


def test_checkpoint_labels_with_a_schedule_need_the_mapping(tmp_path):
    params = _params()
    sched = adamnp.schedules.warmup_cosine(peak=1e-2, warmup_steps=3, decay_steps=10)
    configs = {"decay": adamnp.adamw(lr=sched), "no_decay": adamnp.adamw(lr=1e-3)}
    state = adamnp.init(params, configs, labels=_vector_label, backend="numpy")
    path = tmp_path / "s.npz"
    adamnp.save_state(path, state)
    with pytest.raises(ValueError, match="lr schedule in some label"):
        adamnp.load_state(path)
    with pytest.raises(TypeError, match="pass config as a mapping"):
        adamnp.load_state(path, config=configs["decay"])
    with pytest.raises(ValueError, match=r"config\['no_decay'\].weight_decay"):
        adamnp.load_state(path, config=dict(configs, no_decay=adamnp.adamw(weight_decay=0.3)))
    with pytest.raises(ValueError, match="has labels"):
        adamnp.load_state(path, config={"decay": configs["decay"]})
    loaded = adamnp.load_state(path, config=configs)
    assert loaded.configs["decay"].lr is sched


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda h: h.pop("labels"), "__adamnp__"),
        (lambda h: h.update(labels=["decay"]), "header['labels']"),
        (lambda h: h["labels"].__setitem__(0, "other"), "header['labels'][0]"),
        (lambda h: h.update(configs={}), "header['configs']"),
        (lambda h: h["configs"]["decay"].update(max_grad_norm=1.0), "header['configs']"),
        (lambda h: h["configs"]["decay"].update(betas=[0.9, 2.0]), "header['configs']['decay']"),
        (lambda h: h["configs"]["decay"].update(amsgrad=False), "header['leaves'][1]"),
    ],
)
def test_tampered_labels_are_refused(edit, key):
    _, state = _labelled_state()
    d = adamnp.state_dict(state)
    edit(d["header"])
    with pytest.raises(adamnp.CheckpointError) as info:
        adamnp.load_state_dict(d)
    assert key in str(info.value)


def test_single_config_checkpoint_refuses_a_mapping(tmp_path):
    state = adamnp.init(_params(), adamnp.adam(), backend="numpy")
    adamnp.save_state(tmp_path / "one.npz", state)
    with pytest.raises(TypeError, match="single config"):
        adamnp.load_state(tmp_path / "one.npz", config={"a": adamnp.adam()})
    assert adamnp.load_state(tmp_path / "one.npz").labels is None
