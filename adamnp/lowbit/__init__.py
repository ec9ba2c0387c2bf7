"""Low-bit state formats: what a quantized moment means, independent of any backend.

The lowest layer: it imports nothing else of adamnp, and backends and the public modules
build on it.

- :mod:`.maps`: the 256-value maps (bitsandbytes' dynamic-tree maps) and their names;
- :mod:`.reference`: the NumPy definition of quantize / dequantize / requantize and of the
  stochastic rounding of ``v`` (the oracle every kernel matches bit for bit);
- :mod:`.exact`: the exact O(1) quantizer (``quantize_bits``), compiled for CPU and GPU;
- :mod:`.decades`: the decade tables of the fast quantizer (AVX-512 path);
- :mod:`.stochastic`: the counter-based hash behind stochastic rounding.
"""
