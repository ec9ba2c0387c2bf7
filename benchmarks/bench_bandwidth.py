"""How close a step runs to memory bandwidth, and to torch's fused AdamW on the same data."""

from __future__ import annotations

import numpy as np

import adamnp
from adamnp import backends

from ._common import BACKENDS, interleaved_medians, warm_state

SIZES = [1_000_000, 16_000_000, 64_000_000]


def _traffic_kernel():
    if not backends.available("numba"):
        raise NotImplementedError("traffic_kernel needs numba")
    from adamnp.backends.numba import traffic_kernel

    return traffic_kernel


class Bandwidth:
    """Step time over ``traffic_kernel`` time on the same bytes (28 per float32 element).

    ``traffic_kernel`` reads p, g, m, v and writes p, m, v with trivial arithmetic, so the
    ratio is the step's cost relative to one pure memory pass: 1.0 is bandwidth-bound. The
    default ``nonfinite="raise"`` checks every gradient before it writes anything (one read
    of g more, 32 bytes per element), and its traffic kernel then reads g first as well
    (``check_pass=True``); ``"propagate"`` does not.
    """

    params = (BACKENDS, SIZES, ["raise", "propagate"])
    param_names = ["backend", "n", "nonfinite"]
    timeout = 600

    def setup(self, backend, n, nonfinite):
        traffic_kernel = _traffic_kernel()
        self.step = warm_state(backend, 1, n, nonfinite=nonfinite)
        buffers = [np.ones(n, np.float32) for _ in range(4)]
        check = nonfinite == "raise"
        self.traffic = lambda: traffic_kernel(*buffers, check_pass=check)
        self.traffic()

    def track_step_over_traffic(self, backend, n, nonfinite):
        step, traffic = interleaved_medians(lambda: adamnp.step(*self.step), self.traffic)
        return step / traffic

    track_step_over_traffic.unit = "ratio"


class Clipping:
    """Step time with ``max_grad_norm`` over the step without it (both ``nonfinite="raise"``),
    one leaf of ``n`` elements, float32 or 8-bit state.

    Clipping adds a pass over g for the norm; the norm also answers the non-finite check
    when it is below the smallest squared gradient limit
    (``adamnp.backends.math.square_bound``), so the step with clipping reads g as often as
    the step without (once to check, once to update) and the ratio should stay near 1.
    """

    params = (BACKENDS, [16_000_000], [32, 8])
    param_names = ["backend", "n", "state_bits"]
    timeout = 600

    def setup(self, backend, n, state_bits):
        self.clip = warm_state(backend, 1, n, state_bits=state_bits, max_grad_norm=1.0)
        self.plain = warm_state(backend, 1, n, state_bits=state_bits)

    def track_clip_over_plain(self, backend, n, state_bits):
        clip, plain = interleaved_medians(
            lambda: adamnp.step(*self.clip), lambda: adamnp.step(*self.plain)
        )
        return clip / plain

    track_clip_over_plain.unit = "ratio"


class Torch:
    """torch.optim.AdamW(fused=True) on the CPU, same data and hyperparameters."""

    params = (SIZES, ["raise", "propagate"])
    param_names = ["n", "nonfinite"]
    timeout = 600

    def setup(self, n, nonfinite):
        try:
            import torch
        except ImportError:
            raise NotImplementedError("torch is not installed") from None
        if not backends.available("numba"):
            raise NotImplementedError("needs numba")
        self.step = warm_state("numba", 1, n, nonfinite=nonfinite)
        p, g, _ = self.step
        param = torch.from_numpy(p["l00000"].copy()).requires_grad_()
        param.grad = torch.from_numpy(g["l00000"].copy())
        config = self.step[2].config
        self.opt = torch.optim.AdamW(
            [param], lr=config.lr, betas=config.betas, eps=config.eps,
            weight_decay=config.weight_decay, fused=True,
        )  # fmt: skip
        self.opt.step()

    def time_torch_fused_step(self, n, nonfinite):
        self.opt.step()

    def track_numba_over_torch(self, n, nonfinite):
        ours, theirs = interleaved_medians(lambda: adamnp.step(*self.step), self.opt.step)
        return ours / theirs

    track_numba_over_torch.unit = "ratio"
