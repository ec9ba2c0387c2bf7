"""Batches claimed by running threads (adamnp.backends.numba.schedule): the same bits at any
number of threads and batch size, and no wait for a helper that never starts."""

from __future__ import annotations

import numba
import numpy as np
import pytest

import adamnp
from adamnp import backends

if not backends.available("numba"):
    pytest.skip("the numba backend is not available", allow_module_level=True)

from adamnp.backends import numba as numba_cpu
from adamnp.backends.numba import schedule

LAYOUTS = {
    "float32": dict(),
    "sqrt 8-bit": dict(state_bits=8, min_8bit_size=1),
    "bnb 8-bit stochastic": dict(
        state_bits=8, min_8bit_size=1, state_format="bnb", v_rounding="stochastic"
    ),
}


def _run(layout, threads, config):
    rng = np.random.default_rng(7)
    params = {f"l{i}": rng.standard_normal(n).astype(np.float32) for i, n in
              enumerate((70_001, 3, 40_000, 131_072, 5))}  # fmt: skip
    state = adamnp.init(params, config, backend="numba", **LAYOUTS[layout])
    numba.set_num_threads(threads)
    try:
        for k in range(3):
            grads = {name: rng.standard_normal(a.shape).astype(np.float32) * 10.0**-k
                     for name, a in params.items()}  # fmt: skip
            adamnp.step(params, grads, state)
        norm = numba_cpu.grad_sq_norm(list(grads.values()))
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    buffers = [b.tobytes() for g in state.groups for b in g.buffers.values()]
    return [a.tobytes() for a in params.values()], buffers, norm.hex()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("clip", [None, 1.0])
def test_batches_and_threads_do_not_change_the_bits(monkeypatch, layout, clip):
    config = adamnp.adamw(max_grad_norm=clip)
    whole = _run(layout, 1, config)  # one batch per call
    monkeypatch.setattr(schedule, "BATCH_ELEMENTS", 1 << 15)  # many batches
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN", 1)
    schedule._BOUNDS.clear()
    for threads in {1, 2, numba.config.NUMBA_NUM_THREADS}:
        assert _run(layout, threads, config)[:2] == whole[:2]
    # the norm sums batch by batch: the same at every thread count, maybe not the last bit
    # of one whole-table sum
    assert len({_run(layout, t, config)[2] for t in (1, 2)}) == 1


def test_a_helper_that_never_starts_is_not_waited_for(monkeypatch):
    """The calling thread claims every batch itself when no helper picks the job up."""
    monkeypatch.setattr(schedule, "BATCH_ELEMENTS", 1 << 15)
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN", 1)
    schedule._BOUNDS.clear()
    expected = _run("float32", 1, adamnp.adamw())

    class Lost:
        def put(self, job):  # the job never reaches a helper
            pass

    monkeypatch.setattr(schedule, "_jobs", Lost())
    assert _run("float32", 2, adamnp.adamw()) == expected


def test_batch_bounds_cover_the_table_once():
    rng = np.random.default_rng(3)
    for _ in range(50):
        sizes = rng.integers(1, 1 << 18, rng.integers(1, 40))
        table = numba_cpu.chunk_table(sizes, numba_cpu.CHUNK)
        bounds = schedule.batch_bounds(table)
        assert bounds[0] == 0 and bounds[-1] == len(table)
        assert np.all(np.diff(bounds) > 0)
        work = np.add.reduceat(table[:, 2] - table[:, 1], bounds[:-1])
        full = -(-int(sizes.sum()) // schedule.BATCH_ELEMENTS)  # the last may be merged
        assert len(work) in (full - 1, full) or (full == 1 and len(work) == 1)
        assert np.all(work < schedule.BATCH_ELEMENTS + numba_cpu.CHUNK)


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_bad_gradient_in_any_batch_stops_a_many_batch_step_before_any_write(where):
    # a one-group float32 state of several batches: a check-only call of the step kernel over
    # every batch, then the update (one call checks and updates only a single-batch table)
    params = {"a": np.ones(600_000, np.float32), "b": np.ones(700_001, np.float32)}
    assert len(schedule.batch_bounds(numba_cpu._group_table(
        adamnp.init(params, adamnp.adam(), backend="numba").groups[0]))) > 3  # fmt: skip
    for policy in ("raise", "skip"):
        state = adamnp.init(params, adamnp.adam(nonfinite=policy), backend="numba")
        grads = {k: np.full(a.shape, 0.5, np.float32) for k, a in params.items()}
        grads["a" if where == "first" else "b"][1 if where == "first" else -1] = np.inf
        before = [a.copy() for a in params.values()]
        if policy == "raise":
            leaf = "a" if where == "first" else "b"
            with pytest.raises(ValueError, match=rf"grads\['{leaf}'\] contains NaN, Inf"):
                adamnp.step(params, grads, state)
        else:
            adamnp.step(params, grads, state)
            assert state.skipped_steps == 1
        assert all(a.tobytes() == b.tobytes() for a, b in zip(params.values(), before))
        assert state.step == 0 and not state.groups[0].buffers["m"].any()
