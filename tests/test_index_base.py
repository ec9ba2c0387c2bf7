"""A shard of a leaf group rounds as the whole group does.

Stochastic rounding (the ``"sqrt"`` 8-bit format, ``"bnb"`` with ``v_rounding="stochastic"``,
half-precision params with ``param_rounding="stochastic"``) hashes element ``e`` of a group's
arena as ``index_base + e`` under the key of the group's ``tag``. So a group whose arena is
the range ``[A, B)`` of another group's arena, with the other's tag as ``hash_tag`` and
``index_base = A``, stepping the pieces of the leaves that range covers, must produce exactly
the bytes the whole group's step produces there: params, moments or codes and absmax. This
is what a shard of a distributed (ZeRO-1) state relies on.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import adamnp
from adamnp import backends
from adamnp._state import LeafGroup
from adamnp.backends.math import host_scalars

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
LEAVES = (1000, 3000)  # the group's arena: leaf 0 at [0, 1000), leaf 1 at [1000, 4000)


def make_tree(dtype, rng) -> list:
    """A float64 leaf first (a group of its own), so the group under test starts at tree
    leaf 1: its tag is 1, and a shard listing its pieces as leaves 0, 1 must carry it."""
    return [rng.standard_normal(7), *(rng.standard_normal(n).astype(dtype) for n in LEAVES)]


def grads_like(tree, rng) -> list:
    return [rng.standard_normal(a.size).astype(a.dtype) for a in tree]


def pieces(group, a: int, b: int) -> list:
    """``(leaf of the group, lo, hi)``: the parts of the group's leaves in arena ``[a, b)``."""
    out = []
    for j in range(len(group.leaf_ids)):
        start, stop = int(group.offsets[j]), int(group.offsets[j + 1])
        lo, hi = max(a, start), min(b, stop)
        if lo < hi:
            out.append((j, lo - start, hi - start))
    return out


def shard_of(group, params, grads, a, b, *, index_base, hash_tag, be):
    """``(shard, params, grads)``: a group over arena ``[a, b)`` of ``group`` with copies of
    its buffers there, and copies of the pieces of the leaves (the shard's leaves 0, 1, ...)."""
    parts = pieces(group, a, b)
    sizes = [hi - lo for _, lo, hi in parts]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    host = {name: be.to_host(buf) for name, buf in group.buffers.items()}
    buffers = {}
    block_offsets = None
    if group.kind == "q8":
        bs = group.block_size
        for j, lo, hi in parts:  # whole blocks of each leaf
            assert lo % bs == 0 and (hi % bs == 0 or hi == np.diff(group.offsets)[j])
        counts = [-(-n // bs) for n in sizes]
        block_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        j, lo, _ = parts[0]
        first = int(group.block_offsets[j]) + lo // bs
        blocks = slice(first, first + int(block_offsets[-1]))
    for name, buf in host.items():
        buffers[name] = be.from_host(buf[blocks] if name.startswith("absmax_") else buf[a:b])
    leaves = [params[group.leaf_ids[j]] for j, _, _ in parts]
    shard = LeafGroup(group.kind, group.dtype, np.arange(len(parts), dtype=np.int64), offsets,
                      block_offsets, group.layout, buffers, group.label, group.param_dtype,
                      hash_tag=hash_tag, index_base=index_base)  # fmt: skip
    cut = [p[lo:hi].copy() for p, (_, lo, hi) in zip(leaves, parts)]
    cut_g = [grads[group.leaf_ids[j]][lo:hi].copy() for j, lo, hi in parts]
    return shard, cut, cut_g


def whole_and_shard(backend, dtype, cfg, a, b, *, index_base=None, hash_tag=None, **init):
    """Run three steps of the whole state, then one more of its group and of the shard over
    ``[a, b)`` (by default with the group's tag and ``index_base = a``); return ``(bytes of
    the whole group's step on [a, b), bytes of the shard's step)``."""
    rng = np.random.default_rng(7)
    params = make_tree(dtype, rng)
    state = adamnp.init(params, cfg, backend=backend, min_8bit_size=1, **init)
    for _ in range(3):
        adamnp.step(params, grads_like(params, rng), state)
    (group,) = [g for g in state.groups if g.param_dtype == dtype]
    assert group.tag == 1 and group.index_base == 0
    be = backends.get(backend)
    grads = grads_like(params, rng)
    shard, cut, cut_g = shard_of(group, params, grads, a, b, be=be,
                                 index_base=a if index_base is None else index_base,
                                 hash_tag=group.tag if hash_tag is None else hash_tag)  # fmt: skip
    scalars = host_scalars(cfg, state.step + 1, cfg.lr_at(state.step))
    be.step_group(group, params, grads, scalars)
    be.step_group(shard, cut, cut_g, scalars)
    part = {"params": b"".join(p.tobytes() for p in cut)}
    part.update({name: be.to_host(buf).tobytes() for name, buf in shard.buffers.items()})
    parts = pieces(group, a, b)
    whole = {"params": b"".join(params[group.leaf_ids[j]][lo:hi].tobytes() for j, lo, hi in parts)}
    for name, buf in group.buffers.items():
        host = be.to_host(buf)
        if name.startswith("absmax_"):
            j, lo, _ = parts[0]
            first = int(group.block_offsets[j]) + lo // group.block_size
            whole[name] = host[first : first + shard.buffers[name].size].tobytes()
        else:
            whole[name] = host[a:b].tobytes()
    return whole, part


STOCHASTIC = functools.partial(adamnp.adamw, lr=1e-2, param_rounding="stochastic")
# (params dtype, config, init options, arena range [A, B)): 8-bit ranges start and end on
# block boundaries of the leaves they cut (leaf 1 starts at 1000); float32 moments may be
# cut anywhere.
CASES = {
    "fp32-float32": (F32, adamnp.adamw(lr=1e-2), {}, (333, 2500)),
    "fp32-float16-stochastic": (F16, STOCHASTIC(), {}, (333, 2500)),
    "fp32-bfloat16-stochastic-amsgrad": (BF16, STOCHASTIC(amsgrad=True), {}, (512, 4000)),
    "sqrt-float32-bs256": (F32, adamnp.adamw(lr=1e-2), dict(state_bits=8), (512, 2024)),
    "sqrt-bfloat16-stochastic-bs64": (
        BF16, STOCHASTIC(), dict(state_bits=8, block_size=64), (640, 2280)
    ),
    "bnb-float32-stochastic-v-amsgrad": (
        F32, adamnp.adamw(lr=1e-2, amsgrad=True),
        dict(state_bits=8, state_format="bnb", v_rounding="stochastic"), (512, 2024),
    ),
    "bnb-float16-stochastic-bs64": (
        F16, STOCHASTIC(),
        dict(state_bits=8, block_size=64, state_format="bnb", v_rounding="stochastic"),
        (128, 1640),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_shard_steps_its_range_as_the_whole_group_does(backend, case):
    dtype, cfg, init, (a, b) = CASES[case]
    whole, part = whole_and_shard(backend, dtype, cfg, a, b, **init)
    assert whole.keys() == part.keys()
    for name in whole:
        assert part[name] == whole[name], name


@pytest.mark.parametrize("case", ["fp32-float16-stochastic", "sqrt-float32-bs256",
                                  "bnb-float32-stochastic-v-amsgrad"])  # fmt: skip
def test_index_base_and_tag_are_what_make_it_so(backend, case):
    # The same shard hashing its elements from 0, or keyed by its own first leaf (0, not
    # the group's 1), rounds differently: the test above is not vacuous.
    dtype, cfg, init, (a, b) = CASES[case]
    for wrong in (dict(index_base=0), dict(hash_tag=0)):
        whole, part = whole_and_shard(backend, dtype, cfg, a, b, **wrong, **init)
        stochastic = "codes_v" if "codes_v" in whole else "params"
        assert part[stochastic] != whole[stochastic], wrong


def test_numba_shards_of_bnb_state_take_the_gather_kernel(monkeypatch):
    # The AVX-512 VBMI kernel hashes element e as e: a group with index_base != 0 runs the
    # gather kernel step_q8 even where q8_kernel() says "vbmi" (forced here, nothing runs).
    numba_cpu = pytest.importorskip("adamnp.backends.numba")
    launched = []
    monkeypatch.setattr(numba_cpu, "q8_kernel", lambda: "vbmi")
    monkeypatch.setattr(numba_cpu, "_vbmi_inputs", lambda: ())
    monkeypatch.setattr(numba_cpu, "_launch", lambda kernel, *args: launched.append(kernel))
    rng = np.random.default_rng(1)
    params = make_tree(F32, rng)
    init = dict(state_bits=8, state_format="bnb", v_rounding="stochastic", min_8bit_size=1)
    cfg = adamnp.adamw()
    state = adamnp.init(params, cfg, backend="numba", **init)
    (group,) = [g for g in state.groups if g.kind == "q8"]
    grads = grads_like(params, rng)
    shard, cut, cut_g = shard_of(group, params, grads, 512, 2024, index_base=512,
                                 hash_tag=group.tag, be=numba_cpu)  # fmt: skip
    scalars = host_scalars(cfg, 1, cfg.lr_at(0))
    numba_cpu.step_group(group, params, grads, scalars)
    numba_cpu.step_group(shard, cut, cut_g, scalars)
    assert launched == [numba_cpu.step_q8_simd, numba_cpu.step_q8]
