"""Optimizer configuration: an immutable `AdamConfig` and the `adam` / `adamw` constructors."""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import numpy as np

from .lowbit.half import PARAM_ROUNDINGS

NONFINITE_POLICIES = ("raise", "skip", "propagate")


@dataclass(frozen=True)
class AdamConfig:
    """Hyperparameters of one Adam or AdamW optimizer (immutable).

    Build it with :func:`adam` or :func:`adamw`, which validate every field.

    Attributes
    ----------
    lr : float or callable
        Learning rate, or a schedule ``lr(count) -> float`` where ``count`` is the number of
        steps already taken (0 for the first step).
    betas : tuple of float
        ``(beta1, beta2)``, each in ``[0, 1)``.
    eps : float
        Added to ``sqrt(v_hat)`` (outside the square root).
    weight_decay : float
        Decay coefficient; how it is applied depends on ``decoupled``.
    decoupled : bool
        True for AdamW (``p *= 1 - lr * weight_decay``), False for Adam with an L2 term
        (``g += weight_decay * p``).
    amsgrad, maximize : bool
        As in ``torch.optim.Adam``.
    nonfinite : {"raise", "skip", "propagate"}
        What a step does when a gradient holds NaN, Inf or a value too large to square safely
        (magnitude >= 2**63 for float32, 2**480 for float64; docs/formulas.md).
    max_grad_norm : float or None
        If set, gradients are scaled so that their global L2 norm is at most this value.
    param_rounding : {"nearest", "stochastic"}
        How float16 and bfloat16 params are rounded after their float32 update (other dtypes
        ignore it).
    """

    lr: float | Callable[[int], float]
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    decoupled: bool
    amsgrad: bool
    maximize: bool
    nonfinite: str
    max_grad_norm: float | None
    param_rounding: str = "nearest"

    @property
    def name(self) -> str:
        """``"adamw"`` for decoupled weight decay, ``"adam"`` otherwise."""
        return "adamw" if self.decoupled else "adam"

    def lr_at(self, count: int) -> float:
        """Learning rate for the step taken after ``count`` completed steps.

        A schedule must return a real number (see :func:`adam`): ``TypeError`` naming the
        step count otherwise (a ``bool`` or a numeric string is not a learning rate), and
        ``ValueError`` when the value is negative or not finite.

        Examples
        --------
        >>> import adamnp
        >>> adamnp.adamw(lr=lambda count: 0.1 / (count + 1)).lr_at(1)
        0.05
        """
        if not callable(self.lr):
            return self.lr
        value = self.lr(count)
        real = _as_real(value)
        if real is None:
            raise TypeError(
                f"lr schedule returned {value!r} at step count {count}; expected a real number "
                "(int, float or a NumPy number; not a bool or a string)"
            )
        if not math.isfinite(real) or real < 0:
            shown = _describe_nonfinite(value, real) if not math.isfinite(real) else repr(value)
            raise ValueError(
                f"lr schedule returned {shown} at step count {count}; expected a finite value >= 0"
            )
        return real


#: The options of :func:`adam` and :func:`adamw`: every field of :class:`AdamConfig` except
#: ``decoupled``, which is which of the two functions built it (not an option).
OPTION_NAMES = tuple(f.name for f in fields(AdamConfig) if f.name != "decoupled")


def _as_real(value) -> float | None:
    """``value`` as a float if it is a real number, else None.

    Real numbers are ``int`` and ``float`` (not ``bool``), NumPy integer and floating scalars,
    other :class:`numbers.Real` types (``Fraction``) and 0-d NumPy arrays of those dtypes.
    Strings, ``bool`` and ``np.bool_`` are not numbers here. A value too large for a float
    gives ``inf`` (the caller reports it as not finite).
    """
    if type(value) is float:  # the common case, first
        return value
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, np.ndarray):
        if value.shape != () or value.dtype.kind not in "iuf":
            return None
        value = value[()]
    elif not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return math.inf if value > 0 else -math.inf


def _real(name: str, value) -> float:
    """``value`` as a finite float; ``TypeError`` / ``ValueError`` naming ``name`` otherwise.

    Examples
    --------
    >>> _real("eps", np.float32(0.5))
    0.5
    >>> _real("lr", np.float32("nan"))
    Traceback (most recent call last):
      ...
    ValueError: lr must be finite, got nan
    """
    real = _as_real(value)
    if real is None:
        kind = "bool" if isinstance(value, bool | np.bool_) else type(value).__name__
        raise TypeError(f"{name} must be a real number, got {kind}")
    if not math.isfinite(real):
        raise ValueError(f"{name} must be finite, got {_describe_nonfinite(value, real)}")
    return real


def _describe_nonfinite(value, real: float) -> str:
    if isinstance(value, int | np.integer):  # only an int can overflow a float
        return f"an integer too large for a float ({len(str(abs(int(value))))} digits)"
    return repr(real)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _make(decoupled: bool, args: dict) -> AdamConfig:
    """Validate the arguments of :func:`adam` / :func:`adamw` (``args``: their ``locals()``,
    one entry per option plus ``unknown``, the stray keywords) into an :class:`AdamConfig`."""
    options = {name: args[name] for name in OPTION_NAMES}
    unknown = args["unknown"]
    if unknown:
        name = sorted(unknown)[0]
        hint = difflib.get_close_matches(name, OPTION_NAMES, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise TypeError(f"unknown option {name!r}{extra} Options are: {', '.join(OPTION_NAMES)}")
    lr = options["lr"]
    if not callable(lr):
        lr = _real("lr", lr)
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
    betas = options["betas"]
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    b1, b2 = _real("betas[0]", b1), _real("betas[1]", b2)
    for i, b in enumerate((b1, b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
    eps = _real("eps", options["eps"])
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    weight_decay = _real("weight_decay", options["weight_decay"])
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    nonfinite = options["nonfinite"]
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    max_grad_norm = options["max_grad_norm"]
    if max_grad_norm is not None:
        max_grad_norm = _real("max_grad_norm", max_grad_norm)
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    if options["param_rounding"] not in PARAM_ROUNDINGS:
        raise ValueError(
            f"param_rounding must be one of {PARAM_ROUNDINGS}, got {options['param_rounding']!r}"
        )
    options.update(
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=_flag("amsgrad", options["amsgrad"]),
        maximize=_flag("maximize", options["maximize"]),
        max_grad_norm=max_grad_norm,
    )
    return AdamConfig(decoupled=decoupled, **options)


def adam(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    *,
    amsgrad=False,
    maximize=False,
    nonfinite="raise",
    max_grad_norm=None,
    param_rounding="nearest",
    **unknown,
) -> AdamConfig:
    r"""Adam with an L2 penalty folded into the gradient (``torch.optim.Adam`` semantics).

    Parameters
    ----------
    lr : float or callable, default 1e-3
        Learning rate ``>= 0``, or a schedule ``lr(count) -> float`` (``count`` = steps
        already taken; see :mod:`adamnp.schedules`). A schedule's value is checked at each
        step like a fixed ``lr``.
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the first and second moment, each in ``[0, 1)``.
    eps : float, default 1e-8
        Added to the bias-corrected ``sqrt(v)``, *outside* the square root.
    weight_decay : float, default 0
        L2 coefficient: ``g += weight_decay * p`` before the moments are updated.
    amsgrad : bool, default False
        Normalise by the running maximum of ``v`` (Reddi et al., 2018).
    maximize : bool, default False
        Ascend instead of descend (the gradient is negated first).
    nonfinite : {"raise", "skip", "propagate"}, default "raise"
        Non-finite gradients: raise before anything is modified, skip the whole step (counted in
        ``state.skipped_steps``), or compute as torch does and let NaN/Inf spread.
    max_grad_norm : float, optional
        Clip the gradients' global L2 norm to this value inside :func:`step`.
    param_rounding : {"nearest", "stochastic"}, default "nearest"
        How float16 and bfloat16 params are stored after their update, which is computed in
        float32: rounded to nearest (as torch does), or stochastically (up with probability
        equal to the distance from the value below, from a counter-based hash of the step and
        the element: the same on every backend and after a checkpoint), which keeps updates
        smaller than half a gap of the format from being lost (docs/mixed_precision.md).
        float32 and float64 params ignore it.

    Returns
    -------
    AdamConfig

    Raises
    ------
    TypeError
        An option of the wrong type. The numbers may be Python or NumPy numbers (or 0-d NumPy
        arrays), checked alike; a ``bool`` or a string is not a number.
    ValueError
        A number out of range or not finite (also an ``int`` too large for a float).

    Warnings
    --------
    This is Algorithm 1 of Kingma & Ba with eps outside the square root, as in PyTorch:
    ``p -= lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)``. Optax's ``adam`` uses
    the same placement; weight decay here is the *coupled* L2 form. Use :func:`adamw` for
    decoupled decay.

    Notes
    -----
    For step :math:`t` (1-based) with gradient :math:`g`:

    .. math::

        g &\leftarrow g + \lambda p \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        p &\leftarrow p - \frac{\eta}{1-\beta_1^t}\,
              \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    References
    ----------
    D. P. Kingma and J. Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.

    Examples
    --------
    >>> import adamnp
    >>> cfg = adamnp.adam(lr=1e-2, weight_decay=1e-4)
    >>> cfg.name, cfg.betas
    ('adam', (0.9, 0.999))
    """
    return _make(False, locals())


def adamw(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=1e-2,
    *,
    amsgrad=False,
    maximize=False,
    nonfinite="raise",
    max_grad_norm=None,
    param_rounding="nearest",
    **unknown,
) -> AdamConfig:
    r"""AdamW: Adam with decoupled weight decay (``torch.optim.AdamW`` semantics).

    Parameters are those of :func:`adam`, except that ``weight_decay`` (default ``1e-2``, as
    in PyTorch) shrinks the parameters directly, ``p *= 1 - lr * weight_decay``, before the
    Adam update; it never enters the moments.

    Returns
    -------
    AdamConfig

    Warnings
    --------
    The decay is multiplied by the learning rate (PyTorch's convention). Loshchilov & Hutter
    describe a decay scaled by a separate schedule multiplier; optax's ``adamw`` also multiplies
    by the learning rate. eps is outside the square root.

    Notes
    -----
    .. math::

        p &\leftarrow p\,(1 - \eta\lambda) \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \quad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        p &\leftarrow p - \frac{\eta}{1-\beta_1^t}\,
              \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    References
    ----------
    I. Loshchilov and F. Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.

    Examples
    --------
    >>> import adamnp
    >>> cfg = adamnp.adamw(lr=3e-4)
    >>> cfg.name, cfg.weight_decay
    ('adamw', 0.01)
    """
    return _make(True, locals())


#: Options of a whole step (all leaves together): equal in every label's config.
STEP_OPTIONS = ("nonfinite", "max_grad_norm")


def check_configs(configs) -> dict:
    """The mapping ``{label: AdamConfig}`` as a dict, checked: str labels, configs from
    :func:`adamnp.adam`/:func:`adamnp.adamw`, one value of each :data:`STEP_OPTIONS`."""
    if not isinstance(configs, Mapping):
        raise TypeError(
            "config must be an AdamConfig from adamnp.adam() or adamnp.adamw(), or a mapping "
            f"{{label: config}}, got {type(configs).__name__}"
        )
    if not configs:
        raise ValueError("config is an empty mapping: give at least one label")
    out = {}
    for label, cfg in configs.items():
        if not isinstance(label, str):
            raise TypeError(f"labels of configs must be str, got {label!r}")
        if not isinstance(cfg, AdamConfig):
            raise TypeError(
                f"config[{label!r}] must be an AdamConfig from adamnp.adam() or "
                f"adamnp.adamw(), got {type(cfg).__name__}"
            )
        out[label] = cfg
    first, *rest = out
    for option in STEP_OPTIONS:
        for label in rest:
            a, b = getattr(out[first], option), getattr(out[label], option)
            if a != b:
                raise ValueError(
                    f"{option} applies to the whole step (all leaves together), so every label "
                    f"must have the same: config[{first!r}].{option} = {a!r}, "
                    f"config[{label!r}].{option} = {b!r}"
                )
    return out
