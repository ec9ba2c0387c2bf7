"""The 8-bit step and blockwise quantization: time, ratio to the float32 step, state bytes."""

from __future__ import annotations

import numpy as np

import adamnp
from adamnp import backends, quant

from ._common import BACKENDS, interleaved_medians, warm_state

SIZES = [1_000_000, 16_000_000, 64_000_000]
NUMPY_MAX = 1_000_000  # the reference's 8-bit step is single-threaded NumPy: small sizes only


def _skip_slow(backend: str, n: int) -> None:
    if backend == "numpy" and n > NUMPY_MAX:
        raise NotImplementedError("the NumPy reference is benchmarked at small sizes only")


class Step8bit:
    """One float32 leaf of ``n`` elements with 8-bit moments (blocks of 256), AdamW defaults."""

    params = (BACKENDS, SIZES)
    param_names = ["backend", "n"]
    timeout = 600

    def setup(self, backend, n):
        _skip_slow(backend, n)
        self.p, self.g, self.state = warm_state(backend, 1, n, state_bits=8)

    def time_step(self, backend, n):
        adamnp.step(self.p, self.g, self.state)

    def peakmem_step(self, backend, n):
        adamnp.step(self.p, self.g, self.state)


class Step8bitOverFloat32:
    """8-bit step time over float32 step time, same size and backend, in one process.

    The 8-bit step moves 16 bytes per element (p, g, two codes read; p, two codes written)
    against 28, but adds arithmetic: the default ``"sqrt"`` format decodes and encodes by
    integer arithmetic on float32 bit patterns (a hash per element for its stochastic
    rounding), the ``"bnb"`` format looks its maps up in tables (gathers, or in-register
    permutes with AVX-512 VBMI). ``nonfinite="raise"`` (the default) reads g once more before
    either step.
    """

    params = (["numba"], SIZES, ["raise", "propagate"], ["sqrt", "bnb"])
    param_names = ["backend", "n", "nonfinite", "state_format"]
    timeout = 600

    def setup(self, backend, n, nonfinite, state_format):
        if backend not in BACKENDS:
            raise NotImplementedError(f"backend {backend!r} is not available")
        self.q8 = warm_state(backend, 1, n, state_bits=8, nonfinite=nonfinite,
                             state_format=state_format)  # fmt: skip
        self.fp32 = warm_state(backend, 1, n, nonfinite=nonfinite)
        kernel = backends.get(backend).traffic_kernel_q8
        arrays = [np.ones(n, np.float32), np.ones(n, np.float32)]
        arrays += [np.zeros(n, np.uint8), np.zeros(n, np.uint8)]
        self.traffic = lambda: kernel(*arrays)
        self.traffic()

    def track_8bit_over_float32(self, backend, n, nonfinite, state_format):
        q8, fp32 = interleaved_medians(
            lambda: adamnp.step(*self.q8), lambda: adamnp.step(*self.fp32), budget_s=4.0
        )
        return q8 / fp32

    track_8bit_over_float32.unit = "ratio"

    def track_8bit_ns_per_element(self, backend, n, nonfinite, state_format):
        (q8,) = interleaved_medians(lambda: adamnp.step(*self.q8))
        return q8 / n * 1e9

    track_8bit_ns_per_element.unit = "ns/element"

    def track_8bit_over_traffic(self, backend, n, nonfinite, state_format):
        """8-bit step time over ``traffic_kernel_q8`` time (its 16 bytes, no math)."""
        q8, traffic = interleaved_medians(lambda: adamnp.step(*self.q8), self.traffic)
        return q8 / traffic

    track_8bit_over_traffic.unit = "ratio"


class StochasticV:
    """The bnb-format 8-bit step with ``v_rounding="stochastic"``: its time over the
    nearest-rounding one and over the float32 step (numba, one process, interleaved
    medians)."""

    params = (["numba"], [1_000_000, 16_000_000])
    param_names = ["backend", "n"]
    timeout = 600

    def setup(self, backend, n):
        if backend not in BACKENDS:
            raise NotImplementedError(f"backend {backend!r} is not available")
        self.sr = warm_state(backend, 1, n, state_bits=8, state_format="bnb",
                             v_rounding="stochastic")  # fmt: skip
        self.q8 = warm_state(backend, 1, n, state_bits=8, state_format="bnb")
        self.fp32 = warm_state(backend, 1, n)

    def _medians(self):
        return interleaved_medians(
            *(lambda s=s: adamnp.step(*s) for s in (self.sr, self.q8, self.fp32)), budget_s=6.0
        )

    def track_stochastic_over_nearest(self, backend, n):
        sr, q8, _ = self._medians()
        return sr / q8

    track_stochastic_over_nearest.unit = "ratio"

    def track_stochastic_over_float32(self, backend, n):
        sr, _, fp32 = self._medians()
        return sr / fp32

    track_stochastic_over_float32.unit = "ratio"


class StateBytes:
    """Bytes of optimizer state per parameter element: 2 + 8 / block_size for 8-bit, 8 else."""

    params = ([32, 8], [64, 256, 4096])
    param_names = ["state_bits", "block_size"]

    def setup(self, state_bits, block_size):
        if state_bits == 32 and block_size != 256:
            raise NotImplementedError("block_size applies to 8-bit state only")

    def track_bytes_per_element(self, state_bits, block_size):
        n = 1 << 20
        p = np.zeros(n, np.float32)
        init = dict(state_bits=8, block_size=block_size) if state_bits == 8 else {}
        state = adamnp.init(p, adamnp.adamw(), backend="numpy", **init)
        return state.nbytes() / n

    track_bytes_per_element.unit = "bytes"


class Quantize:
    """Public ``quantize_blockwise`` / ``dequantize_blockwise`` of float32 (blocks of 256).

    The times include allocating the outputs, as a caller sees them. NumPy at 1e6 only.
    """

    params = (["numpy", "numba"], [1_000_000, 16_000_000])
    param_names = ["backend", "n"]
    timeout = 600

    def setup(self, backend, n):
        if backend not in BACKENDS:
            raise NotImplementedError(f"backend {backend!r} is not available")
        _skip_slow(backend, n)
        self.x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
        self.codes, self.absmax = quant.quantize_blockwise(self.x, backend=backend)
        quant.dequantize_blockwise(self.codes, self.absmax, backend=backend)

    def time_quantize_blockwise(self, backend, n):
        quant.quantize_blockwise(self.x, backend=backend)

    def time_dequantize_blockwise(self, backend, n):
        quant.dequantize_blockwise(self.codes, self.absmax, backend=backend)

    def track_quantize_giga_elements_per_s(self, backend, n):
        (t,) = interleaved_medians(lambda: quant.quantize_blockwise(self.x, backend=backend))
        return n / t / 1e9

    track_quantize_giga_elements_per_s.unit = "G elements/s"

    def track_dequantize_giga_elements_per_s(self, backend, n):
        (t,) = interleaved_medians(
            lambda: quant.dequantize_blockwise(self.codes, self.absmax, backend=backend)
        )
        return n / t / 1e9

    track_dequantize_giga_elements_per_s.unit = "G elements/s"
