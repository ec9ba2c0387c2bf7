"""bfloat16 params with stochastic rounding: the library's independent draws per step against
draws spread evenly over the steps (a Weyl sequence per element, as the 8-bit format rounds
``s``), on the problems of tools/half_params_study.py. A study, not the library's behaviour:
it patches the NumPy reference's parameter rounding in this process only.

Each element's draw at step t is ``hash(element) + t * 0x9E3779B9`` (mod 2**32) instead of a
fresh hash per step; two offsets of the hash keys (0 and 12345) per kind. Prints the
full-data loss at 1000, 2000 and 3000 steps relative to float32 params. The numbers are in
docs/mixed_precision.md ("Evenly spread draws"). About 4 minutes per problem:

    python tools/param_rounding_draws.py logistic|mlp|lsq [--seeds 0 1 2]
"""

import argparse

import half_params_study as study  # tools/ is on the path when this file runs as a script
import numpy as np
from q8_loss_study import LeastSquares

from adamnp.backends import numpy as reference
from adamnp.cli.problems import MLP, Logistic
from adamnp.lowbit.half import round_half_array
from adamnp.lowbit.stochastic import S_PHASE, element_hashes, step_key

PROBLEMS = {"logistic": Logistic, "mlp": MLP, "lsq": LeastSquares}
DRAWS = {"weyl": False, "offset": 0}  # what the patched rounding does now
_library_init = reference._HalfParams.__init__


def _init(self, group, scalars, size):
    _library_init(self, group, scalars, size)
    self.step, self.tag = scalars.step, group.tag


def _store(self, p, x, e):
    """The library's ``_HalfParams.store`` with the draws of :data:`DRAWS`."""
    if self.fmt < 0:
        return
    u = None
    if self.stochastic:
        off = DRAWS["offset"]
        if DRAWS["weyl"]:
            u = element_hashes(step_key(0, self.tag) ^ off, self.base + e, p.size)
            u = u + np.uint32((self.step * S_PHASE) & 0xFFFFFFFF)  # wraps mod 2**32
        else:
            u = element_hashes(self.key ^ off, self.base + e, p.size)
    p.view(np.uint16)[:] = round_half_array(x, self.fmt, u)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("problem", choices=sorted(PROBLEMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    reference._HalfParams.__init__, reference._HalfParams.store = _init, _store
    for seed in args.seeds:
        problem = PROBLEMS[args.problem](seed=seed)
        base = study.losses(problem, np.float32, "nearest", "numpy")
        cells = []
        for weyl in (False, True):
            for offset in (0, 12345):
                DRAWS.update(weyl=weyl, offset=offset)
                got = study.losses(problem, study.DTYPES["bfloat16"], "stochastic", "numpy")
                rel = " / ".join(f"{a / b - 1:+.2%}" for a, b in zip(got, base))
                cells.append(f"{'weyl' if weyl else 'independent'} {offset}: {rel}")
        print(f"{args.problem}, data seed {seed}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
