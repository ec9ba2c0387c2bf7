"""adamnp.distributed: the layout (no communication), and sharded steps, checkpoints and
errors over ranks simulated by threads (adamnp.distributed.simulate), compared bit for bit
with one process. tests/test_mpi.py runs the same under mpiexec."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

import adamnp
import adamnp.distributed as ad
from adamnp._state import Layout
from adamnp.distributed import files as dfiles
from adamnp.distributed.layout import DistLayout

bf16 = pytest.importorskip("ml_dtypes").bfloat16

# -- layout


@pytest.mark.parametrize("nranks", range(1, 9))
@pytest.mark.parametrize("bits", [32, 8])
def test_layout_owns_every_element_once_on_block_boundaries(nranks, bits):
    sizes = [0, 1, 255, 256, 257, 5000, 64, 3, 4096]
    shapes = [(n,) for n in sizes]
    dtypes = [np.float32] * 6 + [np.float64, np.float16, bf16]
    lay = Layout(bits, "sqrt", 64, 256, "stochastic", ())
    d = DistLayout([f"p{i}" for i in range(len(sizes))], shapes, dtypes, lay, None, nranks)
    owned = {i: np.zeros(n, np.int64) for i, n in enumerate(sizes)}
    eight = lay.eight_bit([f"p{i}" for i in range(len(sizes))], shapes, dtypes)
    for b in d.buckets:
        assert b.size % (nranks * 64) == 0 and b.shard * nranks == b.size  # equal shards
        assert all(start % 64 == 0 for start in b.starts)  # every leaf, 8-bit or not
        ends = [s + sizes[leaf] for leaf, s in zip(b.leaf_ids, b.starts)]
        assert all(e <= s for e, s in zip(ends, b.starts[1:]))  # leaves do not overlap
    for r in range(nranks):
        for p in d.pieces(r):
            owned[p.leaf][p.start : p.stop] += 1
            if eight[p.leaf]:  # whole blocks of the leaf, but for its last one
                assert p.start % 64 == 0 and (p.stop % 64 == 0 or p.stop == sizes[p.leaf])
    assert all((o == 1).all() for o in owned.values())
    for gi, g in enumerate(d.groups):  # each rank's part of a group: consecutive ranges
        at, blk = 0, 0
        for r in range(nranks):
            e0, e1, b0, b1 = d.arena_range(r, gi)
            if e0 == e1:
                continue
            assert e0 == at and (g.block_offsets is None or b0 == blk)
            at, blk = e1, b1
        assert at == g.offsets[-1] and (g.block_offsets is None or blk == g.block_offsets[-1])


# -- steps: sharded equals one process


def _tree(rng, shapes, dtypes):
    # multiples of 2**-10: sums over ranks are exact, whatever the order
    return {
        k: np.array(rng.integers(-512, 512, size=s) / 1024, dtypes.get(k, np.float32))
        for k, s in shapes.items()
    }


SHAPES = {"a": (1000,), "b": (7,), "c": (3, 700), "d": (5000,), "e": (0,), "f": ()}

CASES = {
    "fp32": ({}, adamnp.adamw(lr=1e-2)),
    "sqrt": ({"state_bits": 8}, adamnp.adamw(lr=1e-2)),
    "bnb": ({"state_bits": 8, "state_format": "bnb"}, adamnp.adamw(lr=1e-2)),
    "bnb-stochastic": (
        {"state_bits": 8, "state_format": "bnb", "v_rounding": "stochastic"},
        adamnp.adamw(lr=1e-2),
    ),
    "sqrt-clip-amsgrad": (
        {"state_bits": 8},
        adamnp.adam(lr=1e-2, amsgrad=True, max_grad_norm=0.5),
    ),
    "fp32-skip": ({}, adamnp.adamw(lr=1e-2, nonfinite="skip", max_grad_norm=1.0)),
}


def _run(nranks, case, backend, steps=4, seed=0, dtypes=None, labels=None):
    kw, cfg = CASES[case]
    kw = {"min_8bit_size": 1000, "block_size": 64, **kw}
    dtypes = dtypes or {}
    rng = np.random.default_rng(seed)
    p0 = _tree(rng, SHAPES, dtypes)
    grads = [[_tree(rng, SHAPES, {}) for _ in range(nranks)] for _ in range(steps)]
    if case.endswith("skip"):
        grads[1][nranks - 1]["d"][7] = np.nan  # one rank's bad gradient skips every rank
    if labels:
        cfg = {"x": cfg, "y": adamnp.adam(lr=3e-3, max_grad_norm=cfg.max_grad_norm,
                                          nonfinite=cfg.nonfinite)}  # fmt: skip

    def rank(comm):
        state = ad.init({k: v.copy() for k, v in p0.items()}, cfg, comm, backend=backend,
                        labels=labels, **kw)  # fmt: skip
        for g in grads:
            ad.step(state.params, g[comm.rank], state)
        return {k: v.copy() for k, v in state.params.items()}, ad.consolidate(state)

    out = ad.simulate(nranks, rank)
    p = {k: v.copy() for k, v in p0.items()}
    single = adamnp.init(p, cfg, backend=backend, labels=labels, **kw)
    for g in grads:
        mean = {k: np.array(sum(g[r][k] for r in range(nranks)) / np.float32(nranks), np.float32)
                for k in SHAPES}  # fmt: skip
        adamnp.step(p, mean, single)
    return out, p, single


def _assert_same_state(a, b):
    da, db = adamnp.state_dict(a), adamnp.state_dict(b)
    assert sorted(da["arrays"]) == sorted(db["arrays"])
    for key in da["arrays"]:
        assert da["arrays"][key].tobytes() == db["arrays"][key].tobytes(), key
    assert (a.step, a.skipped_steps) == (b.step, b.skipped_steps)


@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_steps_equal_one_process(nranks, case):
    out, p, single = _run(nranks, case, "numba")
    for params, _ in out:
        for k in SHAPES:
            assert params[k].tobytes() == p[k].tobytes(), k
    _assert_same_state(out[0][1], single)
    assert all(full is None for _, full in out[1:])
    if case.endswith("skip"):
        assert single.skipped_steps == 1


@pytest.mark.parametrize("nranks", [2, 3])
def test_half_params_labels_and_the_reference_backend(nranks):
    dtypes = {"a": bf16, "d": np.float16}
    labels = {"a": "x", "b": "y", "c": "x", "d": "y", "e": "x", "f": "y"}
    for backend in ("numpy", "numba"):
        out, p, single = _run(nranks, "sqrt", backend, dtypes=dtypes, labels=labels, seed=3)
        for params, _ in out:
            for k in SHAPES:
                assert params[k].tobytes() == p[k].tobytes(), (backend, k)
        _assert_same_state(out[0][1], single)


@pytest.mark.parametrize("nranks", [1, 3])
def test_float64_leaves_reduce_in_float64(nranks):
    rng = np.random.default_rng(5)
    p0 = {"x": rng.integers(-512, 512, 3000) / 1024, "y": np.ones(300, np.float32)}
    grads = [
        {"x": rng.integers(-512, 512, 3000) / 1024, "y": np.full(300, 0.25, np.float32)}
        for _ in range(nranks)
    ]
    cfg = adamnp.adam(lr=1e-3, max_grad_norm=2.0)

    def rank(comm):
        state = ad.init({k: v.copy() for k, v in p0.items()}, cfg, comm, backend="numba")
        ad.step(state.params, grads[comm.rank], state)
        return {k: v.copy() for k, v in state.params.items()}

    p = {k: v.copy() for k, v in p0.items()}
    single = adamnp.init(p, cfg, backend="numba")
    mean = {"x": sum(g["x"] for g in grads) / nranks, "y": np.full(300, 0.25, np.float32)}
    adamnp.step(p, mean, single)
    for q in ad.simulate(nranks, rank):
        assert q["x"].dtype == np.float64
        assert all(q[k].tobytes() == p[k].tobytes() for k in p)


def test_one_rank_steps_on_the_given_gradients_without_copies():
    def rank(comm):
        state = ad.init({"w": np.ones(5000, np.float32)}, adamnp.adam(), comm, backend="numpy")
        g = np.full(5000, 0.5, np.float32)
        seen = []
        be = state._be
        original = be.step_group

        def spy(group, params, grads, scalars):
            seen.append(np.shares_memory(grads[0], g))
            original(group, params, grads, scalars)

        be.step_group = spy
        try:
            ad.step(state.params, {"w": g}, state)
        finally:
            be.step_group = original
        return seen, state.grads["w"].any()

    (seen, copied), = ad.simulate(1, rank)  # fmt: skip
    assert seen == [True] and not copied


# -- errors: every rank raises, nothing changes


def _snapshot(state):
    arrays = [v.copy() for v in state.flat_params.values()]
    arrays += [b.copy() for g in state.local.groups for b in g.buffers.values()]
    return arrays, state.step


def test_a_bad_leaf_on_one_rank_raises_on_every_rank_and_changes_nothing():
    def rank(comm):
        params = {"w": np.ones(3000, np.float32), "b": np.zeros(3, np.float32)}
        state = ad.init(params, adamnp.adamw(), comm, backend="numba", state_bits=8,
                        min_8bit_size=1)  # fmt: skip
        before = _snapshot(state)
        bad = {"w": np.ones(3000, np.float32), "b": np.zeros(3, np.float32)}
        if comm.rank == 1:
            bad["b"] = np.zeros(4, np.float32)
        try:
            ad.step(state.params, bad, state)
        except ValueError as exc:
            message = str(exc)
        after = _snapshot(state)
        same = all(x.tobytes() == y.tobytes() for x, y in zip(before[0], after[0]))
        return message, same and before[1] == after[1]

    out = ad.simulate(3, rank)
    assert out[1][0] == "grads['b'] has shape (4,), expected (3,)"
    assert out[0][0] == out[2][0] == "on rank 1: grads['b'] has shape (4,), expected (3,)"
    assert all(same for _, same in out)


def test_nonfinite_raise_names_the_leaf_on_every_rank():
    def rank(comm):
        state = ad.init({"w": np.ones(3000, np.float32), "v": np.ones(10, np.float32)},
                        adamnp.adamw(), comm, backend="numpy")  # fmt: skip
        before = _snapshot(state)
        g = {"w": np.ones(3000, np.float32), "v": np.ones(10, np.float32)}
        if comm.rank == 2:
            g["w"][2999] = np.inf  # the last rank's shard of the sum holds it
        with pytest.raises(ValueError, match=r"grads\['w'\] contains NaN, Inf") as info:
            ad.step(state.params, g, state)
        after = _snapshot(state)
        return str(info.value), all(x.tobytes() == y.tobytes() for x, y in zip(before[0], after[0]))

    out = ad.simulate(3, rank)
    assert len({m for m, _ in out}) == 1 and all(same for _, same in out)


def test_params_must_be_the_state_s_own_arrays():
    def rank(comm):
        state = ad.init({"w": np.ones(100, np.float32)}, adamnp.adam(), comm, backend="numpy")
        with pytest.raises(ValueError, match=r"params\['w'\] is not the state's own parameter"):
            ad.step({"w": np.ones(100, np.float32)}, state.grads, state)
        return True

    assert ad.simulate(2, rank) == [True, True]


def test_ranks_that_disagree_on_the_tree_are_told():
    def rank(comm):
        n = 100 + comm.rank
        ad.init({"w": np.ones(n, np.float32)}, adamnp.adam(), comm, backend="numpy")

    with pytest.raises(ValueError, match="the ranks disagree on the params tree"):
        ad.simulate(2, rank)


# -- checkpoints: any number of ranks to any other


def _train(comm, steps, state=None, seed=0):
    rng = np.random.default_rng(seed + 100 * (state.step if state else 0))
    grads = [[_tree(rng, SHAPES, {}) for _ in range(comm.size)] for _ in range(steps)]
    for g in grads:
        ad.step(state.params, g[comm.rank], state)


P_CKPT = _tree(np.random.default_rng(9), SHAPES, {"a": np.float16})
KW_CKPT = {"state_bits": 8, "min_8bit_size": 1000, "block_size": 64}


def _fresh(comm):
    return ad.init({k: v.copy() for k, v in P_CKPT.items()}, adamnp.adamw(lr=1e-2), comm,
                   backend="numba", **KW_CKPT)  # fmt: skip


@pytest.mark.parametrize(("a", "b"), list(itertools.product([1, 2, 3, 4], repeat=2)))
def test_save_at_a_ranks_load_at_b_continues_bit_for_bit(tmp_path, a, b):
    folder, single_file = tmp_path / "sharded", tmp_path / "whole.npz"

    def save(comm):
        state = _fresh(comm)
        ad.step(state.params, _tree(np.random.default_rng(comm.rank), SHAPES, {}), state)
        ad.save_state(folder, state)
        ad.save_state(single_file, state, consolidated=True)
        return {k: v.copy() for k, v in state.params.items()}, ad.consolidate(state)

    saved = ad.simulate(a, save)
    params = saved[0][0]
    reference = saved[0][1]
    adamnp.load_state(single_file)  # a consolidated file is a plain checkpoint

    def load(comm, source):
        state = ad.load_state(source, params, comm, backend="numba")
        full = ad.consolidate(state)
        g = _tree(np.random.default_rng(50 + comm.rank), SHAPES, {})
        ad.step(state.params, g, state)
        return full, ad.consolidate(state), {k: v.copy() for k, v in state.params.items()}

    results = [ad.simulate(b, lambda c, s=s: load(c, s)) for s in (folder, single_file)]
    # the continuation at b ranks equals one process stepping the loaded whole state
    p = {k: v.copy() for k, v in params.items()}
    single = adamnp.load_state(single_file, backend="numba")
    g = [_tree(np.random.default_rng(50 + r), SHAPES, {}) for r in range(b)]
    mean = {k: np.array(sum(x[k] for x in g) / np.float32(b), np.float32) for k in SHAPES}
    adamnp.step(p, mean, single)
    for out in results:
        _assert_same_state(out[0][0], reference)
        _assert_same_state(out[0][1], single)
        for _, _, q in out:
            assert all(q[k].tobytes() == p[k].tobytes() for k in SHAPES)


def test_a_rank_reads_only_the_files_of_its_shard(tmp_path, monkeypatch):
    ad.simulate(4, lambda comm: ad.save_state(tmp_path, _fresh(comm)))
    index = json.loads((tmp_path / "index.json").read_text())
    read = []
    original = dfiles.load_plain

    def spy(name, **kw):
        read.append(os.path.basename(name))
        return original(name, **kw)

    monkeypatch.setattr(dfiles, "load_plain", spy)
    ad.simulate(1, lambda comm: ad.load_state(tmp_path, P_CKPT, comm, backend="numpy"))
    assert sorted(read) == sorted(f["file"] for f in index["files"] if f["file"])
    read.clear()
    lay = DistLayout(list(index["paths"]), [tuple(s) for s in index["shapes"]],
                     [np.dtype(np.float16 if d == "float16" else d) for d in index["dtypes"]],
                     adamnp.init(P_CKPT, adamnp.adamw(), backend="numpy", **KW_CKPT).layout, None,
                     8)  # fmt: skip
    ad.simulate(8, lambda comm: ad.load_state(tmp_path, P_CKPT, comm, backend="numpy"))
    assert len(read) < 8 * 4  # each of 8 ranks needs about one of the 4 files
    assert lay.nranks == 8


def test_a_tampered_index_or_shard_is_refused_on_every_rank(tmp_path):
    ad.simulate(2, lambda comm: ad.save_state(tmp_path, _fresh(comm)))
    index = json.loads((tmp_path / "index.json").read_text())

    def load(comm):
        with pytest.raises(adamnp.CheckpointError) as info:
            ad.load_state(tmp_path, P_CKPT, comm, backend="numpy")
        return str(info.value)

    for key, value in [("nranks", 3), ("version", 2), ("shapes", [[1]] * 6), ("step", -1)]:
        (tmp_path / "index.json").write_text(json.dumps({**index, key: value}))
        messages = ad.simulate(2, load)
        assert all("index.json" in m or "checkpoint" in m for m in messages), (key, messages)
    (tmp_path / "index.json").write_text(json.dumps(index))
    (tmp_path / "shard-00001-of-00002.npz").write_bytes(b"not a zip")
    assert all("shard-00001" in m for m in ad.simulate(2, load))


def test_the_command_line_consolidates_a_sharded_checkpoint(tmp_path):
    from adamnp.cli import main

    def save(comm):
        state = _fresh(comm)
        _train(comm, 2, state)
        ad.save_state(tmp_path / "ckpt", state)
        return ad.consolidate(state)

    whole = ad.simulate(3, save)[0]
    assert main(["consolidate", str(tmp_path / "ckpt"), str(tmp_path / "out.npz")]) == 0
    merged = adamnp.load_state(tmp_path / "out.npz")
    _assert_same_state(merged, whole)
    assert merged.paths == whole.paths
