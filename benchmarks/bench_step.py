"""Step time and peak memory of ``adamnp.step`` per backend, size and tree layout."""

from __future__ import annotations

import numpy as np

import adamnp

from ._common import BACKENDS, interleaved_medians, warm_state


class StepOneLeaf:
    """One float32 leaf of ``n`` elements, AdamW defaults (``nonfinite="raise"``)."""

    params = (BACKENDS, [10_000, 1_000_000, 16_000_000, 64_000_000])
    param_names = ["backend", "n"]
    timeout = 600

    def setup(self, backend, n):
        self.p, self.g, self.state = warm_state(backend, 1, n)

    def time_step(self, backend, n):
        adamnp.step(self.p, self.g, self.state)

    def peakmem_step(self, backend, n):
        adamnp.step(self.p, self.g, self.state)


LAYOUTS = {  # name -> (leaves, elements per leaf); pairs hold the same number of elements
    "1x16384000": (1, 16_384_000),
    "1000x16384": (1000, 16_384),
    "1x1000000": (1, 1_000_000),
    "10000x100": (10_000, 100),
}


class StepManyLeaves:
    """The same number of elements in one leaf or in many: the cost of multi-tensor dispatch."""

    params = (BACKENDS, list(LAYOUTS))
    param_names = ["backend", "layout"]
    timeout = 600

    def setup(self, backend, layout):
        self.p, self.g, self.state = warm_state(backend, *LAYOUTS[layout])

    def time_step(self, backend, layout):
        adamnp.step(self.p, self.g, self.state)


class LeafOverhead:
    """Ratios between layouts of equal size, timed in one process (medians, interleaved)."""

    params = ["numba"]
    param_names = ["backend"]
    timeout = 600

    def setup(self, backend):
        if backend not in BACKENDS:
            raise NotImplementedError(f"backend {backend!r} is not available")
        self.states = {name: warm_state(backend, *shape) for name, shape in LAYOUTS.items()}

    def _medians(self, a, b):
        return interleaved_medians(
            *(lambda s=self.states[name]: adamnp.step(*s) for name in (a, b)), budget_s=3.0
        )

    def track_per_leaf_overhead_us(self, backend):
        one, many = self._medians("1x1000000", "10000x100")
        return (many - one) / 10_000 * 1e6

    track_per_leaf_overhead_us.unit = "us per leaf"

    def track_1000_leaves_over_one_leaf(self, backend):
        one, many = self._medians("1x16384000", "1000x16384")
        return many / one

    track_1000_leaves_over_one_leaf.unit = "ratio"


LABELLED = {  # name -> leaf sizes; the second label takes every other leaf
    "10x1000000+10x1000": [1_000_000] * 10 + [1000] * 10,
    "1000x16384": [16_384] * 1000,
}


def _alternate(path, leaf):
    return ("decay", "no_decay")[int(path[-3]) % 2]  # path: "params['p0007']"


class LabelOverhead:
    """The same tree stepped with one config and with two labels (per-label hyperparameters:
    a weight-decay group and a no-decay group), timed in one process (interleaved medians).
    Each label is a launch of its own; the goal is at most 1.1x."""

    params = (["numba"], list(LABELLED), [32, 8])
    param_names = ["backend", "tree", "state_bits"]
    timeout = 600

    def setup(self, backend, tree, state_bits):
        if backend not in BACKENDS:
            raise NotImplementedError(f"backend {backend!r} is not available")
        rng = np.random.default_rng(0)
        sizes = LABELLED[tree]
        params = {
            f"p{i:04d}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)
        }
        grads = {k: rng.standard_normal(a.size).astype(np.float32) for k, a in params.items()}
        configs = {
            "decay": adamnp.adamw(weight_decay=0.1),
            "no_decay": adamnp.adamw(weight_decay=0.0),
        }
        bits = dict(state_bits=8, min_8bit_size=1) if state_bits == 8 else {}
        one = adamnp.init(params, configs["decay"], backend=backend, **bits)
        two = adamnp.init(params, configs, labels=_alternate, backend=backend, **bits)
        self.runs = [(params, grads, one), (params, grads, two)]
        for run in self.runs:
            adamnp.step(*run)

    def track_two_labels_over_one(self, backend, tree, state_bits):
        one, two = interleaved_medians(
            *(lambda r=r: adamnp.step(*r) for r in self.runs), budget_s=3.0
        )
        return two / one

    track_two_labels_over_one.unit = "ratio"
