"""Check the quantizer's fast path against the exact one on every float32 in [-1, 1].

For both dynamic maps, every float32 bit pattern ``s`` with ``|s| <= 1`` (2 x 1.07e9) goes
through :func:`adamnp.backends.numba.avx512.fast_code` and the exact table lookup
:func:`adamnp.lowbit.exact.quantize_bits`; an unflagged pattern whose codes differ is a
failure. Prints the counts; exits non-zero on any mismatch. About 30 s on 2 cores:

    python tools/sweep_fast_quantizer.py
"""

import sys
import time

import numba
import numpy as np

from adamnp.backends.numba import avx512 as _numba_simd
from adamnp.lowbit import decades as _q8_decades
from adamnp.lowbit import exact as _q8_elem
from adamnp.quant import dynamic_map

fast_code = numba.njit(inline="always", error_model="numpy")(_numba_simd.fast_code)
exact_code = numba.njit(inline="always", error_model="numpy")(_q8_elem.quantize_bits)
_PIECES = 4096
_ULPS = 4  # pattern distance covered around each value


@numba.njit(parallel=True, error_model="numpy")
def _sweep(sign, binades, lines, zero, table, shift, lo, nb):
    top = 0x3F800001 + _ULPS  # the patterns of 0 .. 1.0 and a few above
    per = (top + _PIECES - 1) // _PIECES
    bad = np.zeros(_PIECES, np.int64)
    flagged = np.zeros(_PIECES, np.int64)
    for c in numba.prange(_PIECES):
        for b in range(c * per, min((c + 1) * per, top)):
            bits = np.int32(b | sign)
            code, flag = fast_code(bits, binades, lines, zero)
            if flag:
                flagged[c] += 1
                continue
            # the kernels scale by a reciprocal: their value is within 3 ulps of the exact
            # quotient, so an unflagged code must hold over +-4 patterns (monotone: check ends)
            below = np.int32(max(b - _ULPS, 0) | sign)
            above = np.int32(min(b + _ULPS, top + _ULPS) | sign)
            exact = exact_code(bits, table, shift, lo, nb)
            if code != exact or exact_code(below, table, shift, lo, nb) != exact:
                bad[c] += 1
            elif exact_code(above, table, shift, lo, nb) != exact:
                bad[c] += 1
    return bad.sum(), flagged.sum()


def main() -> int:
    failed = False
    for signed in (True, False):
        code = dynamic_map(signed)
        fast = _q8_decades.build_decade_tables(code)
        exact = _q8_elem.build_quant_tables(code)
        for sign, name in ((0, "+"), (-(1 << 31), "-")):
            t0 = time.perf_counter()
            bad, flagged = _sweep(np.int32(sign), *fast, *exact)
            print(
                f"{'signed' if signed else 'unsigned'} map, sign {name}: {bad} mismatches, "
                f"{flagged} flagged ({flagged / 0x3F800001:.2e} of patterns), "
                f"{time.perf_counter() - t0:.1f} s"
            )
            failed |= bad > 0
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
