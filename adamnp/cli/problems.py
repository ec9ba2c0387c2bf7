"""Built-in training problems for the demo and the plots: synthetic data, no downloads.

Each problem gives fresh parameters (a tree of host arrays), the gradient for step ``t``
(minibatches are a deterministic function of ``t``, so every backend sees the same data), the
full-data loss, and an AdamW configuration that trains it well.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


class Problem:
    """Interface of a demo problem (documentation; the problems below subclass it)."""

    name = ""
    summary = ""
    steps = 0  # default number of optimizer steps

    def config(self):
        """The AdamW configuration the demo uses."""
        raise NotImplementedError

    def params0(self):
        """Fresh initial parameters (host arrays)."""
        raise NotImplementedError

    def grad(self, params, t: int):
        """Gradient tree for step ``t`` (0-based) at host ``params``."""
        raise NotImplementedError

    def loss(self, params) -> float:
        """Loss on the whole data set."""
        raise NotImplementedError


class _Minibatches:
    """Index batches: epoch ``e`` visits the samples in a permutation seeded by ``(seed, e)``."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self.per_epoch = n // batch
        self._epoch, self._order = -1, None

    def __call__(self, t: int) -> np.ndarray:
        epoch, k = divmod(t, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng((self.seed, epoch)).permutation(self.n)
        return self._order[k * self.batch : (k + 1) * self.batch]


def _softmax_xent(logits, y):
    """Mean cross-entropy and its gradient with respect to ``logits`` (float32)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(np.mean(np.log(s[:, 0]) - z[rows, y]))
    dz = e / s
    dz[rows, y] -= 1
    return loss, (dz / F32(len(y))).astype(F32)


class Logistic(Problem):
    """Multinomial logistic regression on Gaussian clusters (float32)."""

    name = "logistic"
    steps = 400

    def __init__(self, n=4000, d=512, k=10, batch=100, seed=0):
        rng = np.random.default_rng(seed)
        centers = (0.09 * rng.standard_normal((k, d))).astype(F32)
        self.y = rng.integers(0, k, n)
        self.x = (centers[self.y] + rng.standard_normal((n, d))).astype(F32)
        self.k = k
        self.batches = _Minibatches(n, batch, seed + 1)
        self.summary = (
            f"softmax regression, {n} samples x {d} features, {k} classes, float32, "
            f"batch {batch}; W has {d * k} elements"
        )

    def config(self):
        import adamnp

        return adamnp.adamw(lr=1e-2, weight_decay=1e-2)

    def params0(self):
        return {"W": np.zeros((self.x.shape[1], self.k), F32), "b": np.zeros(self.k, F32)}

    def _loss_grad(self, params, idx):
        x, y = self.x[idx], self.y[idx]
        loss, dz = _softmax_xent(x @ params["W"] + params["b"], y)
        return loss, {"W": x.T @ dz, "b": dz.sum(axis=0)}

    def grad(self, params, t):
        return self._loss_grad(params, self.batches(t))[1]

    def loss(self, params):
        return self._loss_grad(params, slice(None))[0]


class Rosenbrock(Problem):
    """``scipy.optimize.rosen`` in 10-D, float64, full gradient (minimum 0 at all ones)."""

    name = "rosenbrock"
    steps = 2000

    def __init__(self, n=10):
        self.n = n
        self.summary = f"scipy.optimize.rosen, {n}-D, float64, exact gradient, from x = 0"

    def config(self):
        import adamnp

        return adamnp.adamw(lr=3e-3, weight_decay=0.0)

    def params0(self):
        return np.zeros(self.n)

    def grad(self, params, t):
        from scipy.optimize import rosen_der

        return rosen_der(params)

    def loss(self, params):
        from scipy.optimize import rosen

        return float(rosen(params))


class MLP(Problem):
    """One hidden layer (tanh), softmax output, manual backprop; labels from a teacher net."""

    name = "mlp"
    steps = 600

    def __init__(self, n=4000, d=32, hidden=256, k=10, batch=100, seed=0):
        rng = np.random.default_rng(seed + 10)
        self.x = rng.standard_normal((n, d)).astype(F32)
        t1 = rng.standard_normal((d, 64)) / np.sqrt(d)
        t2 = rng.standard_normal((64, k)) / np.sqrt(64)
        self.y = np.argmax(np.tanh(self.x @ t1) @ t2, axis=1)
        self.shape = (d, hidden, k)
        self.batches = _Minibatches(n, batch, seed + 11)
        self.summary = (
            f"{d} -> {hidden} (tanh) -> {k} classifier of a random teacher net, {n} samples, "
            f"float32, batch {batch}; W1 has {d * hidden} elements"
        )

    def config(self):
        import adamnp

        return adamnp.adamw(lr=3e-3, weight_decay=1e-2)

    def params0(self):
        d, h, k = self.shape
        rng = np.random.default_rng(12)
        return {
            "W1": (rng.standard_normal((d, h)) / np.sqrt(d)).astype(F32),
            "b1": np.zeros(h, F32),
            "W2": (rng.standard_normal((h, k)) / np.sqrt(h)).astype(F32),
            "b2": np.zeros(k, F32),
        }

    def _loss_grad(self, params, idx):
        x, y = self.x[idx], self.y[idx]
        a = np.tanh(x @ params["W1"] + params["b1"])
        loss, dz = _softmax_xent(a @ params["W2"] + params["b2"], y)
        da = (dz @ params["W2"].T) * (F32(1) - a * a)
        grads = {"W1": x.T @ da, "b1": da.sum(axis=0), "W2": a.T @ dz, "b2": dz.sum(axis=0)}
        return loss, grads

    def grad(self, params, t):
        return self._loss_grad(params, self.batches(t))[1]

    def loss(self, params):
        return self._loss_grad(params, slice(None))[0]


PROBLEMS = {cls.name: cls for cls in (Logistic, Rosenbrock, MLP)}
