"""Adam/AdamW as a :func:`scipy.optimize.minimize` method.

``scipy.optimize.minimize`` accepts a callable as ``method``; :func:`adam_method` is one. It runs
plain full-batch Adam or AdamW on ``x`` with the adamnp backends and returns an
:class:`~scipy.optimize.OptimizeResult`, so it slots into code written for scipy's optimizers:

>>> import numpy as np, scipy.optimize
>>> from adamnp.scipy import adam_method
>>> res = scipy.optimize.minimize(
...     lambda x: (float(x @ x), 2 * x), np.array([3.0, -4.0]), jac=True,
...     method=adam_method, options={"lr": 0.1, "maxiter": 2000, "gtol": 1e-6})
>>> res.success, bool(np.allclose(res.x, 0, atol=1e-6))
(True, True)

Adam is a first-order method without line search: it needs a gradient (``jac=True`` or a
callable) and a learning rate that suits the problem. For smooth deterministic problems
scipy's L-BFGS-B usually needs far fewer evaluations; this method is for comparing against
Adam, for objectives whose gradients are noisy, and for code that already speaks scipy.
"""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
from scipy.optimize import OptimizeResult

__all__ = ["adam_method"]

_MESSAGES = {
    0: "Optimization terminated successfully.",
    1: "Maximum number of iterations has been exceeded.",
    2: "NaN or Inf encountered in the objective or its gradient.",
    99: "`callback` raised `StopIteration`.",
}


def _takes_intermediate_result(callback) -> bool:
    """Whether ``callback`` uses scipy's new style, ``callback(intermediate_result)``."""
    try:
        params = inspect.signature(callback).parameters
    except (TypeError, ValueError):
        return False
    return set(params) == {"intermediate_result"}


class _FunAndGrad:
    """Counts evaluations; ``jac=True`` means ``fun`` returns ``(f, g)`` and is called once."""

    def __init__(self, fun, jac, args):
        if jac is None or jac is False:
            raise ValueError(
                "adam_method needs the gradient: pass jac=True (fun returns (f, g)) or jac=callable"
            )
        if not (jac is True or callable(jac)):
            raise ValueError(
                f"jac={jac!r} is not supported by adam_method: pass jac=True or a callable "
                "(finite differences are not offered: Adam would amplify their noise)"
            )
        owner = getattr(jac, "__self__", None)
        if owner is not None and owner is fun and callable(getattr(owner, "fun", None)):
            # minimize(..., jac=True) wraps fun in scipy's MemoizeJac and passes its bound
            # `derivative` as jac; calling the wrapped fun once per point skips the wrapper's
            # comparison and copy of x on every call (most of a small problem's iteration)
            fun, jac = owner.fun, True
        self.fun, self.jac, self.args = fun, jac, args
        self.nfev = self.njev = 0

    def __call__(self, x):
        """``(f, g)`` at ``x`` (a private copy is passed to the user's functions; ``g`` is
        theirs unless it needs converting)."""
        if self.jac is True:
            out = self.fun(x.copy(), *self.args)
            try:
                f, g = out
            except (TypeError, ValueError):
                raise ValueError("with jac=True, fun must return a pair (f, gradient)") from None
            self.nfev += 1
            self.njev += 1
        else:
            f = self.fun(x.copy(), *self.args)
            self.nfev += 1
            g = self.jac(x.copy(), *self.args)
            self.njev += 1
        if type(f) is not float:
            f = float(np.asarray(f).reshape(()))
        # x itself never reaches the user's code, so a gradient that is already a C-contiguous
        # ndarray of x's dtype cannot share x's memory and is stepped with as it is
        if not (type(g) is np.ndarray and g.dtype == x.dtype and g.flags.c_contiguous):
            g = np.array(g, dtype=x.dtype, order="C", copy=True)
        if g.shape != x.shape:
            raise ValueError(f"the gradient has shape {g.shape}, expected {x.shape} (as x0)")
        return f, g


def adam_method(
    fun,
    x0,
    args=(),
    jac=None,
    hess=None,
    hessp=None,
    bounds=None,
    constraints=(),
    callback=None,
    *,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    decoupled=True,
    amsgrad=False,
    maxiter=1000,
    gtol=None,
    ftol=None,
    tol=None,
    backend="numpy",
    state_bits=32,
    disp=False,
    **unknown,
):
    r"""Minimize ``fun`` with Adam/AdamW; a ``method`` for :func:`scipy.optimize.minimize`.

    Pass it as ``minimize(fun, x0, jac=True, method=adam_method, options={...})``; the keyword
    arguments after ``callback`` are the ``options``. It can also be called directly with the
    same arguments.

    Parameters
    ----------
    fun : callable
        ``fun(x, *args) -> float``, or ``-> (float, gradient)`` when ``jac=True``.
    x0 : array_like, shape (n,)
        Starting point, 1-D (a scalar becomes shape ``(1,)``), as
        :func:`scipy.optimize.minimize` requires: it raises ``ValueError`` for other shapes
        before calling the method, and so does a direct call. For an N-D parameter pass
        ``x0.ravel()`` and reshape inside ``fun``. ``res.x`` has shape ``(n,)``; it is
        float64, unless ``x0`` is float32 (kept float32).
    args : tuple
        Extra arguments for ``fun`` and ``jac``.
    jac : True or callable
        ``True`` when ``fun`` returns the gradient too, or ``jac(x, *args) -> gradient``.
        Adam needs a gradient; anything else raises ``ValueError``.
    hess, hessp : ignored
        Not used by Adam; a ``RuntimeWarning`` says so when given.
    bounds, constraints : must be None / empty
        Adam is unconstrained; bounds or constraints raise ``ValueError``.
    callback : callable, optional
        Called after every step, scipy-style: ``callback(intermediate_result)`` (an
        ``OptimizeResult`` with ``x``, ``fun``, ``jac``, ``nit``), when its only parameter is
        named ``intermediate_result``, else the legacy ``callback(xk)``. Raising
        ``StopIteration`` stops the run (``status`` 99, ``success`` False).
    lr, betas, eps, weight_decay, amsgrad
        As in :func:`adamnp.adamw`; ``lr`` may be a schedule ``lr(count) -> float``.
        Defaults: ``1e-3``, ``(0.9, 0.999)``, ``1e-8``, ``0``, ``False``.
    decoupled : bool, default True
        True: AdamW's decoupled decay ``x *= 1 - lr * weight_decay``; False: Adam with the L2
        term ``g += weight_decay * x``. Irrelevant when ``weight_decay`` is 0.
    maxiter : int, default 1000
        Maximum number of Adam steps.
    gtol : float, default 1e-5
        Stop with success when the Euclidean norm of the gradient is ``<= gtol``.
        ``minimize(..., tol=t)`` sets it to ``t`` unless ``gtol`` is given too.
    ftol : float, optional
        Also stop with success when ``|f_prev - f| <= ftol * max(|f_prev|, |f|, 1)`` after a
        step. Off by default: Adam's steps do not decrease ``f`` monotonically.
    tol : float, optional
        What ``minimize(..., tol=...)`` passes on; see ``gtol``.
    backend : {"numpy", "numba", "auto"}, default "numpy"
        The adamnp backend. ``"numba"`` takes several times less per iteration (small
        vectors go through its one-call small step), after compiling its kernel once per
        machine, which takes seconds (cached on disk); the NumPy reference starts at once.
        docs/backends.md has the measurements.
    state_bits : {32, 8}, default 32
        8-bit moments apply to float32 ``x`` with at least 4096 elements (see
        :func:`adamnp.init`).
    disp : bool, default False
        Print the final message and counts.

    Returns
    -------
    OptimizeResult
        ``x``, ``fun``, ``jac`` (at ``x``), ``nit`` (steps taken), ``nfev``, ``njev``,
        ``success``, ``status`` (0 converged, 1 ``maxiter`` reached, 2 NaN/Inf, 99 stopped by
        the callback) and ``message``.

    Notes
    -----
    Each iteration evaluates ``f`` and ``g`` at the current ``x``, checks the stopping rules,
    then takes one Adam step (see :func:`adamnp.adam` for the update). The returned ``fun`` and
    ``jac`` belong to the returned ``x``. Evaluations of ``fun`` receive a copy of ``x``.

    References
    ----------
    D. P. Kingma and J. Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.

    Examples
    --------
    The 5-D Rosenbrock function (minimum at all ones) from the origin:

    >>> import numpy as np
    >>> from scipy.optimize import minimize, rosen, rosen_der
    >>> from adamnp.scipy import adam_method
    >>> res = minimize(rosen, np.zeros(5), jac=rosen_der, method=adam_method,
    ...                options={"lr": 3e-3, "maxiter": 5000, "gtol": 1e-6})
    >>> res.success, res.message
    (True, 'Optimization terminated successfully.')
    >>> res.x.round(5)
    array([1., 1., 1., 1., 1.])
    >>> res.nit, res.nfev, res.njev
    (1214, 1215, 1215)
    """
    import adamnp

    if unknown:
        raise TypeError(
            f"adam_method got unknown option(s) {sorted(unknown)}; options are lr, betas, eps, "
            "weight_decay, decoupled, amsgrad, maxiter, gtol, ftol, backend, state_bits, disp"
        )
    if bounds is not None:
        raise ValueError("adam_method does not support bounds; Adam is unconstrained")
    if constraints is not None and len(constraints) > 0:
        raise ValueError("adam_method does not support constraints; Adam is unconstrained")
    if hess is not None or hessp is not None:
        warnings.warn("adam_method does not use hess or hessp", RuntimeWarning, stacklevel=2)
    if gtol is None:
        gtol = 1e-5 if tol is None else tol
    if isinstance(maxiter, bool) or not isinstance(maxiter, (int, np.integer)) or maxiter < 0:
        raise ValueError(f"maxiter must be an int >= 0, got {maxiter!r}")
    gtol = float(gtol)
    if not gtol >= 0:
        raise ValueError(f"gtol must be >= 0, got {gtol}")
    if args is None:
        args = ()
    elif not isinstance(args, tuple):
        args = (args,)

    x0 = np.atleast_1d(np.asarray(x0))
    if x0.ndim != 1:  # what minimize() checks before calling a method; direct calls alike
        raise ValueError(
            f"x0 must be 1-D, as scipy.optimize.minimize requires; got shape {x0.shape}: "
            "pass x0.ravel() and reshape inside fun"
        )
    dtype = np.float32 if x0.dtype == np.float32 else np.float64
    x = np.array(x0, dtype=dtype, order="C", copy=True)
    make = adamnp.adamw if decoupled else adamnp.adam
    config = make(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
    state = adamnp.init(x, config, backend=backend, state_bits=state_bits)
    evaluate = _FunAndGrad(fun, jac, args)
    new_style = callback is not None and _takes_intermediate_result(callback)

    f, g = evaluate(x)
    nit = 0
    while True:
        g64 = g.astype(np.float64, copy=False)
        gnorm = math.sqrt(float(np.dot(g64, g64)))  # np.linalg.norm's value, without its checks
        if not (math.isfinite(f) and math.isfinite(gnorm)):
            status = 2
            break
        if gnorm <= gtol:
            status = 0
            break
        if nit >= maxiter:
            status = 1
            break
        adamnp.step(x, g, state)
        nit += 1
        f_prev = f
        f, g = evaluate(x)
        if callback is not None:
            try:
                if new_style:
                    callback(
                        intermediate_result=OptimizeResult(x=x.copy(), fun=f, jac=g.copy(), nit=nit)
                    )
                else:
                    callback(x.copy())
            except StopIteration:
                status = 99
                break
        if ftol is not None and abs(f_prev - f) <= ftol * max(abs(f_prev), abs(f), 1.0):
            status = 0
            break

    result = OptimizeResult(
        x=x,
        fun=f,
        jac=g.copy(),  # not the user's own array
        nit=nit,
        nfev=evaluate.nfev,
        njev=evaluate.njev,
        status=status,
        success=status == 0,
        message=_MESSAGES[status],
    )
    if disp:
        print(
            f"{result.message}\n         Current function value: {f:.6g}\n"
            f"         Iterations: {nit}\n         Function evaluations: {evaluate.nfev}\n"
            f"         Gradient evaluations: {evaluate.njev}"
        )
    return result
