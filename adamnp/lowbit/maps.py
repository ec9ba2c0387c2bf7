"""The 256-value maps of the 8-bit state formats.

The dynamic-tree maps of bitsandbytes (Dettmers et al., 2022): signed for the first moment,
unsigned for the second moment and amsgrad's max. Each map is named in checkpoints by the
names below; :func:`zero_code` is the code a block of zeros stores.
"""

from functools import lru_cache

import numpy as np

SIGNED_MAP = "dynamic-signed-8bit"  # map of the first moment (m)
UNSIGNED_MAP = "dynamic-unsigned-8bit"  # map of the second moment (v) and of amsgrad's max

#: The 8-bit state formats: ``"sqrt"`` (:mod:`adamnp.lowbit.sqrt`, the default) and
#: ``"bnb"`` (bitsandbytes' blockwise layout with the dynamic maps of this module).
STATE_FORMATS = ("sqrt", "bnb")
_MAP_NAMES = {"sqrt": ("ratio-int8", "sqrt-graded-8bit-2"), "bnb": (SIGNED_MAP, UNSIGNED_MAP)}
#: ``map_v`` of ``"sqrt"`` files written before 2026-12-06: one map of ``s`` (the narrow
#: one), every absmax non-negative. They mean the same in the current format and load as
#: they are; the new name keeps an older adamnp from reading a wide block's negative absmax.
SQRT_MAP_V_BEFORE_WIDE = "sqrt-graded-8bit"


def _linspace_f32(start, stop, num, fused=True):
    """``torch.linspace(start, stop, num, dtype=torch.float32)`` as PyTorch's CPU kernel does it.

    The kernel computes ``step = (stop - start) / (num - 1)`` in float32, then element ``k`` as
    ``start + step * k`` for ``k < num // 2`` and ``stop - step * (num - 1 - k)`` above. Builds
    with AVX2/AVX-512 kernels (what x86-64 CPUs since 2013 run) contract each product and sum
    into one fused multiply-add, rounded once (`fused`); that is emulated in float64, exact
    here because ``step * k`` has at most 24 + 8 significant bits and the sum spans fewer than
    53. PyTorch's non-vectorized "default" kernel rounds twice (``fused=False``) and differs
    in the last bit of some values; bitsandbytes' maps are taken from the vectorized one.
    """
    start, stop = np.float32(start), np.float32(stop)
    step = (stop - start) / np.float32(num - 1)
    k = np.arange(num)
    if fused:
        up = (np.float64(start) + np.float64(step) * k).astype(np.float32)
        down = (np.float64(stop) - np.float64(step) * (num - 1 - k)).astype(np.float32)
    else:
        up = start + step * k.astype(np.float32)
        down = stop - step * (num - 1 - k).astype(np.float32)
    return np.where(k < num // 2, up, down)


def _dynamic_map_values(signed, fused=True):
    parts = [np.array([0.0, 1.0], dtype=np.float32)]
    for i in range(7):
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = _linspace_f32(0.1, 1.0, n, fused)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scaled = np.float32(10.0 ** (i - 6)) * means
        parts += [scaled, -scaled] if signed else [scaled]
    return np.sort(np.concatenate(parts))


@lru_cache(maxsize=2)
def dynamic_map(signed=True):
    """The dynamic-tree quantization map of bitsandbytes (``create_dynamic_map``).

    Parameters
    ----------
    signed : bool, default True
        True: the map for signed values (Adam's first moment), in [-0.99297, 1].
        False: the map for non-negative values (the second moment), in [0, 1].

    Returns
    -------
    ndarray
        256 float32 values, strictly increasing, containing 0 and 1; read-only and cached.

    Notes
    -----
    The values equal bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7,
    total_bits=8)`` bit for bit. For decade ``i`` in 0..6 it takes ``n = 2**i + 1`` (signed)
    or ``2**(i + 1) + 1`` (unsigned) float32 points ``linspace(0.1, 1, n)``, their float32
    midpoints, scaled by the float32 ``10**(i - 6)`` (and their negatives if signed), then adds
    0 and 1 and sorts: a linear grid within each decade, seven decades from about 1e-7 to 1.

    The float32 linspace values follow PyTorch's vectorized (AVX2/AVX-512) CPU kernel, which
    fuses multiply and add; PyTorch's non-vectorized kernel would give 42 (signed) and 31
    (unsigned) values that differ by 1 or 2 units in the last place.

    Examples
    --------
    >>> m = dynamic_map(signed=True)
    >>> m.shape, m.dtype
    ((256,), dtype('float32'))
    >>> m[[0, 127, 128, 255]]
    array([-9.9296874e-01,  0.0000000e+00,  5.5000004e-07,  1.0000000e+00],
          dtype=float32)
    >>> dynamic_map(signed=False)[:3]
    array([0.0000000e+00, 3.2500003e-07, 7.7499999e-07], dtype=float32)
    """
    out = _dynamic_map_values(bool(signed))
    out.flags.writeable = False
    return out


def moment_map(name: str) -> np.ndarray:
    """The map of moment ``name`` (``"m"``: signed; ``"v"``, ``"vmax"``: unsigned).

    Examples
    --------
    >>> moment_map("v")[0], moment_map("m")[0] < 0
    (np.float32(0.0), np.True_)
    """
    return dynamic_map(name == "m")


def zero_code(qmap: np.ndarray) -> int:
    """The code of 0.0 in ``qmap`` (what an all-zero block stores).

    Examples
    --------
    >>> zero_code(dynamic_map(True)), zero_code(dynamic_map(False))
    (127, 0)
    """
    return int(np.flatnonzero(qmap == 0)[0])


def map_names(state_format: str) -> tuple[str, str]:
    """``(map of codes_m, map of codes_v and codes_vmax)`` of an 8-bit state format, as
    checkpoints name them.

    Examples
    --------
    >>> map_names("bnb")
    ('dynamic-signed-8bit', 'dynamic-unsigned-8bit')
    """
    return _MAP_NAMES[state_format]


def initial_code(state_format: str, moment: str) -> int:
    """The code a fresh state stores for ``moment`` (with absmax 0 it decodes to 0).

    ``"bnb"``: the code of 0.0 in the moment's map; ``"sqrt"``: 0 (``r = 0``; any ``s`` code
    times absmax 0 is 0).

    Examples
    --------
    >>> initial_code("bnb", "m"), initial_code("sqrt", "m")
    (127, 0)
    """
    return zero_code(moment_map(moment)) if state_format == "bnb" else 0
