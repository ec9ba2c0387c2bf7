"""A Numba state's first steps run on NumPy while its kernels compile in the background
(adamnp._background): the same bits as compiled steps, the same errors, no compile on the
calling thread, and a process that waits for the compile before it ends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import snapshot

import adamnp
from adamnp import _background, backends
from adamnp.lowbit.half import bfloat16_dtype

pytestmark = pytest.mark.skipif(not backends.available("numba"), reason="needs Numba")


@pytest.fixture
def background(monkeypatch):
    monkeypatch.setenv(_background.ENV, "1")


def _problem(case, seed=0):
    """``(params, init options, config)`` of one case."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    mlp = {"w": rng.standard_normal((64, 100)).astype(f32), "b": np.zeros(100, f32)}
    cases = {
        "f32-tree-clip": (mlp, {}, adamnp.adamw(lr=1e-2, max_grad_norm=0.5)),
        "f64-leaf": (rng.standard_normal(300), {}, adamnp.adam(lr=1e-2, weight_decay=0.1)),
        "small-leaf": (rng.standard_normal(1000).astype(f32), {}, adamnp.adamw(lr=1e-2)),
        "sqrt-amsgrad-clip": (
            mlp,
            {"state_bits": 8, "min_8bit_size": 1024},
            adamnp.adamw(lr=1e-2, amsgrad=True, max_grad_norm=1.0),
        ),
        "bnb-stochastic": (
            mlp,
            {
                "state_bits": 8,
                "min_8bit_size": 1024,
                "state_format": "bnb",
                "v_rounding": "stochastic",
            },
            adamnp.adamw(lr=1e-2),
        ),
        "bf16-stochastic": (
            {k: v.astype(bfloat16_dtype()) for k, v in mlp.items()},
            {"state_bits": 8, "min_8bit_size": 1024},
            adamnp.adamw(lr=1e-2, param_rounding="stochastic", max_grad_norm=1.0),
        ),
        "labels-skip": (
            mlp,
            {"labels": lambda path, a: "decay" if a.ndim == 2 else "none"},
            {
                "decay": adamnp.adamw(lr=1e-2, weight_decay=0.1, nonfinite="skip"),
                "none": adamnp.adamw(lr=1e-2, weight_decay=0.0, nonfinite="skip"),
            },
        ),
    }
    params, options, config = cases[case]
    return params, options, config


def _grads(params, rng, nan=False):
    def one(a):
        g = rng.standard_normal(np.shape(a)).astype(np.float32)
        if nan:
            g.reshape(-1)[0] = np.nan
        return g if isinstance(a, np.ndarray) and a.dtype == np.float32 else g.astype(a.dtype)

    if isinstance(params, dict):
        return {k: one(v) for k, v in params.items()}
    return one(params).astype(params.dtype)


def _run(case, enabled, monkeypatch, wait_after=1, steps=6):
    """Step a fresh copy of ``case`` ``steps`` times; with ``enabled``, wait for the kernels
    after step ``wait_after`` (so the steps before run on NumPy, the ones after compiled)."""
    monkeypatch.setenv(_background.ENV, "1" if enabled else "0")
    params, options, config = _problem(case)
    params = {k: v.copy() for k, v in params.items()} if isinstance(params, dict) else params
    state = adamnp.init(params, config, backend="numba", **options)
    rng = np.random.default_rng(1)
    interim_steps = 0
    for t in range(steps):
        nan = case == "labels-skip" and t == 0  # a skipped first step starts nothing
        before = _background.interim_backend(state)
        adamnp.step(params, _grads(params, rng, nan), state)
        interim_steps += before is not None
        if t + 1 == wait_after:
            assert _background.wait(state, timeout=600)
    return snapshot(params, state), interim_steps


@pytest.mark.parametrize(
    "case",
    ["f32-tree-clip", "f64-leaf", "small-leaf", "sqrt-amsgrad-clip", "bnb-stochastic",
     "bf16-stochastic", "labels-skip"],
)  # fmt: skip
def test_steps_on_numpy_meanwhile_equal_compiled_steps(case, monkeypatch):
    expected, interim = _run(case, False, monkeypatch)
    assert interim == 0
    wait_after = 2 if case == "labels-skip" else 1
    got, interim = _run(case, True, monkeypatch, wait_after=wait_after)
    assert interim == wait_after  # the steps until the kernels were ready ran on NumPy
    assert got == expected


@pytest.mark.parametrize("case", ["f32-tree-clip", "sqrt-amsgrad-clip", "small-leaf"])
def test_a_larger_state_steps_once_on_numpy_then_waits(case, monkeypatch):
    expected, _ = _run(case, False, monkeypatch)
    monkeypatch.setattr(_background, "INTERIM_MAX", 10)  # every case is larger
    monkeypatch.setattr(backends.get("numba"), "kernels_on_disk", lambda groups: False)
    got, interim = _run(case, True, monkeypatch, wait_after=None)
    assert interim == 1  # the second step waited for the kernels
    assert got == expected


def test_a_larger_state_whose_kernels_are_on_disk_loads_them_in_its_first_step(monkeypatch):
    monkeypatch.setattr(_background, "INTERIM_MAX", 10)
    monkeypatch.setattr(backends.get("numba"), "kernels_on_disk", lambda groups: True)
    _, interim = _run("f32-tree-clip", True, monkeypatch, wait_after=None)
    assert interim == 0
    monkeypatch.setattr(_background, "INTERIM_MAX", 1 << 22)  # small states: NumPy anyway
    _, interim = _run("f32-tree-clip", True, monkeypatch, wait_after=1)
    assert interim == 1


_ON_DISK = """
import numpy as np, adamnp
from adamnp import backends
be = backends.get("numba")
cases = [({"w": np.ones(100, np.float32), "b": np.ones(10, np.float32)}, {}),  # not small
         ({"w": np.ones(5000, np.float32)}, {"state_bits": 8}),
         ({"w": np.ones(5000, np.float32)}, {"state_bits": 8, "state_format": "bnb"})]
for params, options in cases:
    state = adamnp.init(params, adamnp.adamw(), backend="numba", **options)
    before = be.kernels_on_disk(state.groups)
    adamnp.step(params, {k: np.ones_like(a) for k, a in params.items()}, state)  # caches
    print(before, be.kernels_on_disk(state.groups))
"""


def test_kernels_on_disk_sees_the_cache(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), ADAMNP_BACKGROUND_COMPILE="0")
    run = subprocess.run([sys.executable, "-c", _ON_DISK], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:3] == ["False True"] * 3


def test_twins_are_small_and_take_the_states_paths():
    from adamnp import _small, _validate

    f32 = np.float32
    cases = [
        (np.zeros(100_000, f32), {}),  # one leaf over the small path's limit
        (np.zeros(1000, f32), {}),  # one small leaf
        ({"a": np.zeros((700, 1000), f32), "b": np.zeros(600_000, f32)}, {"state_bits": 8}),
        ({"a": np.zeros(5000, f32), "b": np.zeros(3, f32), "c": np.zeros(0, f32)}, {}),
    ]
    for params, options in cases:
        state = adamnp.init(params, adamnp.adamw(), backend="numba", **options)
        sizes = _background._twin_sizes(state)
        twin = _background._twin(state, sizes)
        assert sum(sizes) <= _small.SMALL_MAX + 1
        assert [g.kind for g in twin.groups] == [g.kind for g in state.groups]
        assert (_small._plan(twin) is None) == (_small._plan(state) is None)
        be = backends.get("numba")
        assert (_validate._leaf_spec(twin, be) is None) == (_validate._leaf_spec(state, be) is None)
        for g in twin.groups:
            assert all(b.size in (g.offsets[-1], g.block_offsets[-1] if g.kind == "q8" else -1)
                       for b in g.buffers.values())  # fmt: skip


def test_unwaited_steps_equal_compiled_steps(monkeypatch):
    expected, _ = _run("sqrt-amsgrad-clip", False, monkeypatch, steps=12)
    got, interim = _run("sqrt-amsgrad-clip", True, monkeypatch, wait_after=None, steps=12)
    assert interim >= 1
    assert got == expected


def test_a_checkpoint_taken_while_compiling_resumes_to_the_same_bits(monkeypatch, tmp_path):
    expected, _ = _run("sqrt-amsgrad-clip", False, monkeypatch, steps=6)
    monkeypatch.setenv(_background.ENV, "1")
    params, options, config = _problem("sqrt-amsgrad-clip")
    params = {k: v.copy() for k, v in params.items()}
    state = adamnp.init(params, config, backend="numba", **options)
    rng = np.random.default_rng(1)
    for _ in range(3):
        adamnp.step(params, _grads(params, rng), state)
    assert _background.interim_backend(state) is not None or _background.wait(state)
    adamnp.save_state(tmp_path / "s.zip", state)  # saved from NumPy steps, maybe mid-compile
    state = adamnp.load_state(tmp_path / "s.zip")  # a new state: NumPy steps again at first
    for _ in range(3):
        adamnp.step(params, _grads(params, rng), state)
    assert _background.wait(state, timeout=600)
    assert snapshot(params, state) == expected


def test_states_stepped_from_two_threads_at_once(monkeypatch):
    import threading

    cases = ("f32-tree-clip", "bnb-stochastic")
    expected = {case: _run(case, False, monkeypatch, steps=8)[0] for case in cases}
    monkeypatch.setenv(_background.ENV, "1")
    got, errors = {}, []

    def run(case):
        try:
            got[case] = _run(case, True, monkeypatch, wait_after=None, steps=8)[0]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(case,)) for case in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got == expected


def test_interim_norm_is_the_numba_norm_bit_for_bit():
    from adamnp.backends import numba as nb
    from adamnp.backends.numba import interim

    rng = np.random.default_rng(3)
    dtypes = [np.float32, np.float64, np.float16, bfloat16_dtype()]
    for _ in range(20):
        grads = [
            (rng.standard_normal(int(rng.integers(0, 70_000))) * 10.0 ** rng.uniform(-3, 3)).astype(
                dtypes[int(rng.integers(0, 4))]
            )
            for _ in range(int(rng.integers(1, 5)))
        ]
        assert interim.grad_sq_norm(grads) == nb.grad_sq_norm(grads)


@pytest.mark.parametrize("bad", ["nan", "shape", "alias"])
def test_errors_are_the_compiled_steps_and_change_nothing(bad, monkeypatch):
    messages = []
    for enabled in (False, True):
        monkeypatch.setenv(_background.ENV, "1" if enabled else "0")
        params, options, config = _problem("sqrt-amsgrad-clip")
        params = {k: v.copy() for k, v in params.items()}
        state = adamnp.init(params, config, backend="numba", **options)
        grads = _grads(params, np.random.default_rng(0))
        if bad == "nan":
            grads["b"][3] = np.inf  # an infinite norm: checked, and refused
        elif bad == "shape":
            grads["w"] = grads["w"][:10]
        else:
            grads["w"] = params["w"]
        before = snapshot(params, state)
        assert (_background.interim_backend(state) is not None) == enabled
        with pytest.raises(ValueError) as err:
            adamnp.step(params, grads, state)
        assert snapshot(params, state) == before
        messages.append(str(err.value))
    assert messages[0] == messages[1]


def test_off_large_and_non_numba_states_step_on_their_own_backend(monkeypatch, background):
    p = np.zeros(100, np.float32)
    assert _background.interim_backend(adamnp.init(p, adamnp.adam(), backend="numpy")) is None
    monkeypatch.setattr(_background, "INTERIM_MAX", 99)
    monkeypatch.setattr(_background, "WAIT_MAX", 99)
    assert _background.interim_backend(adamnp.init(p, adamnp.adam(), backend="numba")) is None
    monkeypatch.setattr(_background, "WAIT_MAX", 100)
    monkeypatch.setattr(backends.get("numba"), "kernels_on_disk", lambda groups: False)
    assert _background.interim_backend(adamnp.init(p, adamnp.adam(), backend="numba"))
    monkeypatch.setenv(_background.ENV, "0")
    assert _background.interim_backend(adamnp.init(p, adamnp.adam(), backend="numba")) is None


def test_a_thread_that_cannot_start_leaves_the_step_done(monkeypatch, background):
    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_background.threading.Thread, "start", refuse)
    p, g = np.ones(10, np.float32), np.full(10, 0.5, np.float32)
    expected = p.copy()
    adamnp.step(expected, g, adamnp.init(expected, adamnp.adam(lr=0.1), backend="numpy"))
    state = adamnp.init(p, adamnp.adam(lr=0.1), backend="numba")
    adamnp.step(p, g, state)
    assert state.step == 1 and p.tobytes() == expected.tobytes()
    assert _background.interim_backend(state) is None  # the next steps: the kernels
    assert not _background._running


_FRESH = """
import os, sys, threading
import numpy as np
from numba.core import event
import adamnp
from adamnp import _background
from adamnp.lowbit.half import bfloat16_dtype

main = threading.get_ident()
compiles = []  # the threads that compiled

class Listener(event.Listener):
    def on_start(self, ev):
        compiles.append(threading.get_ident())
    def on_end(self, ev):
        pass

event.register("numba:compile", Listener())
how, case = sys.argv[1], sys.argv[2]
f32 = np.float32
shapes, options, config = {
    "f32-tree-clip": ({"w": (100, 50), "b": (50,)}, {}, adamnp.adamw(max_grad_norm=1.0)),
    "f32-leaf": ({"w": (100_000,)}, {}, adamnp.adamw()),  # over the small path's limit
    "small-leaf": ({"w": (1000,)}, {}, adamnp.adamw()),
    # large leaves (checked in Python, not by the compiled scan), 8-bit and float32 groups
    "sqrt-large": ({"w": (700, 1000), "v": (600_000,), "b": (1000,)}, {"state_bits": 8},
                   adamnp.adamw(amsgrad=True)),
    "bf16-tree": ({"w": (100, 50), "b": (50,)}, {"state_bits": 8, "min_8bit_size": 1024},
                  adamnp.adamw(param_rounding="stochastic")),
}[case]
dtype = bfloat16_dtype() if case == "bf16-tree" else f32
p = {k: np.ones(s, dtype) for k, s in shapes.items()}
g = {k: np.full(s, 0.5, dtype) for k, s in shapes.items()}
state = adamnp.init(p, config, backend="numba", **options)
adamnp.step(p, g, state)
assert _background.interim_backend(state) is not None or _background.wait(state)
if how == "wait":
    while _background.interim_backend(state) is not None:
        adamnp.step(p, g, state)
    for _ in range(3):
        adamnp.step(p, g, state)
    print(len(compiles), compiles.count(main))
# else: the process ends while its kernels may still compile
"""


@pytest.mark.parametrize(
    "how, case",
    [("wait", "f32-tree-clip"), ("wait", "f32-leaf"), ("wait", "small-leaf"),
     ("wait", "sqrt-large"), ("wait", "bf16-tree"), ("exit", "f32-tree-clip")],
)  # fmt: skip
def test_a_fresh_process_compiles_on_the_side_and_waits_for_it_at_exit(how, case, tmp_path):
    """The twin compiles every kernel the state's steps run: none on the calling thread."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env[_background.ENV] = "1"
    script = tmp_path / "fresh.py"
    script.write_text(textwrap.dedent(_FRESH))
    run = subprocess.run([sys.executable, str(script), how, case], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    cached = list((tmp_path / "cache").rglob("*.nbc"))
    assert cached  # the compile finished (and was cached) before the process ended
    if how == "wait":
        total, on_main = map(int, run.stdout.split())
        assert total > 0 and on_main == 0
