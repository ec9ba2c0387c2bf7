"""Checkpoints written by adamnp before the 8-bit ``state_format`` existed (format 1).

``tests/test_checkpoint.py`` loads them with the current code and continues them: they must
come back as bitsandbytes-format state and step on exactly as the old code stepped them.
Run against the last commit without ``state_format`` (f7f038a), from outside the tree:

    git worktree add /tmp/old f7f038a
    PYTHONPATH=/tmp/old python tools/make_old_checkpoints.py tests/vectors

It writes ``checkpoint_v1_bnb_{nearest,stochastic}.npz`` (8-bit state after 5 steps, blocks
of 64, amsgrad, one small float32 leaf) and ``..._params.npz`` (the params after 5 steps and
after 5 more, taken by the old code).
"""

import sys

import numpy as np

import adamnp


def params0():
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((40, 130)).astype(np.float32),
            "b": rng.standard_normal(7).astype(np.float32)}  # fmt: skip


def grads(params, k):
    r = np.random.default_rng(100 + k)
    return {
        key: (r.standard_normal(a.shape) * 10.0 ** r.uniform(-4, 0, a.shape)).astype(np.float32)
        for key, a in params.items()
    }


def main(out: str) -> None:
    for rounding in ("nearest", "stochastic"):
        p = params0()
        state = adamnp.init(p, adamnp.adamw(lr=1e-2, amsgrad=True), backend="numpy",
                            state_bits=8, block_size=64, v_rounding=rounding)  # fmt: skip
        for k in range(5):
            adamnp.step(p, grads(p, k), state)
        adamnp.save_state(f"{out}/checkpoint_v1_bnb_{rounding}.npz", state)
        start = {k: v.copy() for k, v in p.items()}
        for k in range(5, 10):
            adamnp.step(p, grads(p, k), state)
        np.savez(f"{out}/checkpoint_v1_bnb_{rounding}_params.npz",
                 **{f"start_{k}": v for k, v in start.items()},
                 **{f"end_{k}": v for k, v in p.items()})  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
