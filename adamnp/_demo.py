"""Built-in training problems for ``python -m adamnp demo`` (no downloads)."""

from __future__ import annotations

import numpy as np


def logistic_data(n: int = 4000, d: int = 32, seed: int = 0):
    """Synthetic, linearly separable-with-noise binary classification data (float32)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w_true = rng.standard_normal(d).astype(np.float32)
    logits = x @ w_true + 0.5 * rng.standard_normal(n).astype(np.float32)
    y = (logits > 0).astype(np.float32)
    return x, y


def logistic_loss_grad(params, x, y):
    """Mean binary cross-entropy of ``sigmoid(x @ w + b)`` and its gradient (float32)."""
    z = x @ params["w"] + params["b"]
    p = 1.0 / (1.0 + np.exp(-z))
    eps = np.float32(1e-7)
    loss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))
    r = (p - y) / np.float32(len(y))
    return loss, {"w": (x.T @ r).astype(np.float32), "b": np.float32([r.sum()])}


def run_logistic(
    epochs: int = 20, batch: int = 200, backend: str = "auto", state_bits=32, log=print
):
    """Train logistic regression with AdamW; return (final loss, accuracy, state)."""
    import adamnp

    x, y = logistic_data()
    params = {"w": np.zeros(x.shape[1], np.float32), "b": np.zeros(1, np.float32)}
    state = adamnp.init(params, adamnp.adamw(lr=0.05), backend=backend, state_bits=state_bits)
    rng = np.random.default_rng(1)
    for epoch in range(epochs):
        order = rng.permutation(len(y))
        for lo in range(0, len(y), batch):
            idx = order[lo : lo + batch]
            _, grads = logistic_loss_grad(params, x[idx], y[idx])
            adamnp.step(params, grads, state)
        loss, _ = logistic_loss_grad(params, x, y)
        log(f"epoch {epoch + 1:3d}  loss {loss:.5f}")
    acc = float(np.mean(((x @ params["w"] + params["b"]) > 0) == (y > 0.5)))
    return loss, acc, state
