"""Print how far the NumPy reference lands from the recorded torch trajectories (final step)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import numpy as np
from test_torch_parity import VECTORS, load_case, replay

for path in VECTORS:
    meta, data = load_case(path)
    params, state, hist, worst_u = replay(meta, data, "numpy")
    out = []
    for leaf in meta["leaves"]:
        p = params[leaf]
        t = data[f"p/{leaf}"]
        ulps = np.abs(p - t) / np.spacing(np.abs(t).astype(t.dtype).max())
        rel_upd = np.abs(p - t).max() / (data["lr_per_step"].max())
        i = state.paths.index(f"params['{leaf}']")
        mdev = (
            np.abs(state.slots[i].m - data[f"m/{leaf}"])
            / np.spacing(np.abs(data[f"m/{leaf}"]).max())
        ).max()
        out.append(
            f"{leaf}: p {ulps.max():.1f} ulp(max|p|), {rel_upd:.2e} x lr; m {mdev:.1f} ulp(max|m|)"
        )
    print(path.stem, "|", "; ".join(out))
