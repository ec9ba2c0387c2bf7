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
