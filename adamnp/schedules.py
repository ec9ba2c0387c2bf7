"""Learning-rate schedules.

A schedule is a callable ``f(count) -> float``. ``count`` is the number of optimizer steps already
completed (0 for the first step), the convention of optax; the optimizer evaluates ``f(count)``
just before it applies step ``count + 1``. Every schedule here is a small frozen dataclass: it is
immutable, hashable, picklable, compares by value, has a readable ``repr``, and always returns a
plain Python ``float``. Arguments are checked once, on construction: a bad one raises
``ValueError`` (or ``TypeError`` for a wrong type) that names it.

Any other callable with the same signature works as a schedule too; these cover the common cases:

- `constant` -- the same value at every step.
- `linear` -- a straight line from ``init`` to ``end`` over ``steps`` counts, then ``end``.
- `warmup_cosine` -- linear warmup to ``peak``, half-cosine decay to ``end``, then ``end``.
- `exponential` -- ``init * rate ** (count / steps)``, optionally stepwise, floored at ``end``.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

__all__ = [
    "Constant",
    "Exponential",
    "Linear",
    "WarmupCosine",
    "constant",
    "exponential",
    "linear",
    "warmup_cosine",
]


def _real(name: str, value: object) -> float:
    """``value`` as a finite Python float, or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out!r}")
    return out


def _rate(name: str, value: object) -> float:
    """A learning-rate value: finite and >= 0."""
    out = _real(name, value)
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {out!r}")
    return out


def _clip(value: float, a: float, b: float) -> float:
    """``value`` clipped to the closed interval between ``a`` and ``b`` (in either order)."""
    return min(max(value, min(a, b)), max(a, b))


def _count(name: str, value: object, *, minimum: int = 0) -> int:
    """``value`` as a Python int >= ``minimum``, or raise naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


@dataclass(frozen=True)
class Constant:
    """The schedule returned by `constant`; see there."""

    lr: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _rate("lr", self.lr))

    def __call__(self, count: int) -> float:
        _count("count", count)
        return self.lr


@dataclass(frozen=True)
class Linear:
    """The schedule returned by `linear`; see there."""

    init: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "init", _rate("init", self.init))
        object.__setattr__(self, "end", _rate("end", self.end))
        object.__setattr__(self, "steps", _count("steps", self.steps))

    def __call__(self, count: int) -> float:
        count = _count("count", count)
        if count >= self.steps:
            return self.end
        value = self.init + (self.end - self.init) * (count / self.steps)
        return _clip(value, self.init, self.end)


@dataclass(frozen=True)
class WarmupCosine:
    """The schedule returned by `warmup_cosine`; see there."""

    peak: float
    warmup_steps: int
    decay_steps: int
    end: float = 0.0
    init: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak", _rate("peak", self.peak))
        object.__setattr__(self, "warmup_steps", _count("warmup_steps", self.warmup_steps))
        object.__setattr__(self, "decay_steps", _count("decay_steps", self.decay_steps))
        object.__setattr__(self, "end", _rate("end", self.end))
        object.__setattr__(self, "init", _rate("init", self.init))

    def __call__(self, count: int) -> float:
        count = _count("count", count)
        warm, decay = self.warmup_steps, self.decay_steps
        if count < warm:
            value = self.init + (self.peak - self.init) * (count / warm)
            return _clip(value, self.init, self.peak)
        if count < warm + decay:
            if count == warm:
                return self.peak
            frac = (count - warm) / decay
            value = self.end + (self.peak - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))
            return _clip(value, self.end, self.peak)
        return self.end


@dataclass(frozen=True)
class Exponential:
    """The schedule returned by `exponential`; see there."""

    init: float
    rate: float
    steps: int
    staircase: bool = False
    end: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "init", _rate("init", self.init))
        rate = _real("rate", self.rate)
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {rate!r}")
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "steps", _count("steps", self.steps, minimum=1))
        if not isinstance(self.staircase, bool):
            raise TypeError(f"staircase must be a bool, got {type(self.staircase).__name__}")
        end = _rate("end", self.end)
        if end > self.init:
            raise ValueError(f"end must be <= init ({self.init!r}), got {end!r}")
        object.__setattr__(self, "end", end)

    def __call__(self, count: int) -> float:
        count = _count("count", count)
        exponent = count // self.steps if self.staircase else count / self.steps
        return max(self.end, self.init * self.rate**exponent)


def constant(lr: float) -> Constant:
    """Return a schedule that is ``lr`` at every step.

    Parameters
    ----------
    lr : float
        The learning rate; finite and >= 0.

    Returns
    -------
    Constant
        A frozen callable ``f(count) -> float``.

    Raises
    ------
    ValueError
        If ``lr`` is negative or not finite.

    Examples
    --------
    >>> from adamnp.schedules import constant
    >>> f = constant(1e-3)
    >>> f
    Constant(lr=0.001)
    >>> f(0), f(10_000)
    (0.001, 0.001)
    """
    return Constant(lr)


def linear(init: float, end: float, steps: int) -> Linear:
    """Return a schedule that moves linearly from ``init`` to ``end``, then stays at ``end``.

    ``f(count) = init + (end - init) * count / steps`` for ``count < steps`` and ``end`` from
    ``count = steps`` on. With ``steps = 0`` the schedule is ``end`` from the start. Computed
    values are clipped to the interval between ``init`` and ``end``, so rounding never makes the
    schedule overshoot or lose monotonicity.

    Parameters
    ----------
    init : float
        Value at ``count = 0``; finite and >= 0.
    end : float
        Value at ``count >= steps``; finite and >= 0. May be above ``init`` (a linear warmup).
    steps : int
        Number of counts the transition takes; >= 0.

    Returns
    -------
    Linear
        A frozen callable ``f(count) -> float``.

    Raises
    ------
    ValueError
        If ``init`` or ``end`` is negative or not finite, or ``steps`` is negative.
    TypeError
        If ``steps`` is not an integer.

    Examples
    --------
    >>> from adamnp.schedules import linear
    >>> f = linear(1.0, 0.0, steps=4)
    >>> [f(k) for k in range(6)]
    [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    return Linear(init, end, steps)


def warmup_cosine(
    peak: float,
    warmup_steps: int,
    decay_steps: int,
    end: float = 0.0,
    init: float = 0.0,
) -> WarmupCosine:
    """Return a linear-warmup, cosine-decay schedule.

    For ``count < warmup_steps`` the value rises linearly from ``init`` (at ``count = 0``) towards
    ``peak``; at ``count = warmup_steps`` it is ``peak``. Over the next ``decay_steps`` counts it
    follows a half cosine from ``peak`` down to ``end``::

        end + (peak - end) * (1 + cos(pi * (count - warmup_steps) / decay_steps)) / 2

    and from ``count = warmup_steps + decay_steps`` on it is ``end``. Unlike
    ``optax.warmup_cosine_decay_schedule``, ``decay_steps`` does not include the warmup.

    The value is exactly ``init``, ``peak`` and ``end`` at the three breakpoints (``peak`` only
    when ``decay_steps > 0``; otherwise the schedule drops to ``end`` at ``warmup_steps``), and
    computed values are clipped to the range of their segment, so rounding never makes the
    schedule overshoot ``peak`` or lose monotonicity within a segment.

    Parameters
    ----------
    peak : float
        Value at the end of the warmup; finite and >= 0.
    warmup_steps : int
        Length of the linear warmup in counts; >= 0 (0: start at ``peak``).
    decay_steps : int
        Length of the cosine decay in counts; >= 0 (0: drop to ``end`` after the warmup).
    end : float, default 0.0
        Final value; finite and >= 0.
    init : float, default 0.0
        Value at ``count = 0`` when there is a warmup; finite and >= 0.

    Returns
    -------
    WarmupCosine
        A frozen callable ``f(count) -> float``.

    Raises
    ------
    ValueError
        If a value is negative or not finite, or a step count is negative.
    TypeError
        If a step count is not an integer.

    Examples
    --------
    >>> from adamnp.schedules import warmup_cosine
    >>> f = warmup_cosine(peak=1.0, warmup_steps=2, decay_steps=4, end=0.5)
    >>> f
    WarmupCosine(peak=1.0, warmup_steps=2, decay_steps=4, end=0.5, init=0.0)
    >>> [round(f(k), 6) for k in range(8)]
    [0.0, 0.5, 1.0, 0.926777, 0.75, 0.573223, 0.5, 0.5]
    """
    return WarmupCosine(peak, warmup_steps, decay_steps, end, init)


def exponential(
    init: float,
    rate: float,
    steps: int,
    *,
    staircase: bool = False,
    end: float = 0.0,
) -> Exponential:
    """Return an exponential-decay schedule.

    ``f(count) = max(end, init * rate ** (count / steps))``: the value is multiplied by ``rate``
    every ``steps`` counts. With ``staircase=True`` the exponent is ``count // steps``, so the
    value drops in jumps.

    Parameters
    ----------
    init : float
        Value at ``count = 0``; finite and >= 0.
    rate : float
        Decay factor per ``steps`` counts; in (0, 1].
    steps : int
        Counts per factor ``rate``; >= 1.
    staircase : bool, default False
        Decay in whole multiples of ``steps``.
    end : float, default 0.0
        Lower bound of the value; finite, >= 0 and <= ``init``.

    Returns
    -------
    Exponential
        A frozen callable ``f(count) -> float``.

    Raises
    ------
    ValueError
        If ``init`` or ``end`` is negative or not finite, ``end > init``, ``rate`` is outside
        (0, 1], or ``steps < 1``.
    TypeError
        If ``steps`` is not an integer or ``staircase`` is not a bool.

    Examples
    --------
    >>> from adamnp.schedules import exponential
    >>> f = exponential(1.0, 0.5, steps=2)
    >>> [f(k) for k in (0, 2, 4, 6)]
    [1.0, 0.5, 0.25, 0.125]
    >>> g = exponential(1.0, 0.5, steps=2, staircase=True, end=0.2)
    >>> [g(k) for k in range(7)]
    [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.2]
    """
    return Exponential(init, rate, steps, staircase, end)
