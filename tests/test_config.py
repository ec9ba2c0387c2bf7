"""Configuration validation: every bad hyperparameter is named in a clear error."""

import math

import numpy as np
import pytest

import adamnp


@pytest.mark.parametrize("make", [adamnp.adam, adamnp.adamw])
@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"lr": -1e-3}, ValueError, "lr"),
        ({"lr": math.nan}, ValueError, "lr"),
        ({"lr": "fast"}, TypeError, "lr"),
        ({"betas": (1.0, 0.999)}, ValueError, "betas[0]"),
        ({"betas": (0.9, -0.1)}, ValueError, "betas[1]"),
        ({"betas": 0.9}, TypeError, "betas"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"amsgrad": 1}, TypeError, "amsgrad"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
        ({"weight_dacay": 0.1}, TypeError, "did you mean 'weight_decay'"),
    ],
)
def test_bad_options_are_named(make, kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        make(**kwargs)


def test_config_is_immutable():
    cfg = adamnp.adamw()
    with pytest.raises(AttributeError):
        cfg.lr = 1.0


def test_torch_defaults():
    assert adamnp.adam().weight_decay == 0.0
    assert adamnp.adamw().weight_decay == 0.01
    assert adamnp.adamw().betas == (0.9, 0.999)
    assert adamnp.adamw().eps == 1e-8


@pytest.mark.parametrize("bad", [math.nan, -0.5, math.inf])
def test_schedule_values_are_checked(bad):
    cfg = adamnp.adamw(lr=lambda count: bad)
    with pytest.raises(ValueError, match="lr schedule returned"):
        cfg.lr_at(0)


def test_schedule_receives_completed_steps():
    seen = []
    cfg = adamnp.adam(lr=lambda count: seen.append(count) or 0.1)
    assert cfg.lr_at(7) == 0.1
    assert seen == [7]


@pytest.mark.parametrize("make", [adamnp.adam, adamnp.adamw])
def test_options_are_the_config_fields(make):
    """adam() and adamw() take exactly the fields of AdamConfig but ``decoupled``."""
    import dataclasses
    import inspect

    from adamnp._config import OPTION_NAMES

    fields = [f.name for f in dataclasses.fields(adamnp.AdamConfig)]
    assert OPTION_NAMES == tuple(n for n in fields if n != "decoupled")
    assert tuple(inspect.signature(make).parameters) == (*OPTION_NAMES, "unknown")
    cfg = make(lr=0.5, betas=[0.5, 0.75], eps=1, amsgrad=True, max_grad_norm=2)
    got = (cfg.lr, cfg.betas, cfg.eps, cfg.amsgrad, cfg.max_grad_norm)
    assert got == (0.5, (0.5, 0.75), 1.0, True, 2.0)
    assert cfg.decoupled == (make is adamnp.adamw)


def test_unknown_option_lists_the_options():
    with pytest.raises(TypeError) as info:
        adamnp.adam(betas1=0.9)
    assert str(info.value) == (
        "unknown option 'betas1'; did you mean 'betas'? Options are: lr, betas, eps, "
        "weight_decay, amsgrad, maximize, nonfinite, max_grad_norm, param_rounding"
    )


def test_first_bad_option_is_reported_in_signature_order():
    with pytest.raises(ValueError, match=r"^lr"):
        adamnp.adamw(lr=-1.0, eps=-1.0, amsgrad=1)
    with pytest.raises(TypeError, match=r"^amsgrad"):
        adamnp.adamw(amsgrad=1, maximize=1)


NUMPY_NONFINITE = [np.float32("nan"), np.float64("inf"), np.float16("-inf"), np.longdouble("nan")]


@pytest.mark.parametrize("make", [adamnp.adam, adamnp.adamw])
@pytest.mark.parametrize("bad", NUMPY_NONFINITE, ids=repr)
@pytest.mark.parametrize(
    ("option", "build"),
    [
        ("lr", lambda x: {"lr": x}),
        ("eps", lambda x: {"eps": x}),
        ("weight_decay", lambda x: {"weight_decay": x}),
        ("max_grad_norm", lambda x: {"max_grad_norm": x}),
        ("betas[0]", lambda x: {"betas": (x, 0.999)}),
        ("betas[1]", lambda x: {"betas": (0.9, x)}),
    ],
)
def test_numpy_scalars_are_checked_like_python_numbers(make, bad, option, build):
    escaped = option.replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=rf"^{escaped} must be finite"):
        make(**build(bad))


@pytest.mark.parametrize("make", [adamnp.adam, adamnp.adamw])
def test_numpy_scalars_are_accepted_and_stored_as_floats(make):
    cfg = make(lr=np.float32(0.5), betas=(np.float64(0.5), np.float16(0.75)), eps=np.int64(0),
               weight_decay=np.float32(0.25), max_grad_norm=np.uint8(3))  # fmt: skip
    values = (cfg.lr, *cfg.betas, cfg.eps, cfg.weight_decay, cfg.max_grad_norm)
    assert values == (0.5, 0.5, 0.75, 0.0, 0.25, 3.0)
    assert all(type(v) is float for v in values)
    with pytest.raises(ValueError, match=r"^lr must be >= 0"):
        make(lr=np.float32(-1))
    with pytest.raises(TypeError, match=r"^lr must be a real number, got bool"):
        make(lr=np.True_)
    with pytest.raises(TypeError, match=r"^eps must be a real number, got bool"):
        make(eps=True)


@pytest.mark.parametrize("huge", [10**400, -(10**400), 10**309])
@pytest.mark.parametrize("option", ["lr", "eps", "weight_decay", "max_grad_norm"])
def test_integers_too_large_for_a_float_name_the_option(huge, option):
    with pytest.raises(ValueError, match=rf"^{option} must be finite, got an integer too large"):
        adamnp.adamw(**{option: huge})


@pytest.mark.parametrize("bad", ["0.1", True, False, np.True_, b"0.1", None, [0.1], 1j])
def test_schedule_values_must_be_numbers(bad):
    cfg = adamnp.adamw(lr=lambda count: bad)
    with pytest.raises(TypeError, match=r"^lr schedule returned .* at step count 3; expected"):
        cfg.lr_at(3)


@pytest.mark.parametrize(
    ("value", "want"),
    [(np.float32(0.5), 0.5), (np.int64(2), 2.0), (1, 1.0), (np.array(0.25), 0.25)],
    ids=repr,
)
def test_schedule_values_may_be_numpy_numbers(value, want):
    got = adamnp.adamw(lr=lambda count: value).lr_at(0)
    assert got == want and type(got) is float


@pytest.mark.parametrize("bad", [np.float32("nan"), np.float64("inf"), 10**400])
def test_schedule_nonfinite_numpy_values_are_refused(bad):
    with pytest.raises(ValueError, match=r"^lr schedule returned .* at step count 0"):
        adamnp.adamw(lr=lambda count: bad).lr_at(0)


def test_param_rounding_is_checked():
    assert adamnp.adamw().param_rounding == "nearest"
    assert adamnp.adam(param_rounding="stochastic").param_rounding == "stochastic"
    with pytest.raises(ValueError, match=r"param_rounding must be one of \('nearest', 'stoch"):
        adamnp.adamw(param_rounding="up")
