"""A shard of a leaf group rounds as the whole group does on the CUDA backend (in the
simulator): a group over the range ``[A, B)`` of another group's arena, with the other's tag
as ``hash_tag`` and ``index_base = A``, steps the pieces of the leaves it covers to exactly
the bytes the whole group's step gives them (tests/test_index_base.py for the host
backends). Small trees: the simulator runs every GPU thread as a Python thread.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from numba import cuda

import adamnp
from adamnp._state import LeafGroup
from adamnp.backends import cuda as be
from adamnp.backends.math import host_scalars

F16, F32, BF16 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)
LEAVES = (700, 1300)  # the group's arena: leaf 0 at [0, 700), leaf 1 at [700, 2000)
Q8 = dict(state_bits=8, block_size=64)
# (params dtype, param rounding, init options, arena range [A, B)): 8-bit ranges start and
# end on block boundaries of the leaves they cut.
CASES = {
    "sqrt-float32": (F32, "nearest", Q8, (128, 1340)),
    "sqrt-bfloat16-stochastic": (BF16, "stochastic", Q8, (192, 1468)),
    "bnb-float32-stochastic-v": (
        F32, "nearest", dict(Q8, state_format="bnb", v_rounding="stochastic"), (128, 1340)
    ),
    "fp32-float16-stochastic": (F16, "stochastic", {}, (333, 1500)),
}  # fmt: skip


def pieces(group, a: int, b: int) -> list:
    """``(leaf of the group, lo, hi)``: the parts of the group's leaves in arena ``[a, b)``."""
    out = []
    for j in range(len(group.leaf_ids)):
        start, stop = int(group.offsets[j]), int(group.offsets[j + 1])
        if max(a, start) < min(b, stop):
            out.append((j, max(a, start) - start, min(b, stop) - start))
    return out


def run(case: str, index_base=None) -> tuple[dict, dict]:
    """Two steps of a CUDA state, then one more of its group and of the shard over ``[A,
    B)``; returns the bytes of both on that range (params, moments or codes and absmax)."""
    dtype, rounding, init, (a, b) = CASES[case]
    rng = np.random.default_rng(5)
    # a float64 leaf first: the group under test starts at tree leaf 1 (its tag is 1)
    host = [rng.standard_normal(7), *(rng.standard_normal(n).astype(dtype) for n in LEAVES)]
    params = [cuda.to_device(x) for x in host]
    cfg = adamnp.adamw(lr=1e-2, param_rounding=rounding)
    state = adamnp.init(params, cfg, backend="cuda", min_8bit_size=1, **init)

    def grads():
        return [rng.standard_normal(x.size).astype(x.dtype) for x in host]

    for _ in range(2):
        adamnp.step(params, [cuda.to_device(g) for g in grads()], state)
    (group,) = [g for g in state.groups if g.param_dtype == dtype]
    assert group.tag == 1
    parts = pieces(group, a, b)
    sizes = [hi - lo for _, lo, hi in parts]
    block_offsets, blocks = None, None
    if group.kind == "q8":
        counts = [-(-n // group.block_size) for n in sizes]
        block_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        j, lo, _ = parts[0]
        first = int(group.block_offsets[j]) + lo // group.block_size
        blocks = slice(first, first + int(block_offsets[-1]))
    before = {name: be.to_host(buf) for name, buf in group.buffers.items()}
    buffers = {n: be.from_host(x[blocks] if n.startswith("absmax_") else x[a:b])
               for n, x in before.items()}  # fmt: skip
    shard = LeafGroup(group.kind, group.dtype, np.arange(len(parts), dtype=np.int64),
                      np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), block_offsets,
                      group.layout, buffers, group.label, group.param_dtype, hash_tag=1,
                      index_base=a if index_base is None else index_base)  # fmt: skip
    now = [p.copy_to_host() for p in params]
    g_all = grads()
    ids = [int(group.leaf_ids[j]) for j, _, _ in parts]
    cut = [cuda.to_device(now[i][lo:hi]) for i, (_, lo, hi) in zip(ids, parts)]
    cut_g = [cuda.to_device(g_all[i][lo:hi]) for i, (_, lo, hi) in zip(ids, parts)]
    scalars = host_scalars(cfg, state.step + 1, cfg.lr_at(state.step))
    be.step_group(group, params, [cuda.to_device(g) for g in g_all], scalars)
    be.step_group(shard, cut, cut_g, scalars)
    after = [params[i].copy_to_host()[lo:hi] for i, (_, lo, hi) in zip(ids, parts)]
    whole = {"params": b"".join(x.tobytes() for x in after)}
    part = {"params": b"".join(x.copy_to_host().tobytes() for x in cut)}
    for name, buf in group.buffers.items():
        x = be.to_host(buf)
        whole[name] = (x[blocks] if name.startswith("absmax_") else x[a:b]).tobytes()
        part[name] = be.to_host(shard.buffers[name]).tobytes()
    return whole, part


@pytest.mark.parametrize("case", CASES)
def test_a_shard_steps_its_range_as_the_whole_group_does(case):
    whole, part = run(case)
    for name in whole:
        assert part[name] == whole[name], name


def test_index_base_is_what_makes_it_so():
    # hashed from 0 instead of A, the same shard rounds differently: the test is not vacuous
    whole, part = run("sqrt-bfloat16-stochastic", index_base=0)
    assert part["params"] != whole["params"] and part["codes_v"] != whole["codes_v"]
