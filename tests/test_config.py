"""Configuration validation: every bad hyperparameter is named in a clear error."""

import math

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
        "weight_decay, amsgrad, maximize, nonfinite, max_grad_norm"
    )


def test_first_bad_option_is_reported_in_signature_order():
    with pytest.raises(ValueError, match=r"^lr"):
        adamnp.adamw(lr=-1.0, eps=-1.0, amsgrad=1)
    with pytest.raises(TypeError, match=r"^amsgrad"):
        adamnp.adamw(amsgrad=1, maximize=1)
