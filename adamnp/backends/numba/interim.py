"""The Numba backend's results computed by NumPy, for the steps a Numba state takes while its
kernels compile in the background (:mod:`adamnp._background`).

Everything is the NumPy reference's (:mod:`adamnp.backends.numpy`), whose updates the Numba
kernels equal bit for bit, except the one answer whose last bits differ between the two: the
gradients' sum of squares (for clipping). :func:`grad_sq_norm` here adds the squares in the
order of :func:`.reduce.sum_squares`, so a step taken here equals the Numba step in every
bit. Nothing here compiles.
"""

from __future__ import annotations

import numpy as np

from ..numpy import (
    CHUNK,
    address_range,
    as_compute,
    availability,
    copy_from_host,
    from_host,
    full,
    is_contiguous,
    is_writeable,
    nonfinite_leaf,
    owns,
    step_group,
    to_host,
    zeros,
)

NAME = "numba"  # the state's backend, as the errors name it

__all__ = [
    "NAME",
    "address_range",
    "availability",
    "copy_from_host",
    "from_host",
    "full",
    "grad_sq_norm",
    "is_contiguous",
    "is_writeable",
    "nonfinite_leaf",
    "owns",
    "step_group",
    "to_host",
    "zeros",
]


def _chunk_sum(x: np.ndarray) -> float:
    """:func:`.reduce._sum_squares` of one chunk (float64 ``x``): eight partial sums, each
    over every eighth element in order (``np.add.accumulate`` adds strictly in order), the
    rest added to the first, then combined pairwise as the kernel does."""
    rows = x.size // 8
    s = [0.0] * 8
    if rows:
        y = x[: rows * 8].reshape(rows, 8)
        s = np.add.accumulate(y * y, axis=0)[-1].tolist()
    for v in x[rows * 8 :].tolist():
        s[0] += v * v
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


def grad_sq_norm(grads) -> float:
    """The sum of squares of all gradient elements, bit for bit as the Numba backend's
    :func:`~adamnp.backends.numba.grad_sq_norm` (float64 sums per chunk of
    :data:`~adamnp.backends.numpy.CHUNK` elements, added in chunk order; half-precision
    elements upcast to float32 first).

    Examples
    --------
    >>> grad_sq_norm([np.full(3, 2.0, np.float32), np.ones(2)])
    14.0
    """
    total = 0.0
    for g in grads:
        flat = g.reshape(-1)
        for lo in range(0, flat.size, CHUNK):
            part = as_compute(flat[lo : lo + CHUNK]).astype(np.float64)
            total += _chunk_sum(part)
    return total
