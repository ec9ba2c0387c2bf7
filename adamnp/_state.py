"""Optimizer state: typed per-leaf moment slots stored as views into flat per-group arenas.

Every leaf gets one slot. Leaves that share a kind of slot and a dtype form a
:class:`LeafGroup`, whose moments live in a few flat buffers (the *arena*); the slots are views
into them. A backend can therefore update a whole group in one compiled call, while users and
checkpoints see one array per leaf and moment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ._config import AdamConfig
from .lowbit.maps import SIGNED_MAP, UNSIGNED_MAP, moment_map, zero_code
from .lowbit.reference import n_blocks


class Fp32Slot(NamedTuple):
    """Full-precision moments of one leaf (float32 leaves get float32, float64 get float64).

    The arrays are views into the state's flat buffers: writing into them changes the state.

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> state = adamnp.init(np.zeros(3, np.float32), adamnp.adam(), backend="numpy")
    >>> state.slots[0].m.dtype, state.slots[0].vmax
    (dtype('float32'), None)
    """

    m: np.ndarray  # shape=leaf.shape, dtype=leaf dtype; first moment
    v: np.ndarray  # shape=leaf.shape, dtype=leaf dtype; second moment
    vmax: np.ndarray | None  # shape=leaf.shape, dtype=leaf dtype; amsgrad running max, else None


class QuantSlot(NamedTuple):
    """Blockwise 8-bit moments of one float32 leaf (bitsandbytes' blockwise layout).

    Element ``i`` of a moment is ``dynamic_map(signed)[codes[i]] * absmax[i // block_size]``
    (signed map for ``m``, unsigned for ``v`` and ``vmax``); see docs/eight_bit.md.

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> p = np.zeros(1000, np.float32)
    >>> slot = adamnp.init(p, adamnp.adamw(), state_bits=8, min_8bit_size=1,
    ...                    backend="numpy").slots[0]
    >>> slot.codes_m.dtype, slot.absmax_m.shape, slot.block_size
    (dtype('uint8'), (4,), 256)
    """

    codes_m: np.ndarray  # shape=leaf.shape, uint8; indices into the signed dynamic map
    codes_v: np.ndarray  # shape=leaf.shape, uint8; indices into the unsigned dynamic map
    absmax_m: np.ndarray  # shape=(ceil(n / block_size),), float32; per-block scale of m
    absmax_v: np.ndarray  # shape=(ceil(n / block_size),), float32; per-block scale of v
    codes_vmax: np.ndarray | None  # like codes_v, amsgrad only
    absmax_vmax: np.ndarray | None  # like absmax_v, amsgrad only
    block_size: int  # elements per block of the flattened leaf (power of two, 64..4096)
    map_m: str = SIGNED_MAP
    map_v: str = UNSIGNED_MAP


Slot = Fp32Slot | QuantSlot


@dataclass(eq=False)
class LeafGroup:
    """Leaves whose moments share one flat arena; what a backend updates in one call.

    ``kind`` is ``"fp32"`` (full-precision moments in ``dtype``) or ``"q8"`` (8-bit moments
    of float32 leaves). Leaf ``j`` of the group is leaf ``leaf_ids[j]`` of the tree and owns
    elements ``offsets[j]:offsets[j+1]`` of the element buffers and, for ``"q8"``, blocks
    ``block_offsets[j]:block_offsets[j+1]`` of the absmax buffers.
    """

    kind: str
    dtype: np.dtype
    leaf_ids: np.ndarray  # shape=(k,), int64
    offsets: np.ndarray  # shape=(k + 1,), int64
    block_offsets: np.ndarray | None  # shape=(k + 1,), int64; q8 only
    block_size: int  # 0 for fp32
    buffers: dict = field(
        default_factory=dict
    )  # name -> flat array (m, v, vmax / codes_*, absmax_*)
    v_rounding: str = "nearest"  # q8: "nearest" or "stochastic" requantization of v


@dataclass(eq=False)
class AdamState:
    """Everything :func:`adamnp.step` needs besides params and grads.

    Attributes
    ----------
    config : AdamConfig
    backend : str
        ``"numpy"``, ``"numba"`` or ``"cuda"``.
    step : int
        Number of steps taken (stored as int64 in checkpoints).
    skipped_steps : int
        Steps skipped because of non-finite gradients (``nonfinite="skip"``).
    paths, shapes, dtypes : tuple
        Name, shape and dtype of every leaf, in flattening order.
    slots : tuple of Fp32Slot or QuantSlot
        One per leaf, in the same order.
    """

    config: AdamConfig
    backend: str
    step: int
    skipped_steps: int
    treedef: object
    paths: tuple
    shapes: tuple
    dtypes: tuple
    slots: tuple
    groups: tuple
    state_bits: int
    block_size: int
    v_rounding: str = "nearest"

    def nbytes(self) -> int:
        """Bytes held by the moment buffers (all slots, all groups)."""
        return int(sum(b.nbytes for g in self.groups for b in g.buffers.values()))

    def __repr__(self) -> str:
        kinds = sorted({type(s).__name__ for s in self.slots})
        return (
            f"AdamState({self.config.name}, backend={self.backend!r}, step={self.step}, "
            f"leaves={len(self.slots)}, slots={'/'.join(kinds) or '-'}, "
            f"state_bytes={self.nbytes()})"
        )


def _views(buffer, offsets, shapes):
    return [buffer[offsets[j] : offsets[j + 1]].reshape(shapes[j]) for j in range(len(shapes))]


def build_groups(shapes, dtypes, use_q8, amsgrad, block_size, xp, v_rounding="nearest"):
    """Allocate zero moments for every leaf; return ``(slots, groups)``.

    ``use_q8[i]`` says whether leaf ``i`` gets 8-bit moments; ``xp`` is the backend module,
    which provides ``zeros(n, dtype)`` and ``full(n, value, dtype)`` (host or device memory).
    """
    slots: list = [None] * len(shapes)
    groups = []
    keys = sorted({("q8" if q else "fp32", np.dtype(d).str) for d, q in zip(dtypes, use_q8)})
    for kind, dstr in keys:
        dtype = np.dtype(dstr)
        ids = [
            i
            for i, (d, q) in enumerate(zip(dtypes, use_q8))
            if np.dtype(d) == dtype and ("q8" if q else "fp32") == kind
        ]
        sizes = [int(np.prod(shapes[i], dtype=np.int64)) for i in ids]
        offsets = np.zeros(len(ids) + 1, np.int64)
        offsets[1:] = np.cumsum(sizes)
        total = int(offsets[-1])
        gshapes = [shapes[i] for i in ids]
        if kind == "fp32":
            names = ("m", "v", "vmax") if amsgrad else ("m", "v")
            buffers = {name: xp.zeros(total, dtype) for name in names}
            views = {name: _views(buffers[name], offsets, gshapes) for name in names}
            for j, i in enumerate(ids):
                slots[i] = Fp32Slot(
                    views["m"][j], views["v"][j], views["vmax"][j] if amsgrad else None
                )
            group = LeafGroup(kind, dtype, np.array(ids, np.int64), offsets, None, 0, buffers)
        else:
            blocks = np.zeros(len(ids) + 1, np.int64)
            blocks[1:] = np.cumsum([n_blocks(n, block_size) for n in sizes])
            nb = int(blocks[-1])
            moments = ("m", "v", "vmax") if amsgrad else ("m", "v")
            buffers = {}
            for name in moments:
                buffers[f"codes_{name}"] = xp.full(total, zero_code(moment_map(name)), np.uint8)
                buffers[f"absmax_{name}"] = xp.zeros(nb, np.float32)
            bshapes = [(int(blocks[j + 1] - blocks[j]),) for j in range(len(ids))]
            views = {}
            for name in moments:
                views[f"codes_{name}"] = _views(buffers[f"codes_{name}"], offsets, gshapes)
                views[f"absmax_{name}"] = _views(buffers[f"absmax_{name}"], blocks, bshapes)
            for j, i in enumerate(ids):
                slots[i] = QuantSlot(
                    views["codes_m"][j],
                    views["codes_v"][j],
                    views["absmax_m"][j],
                    views["absmax_v"][j],
                    views["codes_vmax"][j] if amsgrad else None,
                    views["absmax_vmax"][j] if amsgrad else None,
                    block_size,
                )
            group = LeafGroup(
                kind, dtype, np.array(ids, np.int64), offsets, blocks, block_size, buffers,
                v_rounding,
            )  # fmt: skip
        groups.append(group)
    return tuple(slots), tuple(groups)
