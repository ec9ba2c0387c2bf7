"""adamnp.scipy.adam_method through scipy.optimize.minimize, on problems with known minima."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy.optimize import OptimizeResult, minimize, rosen, rosen_der

import adamnp
from adamnp.scipy import adam_method


def quadratic(x, a, c):
    """f = 0.5 * sum(a * (x - c)**2) and its gradient; minimum at c."""
    r = x - c
    return 0.5 * float(np.sum(a * r * r)), a * r


A = np.array([1.0, 4.0, 0.5, 2.0])
C = np.array([1.0, -2.0, 3.0, 0.5])


def test_rosenbrock_10d_reaches_ones():
    res = minimize(
        rosen,
        np.zeros(10),
        jac=rosen_der,
        method=adam_method,
        options={"lr": 3e-3, "maxiter": 5000, "gtol": 1e-6},
    )
    assert isinstance(res, OptimizeResult)
    assert res.success and res.status == 0
    assert_allclose(res.x, np.ones(10), atol=1e-5)
    assert res.fun == rosen(res.x)
    assert_allclose(res.jac, rosen_der(res.x))
    assert np.linalg.norm(res.jac) <= 1e-6
    assert res.nfev == res.njev == res.nit + 1


def test_quadratic_with_args_and_jac_true():
    res = minimize(
        quadratic, np.zeros(4), args=(A, C), jac=True, method=adam_method, options={"lr": 0.05}
    )
    assert res.success, res.message
    assert_allclose(res.x, C, atol=1e-4)
    # jac=True: scipy memoizes (f, g); every iteration costs one call of the user's function.
    assert res.nfev == res.nit + 1


def test_direct_call_with_jac_true_matches_minimize():
    direct = adam_method(quadratic, np.zeros(4), args=(A, C), jac=True, lr=0.05, maxiter=50)
    via = minimize(
        quadratic,
        np.zeros(4),
        args=(A, C),
        jac=True,
        method=adam_method,
        options={"lr": 0.05, "maxiter": 50},
    )
    assert_allclose(direct.x, via.x, rtol=0, atol=0)
    assert direct.nit == via.nit == 50


def test_same_path_as_the_adamnp_api():
    x = np.zeros(4)
    state = adamnp.init(x, adamnp.adamw(lr=0.05, weight_decay=0.01), backend="numpy")
    for _ in range(30):
        adamnp.step(x, quadratic(x, A, C)[1], state)
    res = minimize(
        quadratic,
        np.zeros(4),
        args=(A, C),
        jac=True,
        method=adam_method,
        options={"lr": 0.05, "weight_decay": 0.01, "maxiter": 30, "gtol": 0},
    )
    assert_allclose(res.x, x, rtol=0, atol=0)


def test_maxiter_is_respected():
    res = minimize(rosen, np.zeros(5), jac=rosen_der, method=adam_method, options={"maxiter": 7})
    assert not res.success
    assert res.status == 1
    assert res.nit == 7
    assert res.message == "Maximum number of iterations has been exceeded."
    assert res.fun == rosen(res.x)


def test_minimize_tol_sets_gtol():
    loose = minimize(quadratic, np.zeros(4), (A, C), jac=True, method=adam_method, tol=1e-1,
                     options={"lr": 0.05})  # fmt: skip
    tight = minimize(quadratic, np.zeros(4), (A, C), jac=True, method=adam_method, tol=1e-6,
                     options={"lr": 0.05})  # fmt: skip
    assert loose.success and tight.success
    assert loose.nit < tight.nit
    assert np.linalg.norm(loose.jac) <= 1e-1


def test_ftol_stops_early_with_success():
    res = minimize(
        quadratic, np.zeros(4), (A, C), jac=True, method=adam_method,
        options={"lr": 0.05, "ftol": 1e-3, "gtol": 0},
    )  # fmt: skip
    assert res.success and res.status == 0
    assert res.nit < 1000


def test_already_optimal_takes_no_step():
    res = minimize(quadratic, C.copy(), (A, C), jac=True, method=adam_method)
    assert res.success and res.nit == 0 and res.nfev == 1
    assert_allclose(res.x, C)


@pytest.mark.parametrize("style", ["new", "legacy"])
def test_callback_styles_and_stop_iteration(style):
    seen = []
    if style == "new":

        def callback(intermediate_result):
            assert isinstance(intermediate_result, OptimizeResult)
            seen.append(intermediate_result.x)
            assert intermediate_result.fun == quadratic(intermediate_result.x, A, C)[0]
            if intermediate_result.nit == 5:
                raise StopIteration

    else:

        def callback(xk):
            seen.append(xk)
            if len(seen) == 5:
                raise StopIteration

    res = minimize(quadratic, np.zeros(4), (A, C), jac=True, method=adam_method, callback=callback)
    assert len(seen) == 5
    assert res.nit == 5
    assert not res.success and res.status == 99
    assert res.message == "`callback` raised `StopIteration`."
    assert_allclose(seen[-1], res.x, rtol=0, atol=0)
    assert seen[0] is not seen[1]  # copies, not the array being optimized


def test_float32_x0_stays_float32_and_ints_become_float64():
    res32 = minimize(
        quadratic, np.zeros(4, np.float32), (A, C), jac=True, method=adam_method,
        options={"lr": 0.05, "gtol": 1e-3},
    )  # fmt: skip
    assert res32.x.dtype == np.float32 and res32.jac.dtype == np.float32
    assert res32.success
    res64 = minimize(
        quadratic, [0, 0, 0, 0], (A, C), jac=True, method=adam_method, options={"lr": 0.05}
    )
    assert res64.x.dtype == np.float64


def test_nonfinite_gradient_stops_with_status_2():
    def fun(x):
        return float(np.sum(x)), np.full_like(x, np.nan)

    res = minimize(fun, np.zeros(3), jac=True, method=adam_method)
    assert not res.success and res.status == 2 and res.nit == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bounds": [(0, 1)] * 4}, "bounds"),
        ({"constraints": [{"type": "eq", "fun": lambda x: x[0]}]}, "constraints"),
        ({"jac": None}, "gradient"),
        ({"jac": "2-point"}, "gradient"),  # scipy turns it into None
    ],
)
def test_rejected_arguments(kwargs, match):
    kwargs.setdefault("jac", True)
    with pytest.raises(ValueError, match=match):
        minimize(quadratic, np.zeros(4), (A, C), method=adam_method, **kwargs)


def test_direct_call_rejects_finite_differences():
    with pytest.raises(ValueError, match="not supported"):
        adam_method(rosen, np.zeros(3), jac="2-point")


def test_unknown_option_and_bad_gradient_shape():
    with pytest.raises(TypeError, match="unknown option"):
        minimize(quadratic, np.zeros(4), (A, C), jac=True, method=adam_method,
                 options={"learning_rate": 0.1})  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        minimize(lambda x: (0.0, np.ones(3)), np.zeros(4), jac=True, method=adam_method)


def test_hess_is_ignored_with_a_warning():
    with pytest.warns(RuntimeWarning, match="hess"):
        res = minimize(
            quadratic, np.zeros(4), (A, C), jac=True, hess=lambda x, *a: np.diag(A),
            method=adam_method, options={"maxiter": 2},
        )  # fmt: skip
    assert res.nit == 2


def test_x0_must_be_one_dimensional_as_minimize_requires():
    # scipy.optimize.minimize refuses a 2-D x0 before it calls the method; a direct call
    # refuses it too, with a message that says what to do, instead of optimizing a 2-D array
    def fun(x):
        return float(np.sum(x * x)), 2 * x

    x0 = np.ones((2, 3))
    with pytest.raises(ValueError, match="dimension"):
        minimize(fun, x0, jac=True, method=adam_method)
    with pytest.raises(ValueError, match=r"1-D.*\(2, 3\).*ravel"):
        adam_method(fun, x0, jac=True)
    # the documented way: a flat x0, reshaped inside fun; x keeps the flat shape
    res = minimize(fun, x0.ravel(), jac=True, method=adam_method, options={"lr": 0.1})
    assert res.success and res.x.shape == (6,)
    # a scalar is a 1-element vector on both paths
    for result in (
        minimize(fun, 3.0, jac=True, method=adam_method, options={"maxiter": 2}),
        adam_method(fun, 3.0, jac=True, maxiter=2),
    ):
        assert result.x.shape == (1,) and result.nit == 2


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_minimize_calls_fun_once_per_point_and_keeps_gradients_apart(backend):
    """minimize(jac=True) wraps fun in scipy's MemoizeJac; adam_method calls the user's fun
    once per point, and a gradient returned as the same array every time (or as the x it
    was given) is used as it is without ever aliasing the iterate."""
    calls = []
    buffer = np.zeros(3)

    def fun(x):
        calls.append(x.copy())
        np.multiply(x, 2.0, out=buffer)  # the same array every call
        return float(x @ x), buffer

    res = minimize(
        fun, np.array([1.0, -2.0, 0.5]), jac=True, method=adam_method,
        options={"lr": 0.05, "maxiter": 40, "backend": backend},
    )  # fmt: skip
    assert len(calls) == res.nit + 1 == res.nfev == res.njev
    assert res.jac is not buffer and np.array_equal(res.jac, 2 * res.x)
    same = minimize(
        lambda x: (float(x @ x) / 2, x), np.array([1.0, -2.0, 0.5]), jac=True,
        method=adam_method, options={"lr": 0.05, "maxiter": 40, "backend": backend},
    )  # fmt: skip
    assert same.nit == 40 and np.all(np.abs(same.x) < np.abs([1.0, -2.0, 0.5]))
