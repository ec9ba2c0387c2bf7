"""Where every element lives in a sharded state, from shapes alone (no communication).

Params and grads of one dtype share a flat buffer (a *bucket*), so that one collective moves
them all. Buckets are ordered by dtype name; inside one, leaves follow the unsharded state's
leaf groups (:func:`adamnp._state.plan_groups`), in tree order within each group. Every leaf
starts at a multiple of the quantization block (``block_size``, also with float32 state), and
the bucket is padded to a multiple of ``nranks * block_size``. Rank
``r`` owns elements ``r * shard .. (r + 1) * shard`` of every bucket: equal shards whose
boundaries fall on block boundaries of every 8-bit leaf, so every block is stepped whole by
one rank. Padding lives in the flat param and grad buffers only, never in the state.

Each rank's part of one unsharded leaf group is a contiguous range of that group's arena
(:meth:`DistLayout.arena_range`): a rank's state is the unsharded state's arenas cut into
pieces, and consolidating or resharding is copying ranges.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._state import GroupPlan, Layout, plan_groups
from ..backends.math import compute_dtype


class Piece(NamedTuple):
    """Elements ``start:stop`` of flattened leaf ``leaf``, at ``flat`` in its bucket."""

    leaf: int
    start: int
    stop: int
    flat: int


class Bucket(NamedTuple):
    """One flat param buffer (``param_dtype``) and its gradient buffer (``grad_dtype``, the
    compute dtype: float32 for float16/bfloat16 params)."""

    param_dtype: np.dtype
    grad_dtype: np.dtype
    leaf_ids: tuple  # tree indices, in flat order
    starts: tuple  # flat position of each leaf's first element
    size: int  # elements, padding included: a multiple of nranks * block_size
    shard: int  # elements per rank: size // nranks


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


class DistLayout:
    """The sharded layout of a tree of ``shapes`` and ``dtypes`` over ``nranks`` ranks.

    Examples
    --------
    >>> import numpy as np
    >>> lay = Layout(8, "sqrt", 256, 1000, "stochastic", ())
    >>> d = DistLayout(["b", "w"], [(10,), (3000,)], [np.float32] * 2, lay, None, nranks=2)
    >>> [(b.leaf_ids, b.starts, b.size, b.shard) for b in d.buckets]
    [((0, 1), (0, 256), 3584, 1792)]
    >>> d.pieces(0), d.pieces(1)
    ([Piece(leaf=0, start=0, stop=10, flat=0), Piece(leaf=1, start=0, stop=1536, flat=256)], [Piece(leaf=1, start=1536, stop=3000, flat=1792)])
    """  # noqa: E501

    def __init__(self, paths, shapes, dtypes, layout: Layout, labels, nranks: int):
        if type(nranks) is not int or nranks < 1:
            raise ValueError(f"nranks must be a positive int, got {nranks!r}")
        self.nranks = nranks
        self.paths = tuple(paths)
        self.shapes = tuple(tuple(s) for s in shapes)
        self.dtypes = tuple(np.dtype(d) for d in dtypes)
        self.layout = layout
        self.labels = None if labels is None else tuple(labels)
        self.sizes = tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)
        self.groups: list[GroupPlan] = plan_groups(paths, shapes, dtypes, layout, labels)
        self.group_of = {}  # leaf -> (group index, position in the group)
        for gi, g in enumerate(self.groups):
            for j, leaf in enumerate(g.leaf_ids.tolist()):
                self.group_of[leaf] = (gi, j)
        block = layout.block_size
        buckets = []
        for name in sorted({d.name for d in self.dtypes}):
            ids, starts, pos = [], [], 0
            for g in self.groups:
                if g.param_dtype.name != name:
                    continue
                for leaf in g.leaf_ids.tolist():
                    pos = _round_up(pos, block)
                    ids.append(leaf)
                    starts.append(pos)
                    pos += self.sizes[leaf]
            size = max(_round_up(pos, nranks * block), nranks * block)
            dtype = next(d for d in self.dtypes if d.name == name)
            buckets.append(Bucket(dtype, compute_dtype(dtype), tuple(ids), tuple(starts), size,
                                  size // nranks))  # fmt: skip
        self.buckets = tuple(buckets)
        self._pieces = [self._cut(r) for r in range(nranks)]

    def _cut(self, rank: int) -> list[Piece]:
        out = []
        for b in self.buckets:
            lo, hi = rank * b.shard, (rank + 1) * b.shard
            for leaf, start in zip(b.leaf_ids, b.starts):
                a, e = max(start, lo), min(start + self.sizes[leaf], hi)
                if a < e:
                    out.append(Piece(leaf, a - start, e - start, a))
        return out

    def pieces(self, rank: int) -> list[Piece]:
        """The pieces rank ``rank`` owns, in flat order (bucket by bucket)."""
        return list(self._pieces[rank])

    def arena_range(self, rank: int, group: int) -> tuple[int, int, int, int]:
        """``(e0, e1, b0, b1)``: the elements and blocks of unsharded group ``group``'s arena
        that rank ``rank`` holds (``b0 == b1 == 0`` for a full-precision group; an empty
        range where it holds none of the group)."""
        g = self.groups[group]
        mine = [p for p in self._pieces[rank] if self.group_of[p.leaf][0] == group]
        if not mine:
            return 0, 0, 0, 0
        first, last = mine[0], mine[-1]
        j0, j1 = self.group_of[first.leaf][1], self.group_of[last.leaf][1]
        e0 = int(g.offsets[j0]) + first.start
        e1 = int(g.offsets[j1]) + last.stop
        if g.block_offsets is None:
            return e0, e1, 0, 0
        bs = self.layout.block_size
        b0 = int(g.block_offsets[j0]) + first.start // bs
        b1 = int(g.block_offsets[j1]) + -(-last.stop // bs)
        return e0, e1, b0, b1

    def block_range(self, group: int, lo: int, hi: int) -> tuple[int, int]:
        """The blocks of 8-bit group ``group``'s arena that hold its elements ``lo:hi``
        (``lo < hi``, ``lo`` at the start of a block)."""
        g = self.groups[group]
        bs = self.layout.block_size

        def block(x: int) -> int:
            j = int(np.searchsorted(g.offsets, x, side="right")) - 1
            return int(g.block_offsets[j]) + (x - int(g.offsets[j])) // bs

        return block(lo), block(hi - 1) + 1
