"""Import and export the optimizer state of torch.optim and bitsandbytes.

:func:`from_torch` / :func:`to_torch` read and write the ``state_dict()`` of
``torch.optim.Adam`` and ``torch.optim.AdamW``; :func:`from_bnb` / :func:`to_bnb` that of
bitsandbytes' ``Adam8bit`` and ``AdamW8bit`` (blockwise 8-bit state, and the float32 state it
keeps for parameters below its ``min_8bit_size``). The moments move exactly: float32 values
and 8-bit codes are copied, never recomputed.

This module never imports torch or bitsandbytes. A state dict is a plain nested dict; its
arrays are read with ``np.asarray`` (so CPU tensors work as they are) and written as NumPy
arrays. docs/interop.md shows the two lines that convert tensors each way.

Which adamnp leaf is which peer parameter: the peer numbers its parameters in the order of
its param groups (``param_groups[g]["params"]``, concatenated). Say which leaf each one is

* by order: ``order=[path, ...]``, the adamnp path (``state.paths``, e.g. ``"params['w']"``)
  of each peer parameter in the peer's order; the default is ``state.paths`` order itself;
* or by name: ``names={peer_name: path}``. The peer's names are its groups' ``"param_names"``
  (torch records them when the optimizer was built from ``model.named_parameters()``);
  without them, the mapping's own order is taken as the peer's order.

Every mismatch (a leaf without a peer parameter, a shape, a dtype, a map, per-parameter step
counts that differ: adamnp has one step count) raises ``ValueError`` naming the parameter and
the leaf, before anything is written.

float16 and bfloat16 leaves: adamnp keeps their full-precision moments in float32. torch keeps
them in the parameter's dtype: :func:`from_torch` upcasts them (exactly) and :func:`to_torch`
rounds them to the parameter's dtype (to nearest, as torch's own ``load_state_dict`` casts
state to the parameter's dtype). bitsandbytes keeps float32 (or 8-bit) state for such
parameters too: :func:`from_bnb` and :func:`to_bnb` move it exactly, as for float32 leaves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ._api import init
from ._config import AdamConfig, adam, adamw
from ._state import MIN_8BIT_SIZE, AdamState, QuantSlot
from ._tree import flatten
from .backends import get as get_backend
from .lowbit.half import half_format, round_half_array, to_f32_array
from .lowbit.maps import SIGNED_MAP, dynamic_map
from .lowbit.reference import n_blocks

__all__ = ["from_bnb", "from_torch", "to_bnb", "to_torch"]

_TORCH_KEYS = {"m": "exp_avg", "v": "exp_avg_sq", "vmax": "max_exp_avg_sq"}
_BNB_WRAP = "__bnb_optimizer_quant_state__"  # bitsandbytes' state_dict() nests its arrays here
_BNB_BLOCK = 256  # bitsandbytes' blockwise optimizers always use blocks of 256


def from_torch(
    state_dict: Mapping,
    params,
    config: AdamConfig | Mapping[str, AdamConfig] | None = None,
    *,
    labels=None,
    order: Sequence[str] | None = None,
    names: Mapping[str, str] | None = None,
    backend: str = "auto",
) -> AdamState:
    """An adamnp state (float32/float64 moments) from a ``torch.optim.Adam``/``AdamW`` state dict.

    Parameters
    ----------
    state_dict : dict
        ``optimizer.state_dict()``: ``"state"`` (per parameter ``step``, ``exp_avg``,
        ``exp_avg_sq`` and with amsgrad ``max_exp_avg_sq``) and ``"param_groups"``.
        Arrays: NumPy arrays or CPU tensors. The moments have the leaf's dtype; for a float16
        or bfloat16 leaf (whose state torch keeps in that dtype) they may also be float32,
        and are upcast to adamnp's float32 moments exactly (a CPU bfloat16 tensor is read
        through ``.float()``: NumPy has no bfloat16 of its own).
    params : array or tree of arrays
        The parameters, as for :func:`adamnp.init` (not modified).
    config : AdamConfig or mapping of str to AdamConfig, optional
        As for :func:`adamnp.init` (with ``labels``). Default: taken from the param groups
        (``adam`` or ``adamw`` from ``decoupled_weight_decay``; one label ``"group<g>"`` per
        group when the groups differ). A given config must agree with each leaf's group in
        ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``maximize`` and decoupling; ``lr``
        is not compared (a schedule may own it).
    labels : callable or tree of str, optional
        With a mapping ``config``, as for :func:`adamnp.init`.
    order, names
        Which leaf each torch parameter is (module docstring); default ``state.paths`` order.
    backend : str, default "auto"
        As for :func:`adamnp.init`.

    Returns
    -------
    AdamState
        ``state.step`` is torch's step count; the moments are torch's, bit for bit (upcast
        exactly to float32 for float16 and bfloat16 leaves).

    Raises
    ------
    ValueError
        A torch parameter and a leaf that do not match (named), differing step counts, or
        hyperparameters that differ from ``config``.

    See Also
    --------
    to_torch : the inverse.

    Examples
    --------
    A state dict by hand (torch's layout with NumPy arrays): torch param 0 is ``w``, 1 is ``b``.

    >>> import numpy as np, adamnp
    >>> from adamnp.interop import from_torch
    >>> params = {"b": np.zeros(2, np.float32), "w": np.ones(3, np.float32)}
    >>> def moments(n, m, v):
    ...     return {"step": np.float32(7), "exp_avg": np.full(n, m, np.float32),
    ...             "exp_avg_sq": np.full(n, v, np.float32)}
    >>> group = {"params": [0, 1], "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
    ...          "weight_decay": 0.01, "amsgrad": False, "maximize": False,
    ...          "decoupled_weight_decay": True}
    >>> sd = {"state": {0: moments(3, 0.5, 0.25), 1: moments(2, -0.5, 0.125)},
    ...       "param_groups": [group]}
    >>> state = from_torch(sd, params, order=["params['w']", "params['b']"], backend="numpy")
    >>> state.step, state.config.name, state.slots[0].m
    (7, 'adamw', array([-0.5, -0.5], dtype=float32))

    The same by name (``names`` built from ``model.named_parameters()``; torch's order is the
    mapping's, unless the groups hold ``"param_names"``):

    >>> names = {"lin.weight": "params['w']", "lin.bias": "params['b']"}
    >>> float(from_torch(sd, params, names=names, backend="numpy").slots[1].v[0])
    0.25

    A mistake is named:

    >>> from_torch(sd, params, backend="numpy")
    Traceback (most recent call last):
      ...
    ValueError: torch param 0 (params['b']): exp_avg is float32 (3,), expected float32 (2,)
    """
    groups = _groups(state_dict, "torch")
    _, _, paths = flatten(params)
    order, ids = _match(paths, groups, order, names, "torch")
    if config is None:
        config, labels = _group_configs(order, groups, _torch_config)
    state = init(params, config, labels=labels, backend=backend)
    steps, fills = [], []
    for k, (path, pid) in enumerate(zip(order, ids)):
        i = state.paths.index(path)
        entry = state_dict["state"].get(pid)
        where = f"torch param {k} ({path})"
        _check_hyper(state.config_of(_group_of(state, i)), groups, pid, where, "torch")
        steps.append(_step_of(entry, where))
        for name, key in _TORCH_KEYS.items():
            dst = getattr(state.slots[i], name)
            if entry and (dst is None) == (key in entry):
                has = "has" if key in entry else "has no"
                raise ValueError(
                    f"{where} {has} {key}, but its config has amsgrad={dst is not None}"
                )
            if entry and dst is not None:
                fills.append(
                    (dst, _moment(entry[key], state.shapes[i], state.dtypes[i], where, key))
                )
    state.step = _one_step(steps, order)
    _fill(state, fills)
    return state


def to_torch(
    state: AdamState,
    *,
    order: Sequence[str] | None = None,
    names: Mapping[str, str] | None = None,
    param_groups: Sequence[Mapping] | None = None,
) -> dict:
    """A ``torch.optim.Adam``/``AdamW`` state dict of an adamnp state with full-precision moments.

    Parameters
    ----------
    state : AdamState
        Every leaf must have full-precision moments (``state_bits=32``, or opted out).
    order, names
        Which leaf each torch parameter is (module docstring); default ``state.paths`` order.
    param_groups : list of dict, optional
        The target optimizer's ``state_dict()["param_groups"]``: kept as they are except for
        the hyperparameters, which become those of each group's leaves (which must share a
        config). Default: new groups, one per run of leaves with the same config in torch's
        order, with the keys of torch 2.x's Adam.

    Returns
    -------
    dict
        ``{"state": {id: {"step", "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"]}},
        "param_groups": [...]}`` with NumPy arrays (copies); ``step`` is a 0-d float32 array
        and each group's ``lr`` the one of the next step (a schedule's ``lr(state.step)``).
        The moments have the leaf's dtype, as torch keeps them: those of a float16 or
        bfloat16 leaf are **rounded** from adamnp's float32 moments to that dtype (to
        nearest, ties to even; torch's ``load_state_dict`` would cast float32 ones the same
        way), so small ``exp_avg_sq`` values can underflow to zero in float16 exactly as in
        torch. A bfloat16 array (``ml_dtypes.bfloat16``) becomes a tensor through its bits:
        ``torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)`` (docs/interop.md).

    See Also
    --------
    from_torch : the inverse.

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> from adamnp.interop import to_torch
    >>> params = {"b": np.zeros(2, np.float32), "w": np.ones(3, np.float32)}
    >>> state = adamnp.init(params, adamnp.adamw(lr=0.1), backend="numpy")
    >>> adamnp.step(params, {"b": np.ones(2, np.float32), "w": np.ones(3, np.float32)}, state)
    >>> sd = to_torch(state, order=["params['w']", "params['b']"])
    >>> sd["state"][1]["exp_avg"], sd["state"][1]["step"]
    (array([0.1, 0.1], dtype=float32), array(1., dtype=float32))
    >>> sd["param_groups"][0]["params"], sd["param_groups"][0]["decoupled_weight_decay"]
    ([0, 1], True)
    """
    groups = list(param_groups) if param_groups is not None else None
    order, ids, out_groups = _export_plan(state, groups, order, names, _torch_group, "torch")
    be = get_backend(state.backend)
    out = {}
    for k, (path, pid) in enumerate(zip(order, ids)):
        slot = state.slots[state.paths.index(path)]
        if isinstance(slot, QuantSlot):
            raise ValueError(
                f"torch param {k} ({path}) has 8-bit moments; torch.optim.Adam keeps them at "
                "full precision (export 8-bit state with to_bnb)"
            )
        entry = {"step": np.array(float(state.step), np.float32)}
        dtype = state.dtypes[state.paths.index(path)]
        for name, key in _TORCH_KEYS.items():
            if getattr(slot, name) is not None:
                entry[key] = _in_param_dtype(np.array(be.to_host(getattr(slot, name))), dtype)
        out[pid] = entry
    return {"state": out, "param_groups": out_groups}


def from_bnb(
    state_dict: Mapping,
    params,
    config: AdamConfig | Mapping[str, AdamConfig] | None = None,
    *,
    labels=None,
    order: Sequence[str] | None = None,
    names: Mapping[str, str] | None = None,
    min_8bit_size: int = MIN_8BIT_SIZE,
    backend: str = "auto",
) -> AdamState:
    """A ``state_format="bnb"`` adamnp state from bitsandbytes' ``Adam8bit``/``AdamW8bit`` state.

    Parameters
    ----------
    state_dict : dict
        ``optimizer.state_dict()``: per parameter ``step`` and either 8-bit ``state1``,
        ``state2`` (uint8 codes), ``absmax1``, ``absmax2``, ``qmap1``, ``qmap2``, or float32
        ``state1``, ``state2`` (parameters below bitsandbytes' ``min_8bit_size``); nested under
        ``"__bnb_optimizer_quant_state__"`` as bitsandbytes writes them, or not.
    params : array or tree of arrays
        The parameters (float32, float16 or bfloat16: bitsandbytes keeps float32 or 8-bit
        state for each), as for :func:`adamnp.init` (not modified).
    config : AdamConfig or mapping of str to AdamConfig, optional
        Default: ``adamw`` with each group's ``lr``, ``betas``, ``eps`` and ``weight_decay``
        (bitsandbytes' decay is decoupled in both classes). A given config must agree with them
        except in ``lr``; amsgrad is refused (bitsandbytes has none).
    labels, order, names, backend
        As for :func:`from_torch`.
    min_8bit_size : int, default 4096
        The optimizer's ``min_8bit_size`` (not in its state dict). Each leaf keeps the kind of
        moments it has in bitsandbytes; this only sets ``state.layout``.

    Returns
    -------
    AdamState
        8-bit leaves hold bitsandbytes' bytes (codes and absmax), the other leaves its float32
        moments; ``state.step`` its step count.

    Raises
    ------
    ValueError
        As :func:`from_torch`; also a map other than bitsandbytes' dynamic maps, or absmax of
        the wrong length (named).

    See Also
    --------
    to_bnb : the inverse.

    Examples
    --------
    A 300-element leaf with 8-bit state and a bias with float32 state:

    >>> import numpy as np, adamnp
    >>> from adamnp.interop import from_bnb
    >>> params = {"b": np.zeros(4, np.float32), "w": np.zeros(300, np.float32)}
    >>> q8 = {"state1": np.full(300, 200, np.uint8), "state2": np.full(300, 90, np.uint8),
    ...       "absmax1": np.array([0.1, 0.2], np.float32), "absmax2": np.ones(2, np.float32),
    ...       "qmap1": adamnp.dynamic_map(True), "qmap2": adamnp.dynamic_map(False)}
    >>> fp = {"state1": np.full(4, 0.5, np.float32), "state2": np.full(4, 0.25, np.float32)}
    >>> sd = {"state": {0: {"step": 3, "__bnb_optimizer_quant_state__": q8},
    ...                 1: {"step": 3, "__bnb_optimizer_quant_state__": fp}},
    ...       "param_groups": [{"params": [0, 1], "lr": 1e-3, "betas": (0.9, 0.999),
    ...                         "eps": 1e-8, "weight_decay": 0.01}]}
    >>> state = from_bnb(sd, params, order=["params['w']", "params['b']"], min_8bit_size=256,
    ...                  backend="numpy")
    >>> state.step, state.state_format, type(state.slots[0]).__name__, state.slots[1].codes_m[:2]
    (3, 'bnb', 'Fp32Slot', array([200, 200], dtype=uint8))
    """
    groups = _groups(state_dict, "bitsandbytes")
    leaves, _, paths = flatten(params)
    order_, ids = _match(paths, groups, order, names, "bitsandbytes")
    if config is None:
        config, labels = _group_configs(order_, groups, _bnb_config)
    entries = {p: _bnb_entry(state_dict["state"].get(pid)) for p, pid in zip(order_, ids)}
    q8 = {p for p, e in entries.items() if e and np.asarray(e["state1"]).dtype == np.uint8}
    rule = {p: _eight_bit_dtype(a) and np.size(a) >= max(min_8bit_size, 1)
            for p, a in zip(paths, leaves)}  # fmt: skip
    for k, p in enumerate(order_):
        if p in q8 and not rule[p]:
            raise ValueError(
                f"bitsandbytes param {k} ({p}) has 8-bit state, but adamnp keeps float32 "
                f"moments for it (a float32, float16 or bfloat16 leaf of at least "
                f"min_8bit_size={min_8bit_size} elements gets 8-bit moments): pass the "
                "optimizer's min_8bit_size="
            )
    state = init(
        params,
        config,
        labels=labels,
        backend=backend,
        state_bits=8 if q8 else 32,
        state_format="bnb",
        min_8bit_size=min_8bit_size,
        keep_fp32=[p for p in paths if rule[p] and p not in q8] if q8 else None,
    )
    steps, fills = [], []
    for k, (path, pid) in enumerate(zip(order_, ids)):
        i = state.paths.index(path)
        slot, entry = state.slots[i], entries[path]
        cfg = state.config_of(_group_of(state, i))
        where = f"bitsandbytes param {k} ({path})"
        if cfg.amsgrad:
            raise ValueError(f"{where}: config has amsgrad=True; bitsandbytes' Adam has none")
        _check_hyper(cfg, groups, pid, where, "bitsandbytes")
        steps.append(_step_of(state_dict["state"].get(pid), where))
        if not entry:
            continue
        shape = state.shapes[i]
        if isinstance(slot, QuantSlot):
            nb = (n_blocks(int(np.prod(shape)), _BNB_BLOCK),)
            for key, signed in (("qmap1", True), ("qmap2", False)):
                got = np.asarray(entry[key])
                if got.dtype != np.float32 or not np.array_equal(got, dynamic_map(signed)):
                    kind = "signed" if signed else "unsigned"
                    raise ValueError(
                        f"{where}: {key} is not bitsandbytes' {kind} dynamic map "
                        "(create_dynamic_map); adamnp's bnb format has only those maps"
                    )
            for dst, key, shp, dt in (
                (slot.codes_m, "state1", shape, np.uint8),
                (slot.codes_v, "state2", shape, np.uint8),
                (slot.absmax_m, "absmax1", nb, np.float32),
                (slot.absmax_v, "absmax2", nb, np.float32),
            ):
                fills.append((dst, _array(entry[key], shp, dt, where, key)))
        else:
            for dst, key in ((slot.m, "state1"), (slot.v, "state2")):
                fills.append((dst, _array(entry[key], shape, slot.m.dtype, where, key)))
    state.step = _one_step(steps, order_)
    _fill(state, fills)
    return state


def to_bnb(
    state: AdamState,
    *,
    order: Sequence[str] | None = None,
    names: Mapping[str, str] | None = None,
    param_groups: Sequence[Mapping] | None = None,
) -> dict:
    """A bitsandbytes ``Adam8bit``/``AdamW8bit`` state dict of an adamnp state.

    Parameters
    ----------
    state : AdamState
        8-bit leaves must have ``state_format="bnb"`` and ``block_size=256``; other leaves
        float32 moments (bitsandbytes' float32 state: float32, float16 and bfloat16 leaves,
        not float64 ones); no amsgrad.
    order, names, param_groups
        As for :func:`to_torch`. New groups have the keys of bitsandbytes 0.50's Adam8bit.

    Returns
    -------
    dict
        As ``optimizer.state_dict()`` of bitsandbytes: per parameter ``{"step": int,
        "__bnb_optimizer_quant_state__": {"state1", "state2"[, "absmax1", "absmax2",
        "qmap1", "qmap2"]}}`` (NumPy copies). The 8-bit leaves must have 8-bit state in the
        target optimizer, and the others float32 state: match its ``min_8bit_size``.

    See Also
    --------
    from_bnb : the inverse.

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> from adamnp.interop import to_bnb
    >>> params = {"w": np.zeros(300, np.float32)}
    >>> state = adamnp.init(params, adamnp.adamw(), backend="numpy", state_bits=8,
    ...                     state_format="bnb", min_8bit_size=256)
    >>> sd = to_bnb(state)
    >>> q = sd["state"][0]["__bnb_optimizer_quant_state__"]
    >>> sd["state"][0]["step"], q["state1"].dtype, q["absmax1"].shape, q["qmap2"][:2]
    (0, dtype('uint8'), (2,), array([0.0000000e+00, 3.2500003e-07], dtype=float32))
    """
    groups = list(param_groups) if param_groups is not None else None
    order, ids, out_groups = _export_plan(state, groups, order, names, _bnb_group, "bitsandbytes")
    be = get_backend(state.backend)
    out = {}
    for k, (path, pid) in enumerate(zip(order, ids)):
        i = state.paths.index(path)
        slot, where = state.slots[i], f"bitsandbytes param {k} ({path})"
        if state.config_of(_group_of(state, i)).amsgrad:
            raise ValueError(f"{where} has amsgrad state; bitsandbytes' Adam has none")
        if isinstance(slot, QuantSlot):
            if slot.map_m != SIGNED_MAP or slot.block_size != _BNB_BLOCK:
                raise ValueError(
                    f"{where} has 8-bit moments in state_format={state.state_format!r} with "
                    f"block_size={slot.block_size}; bitsandbytes reads only state_format='bnb' "
                    f"with block_size={_BNB_BLOCK}"
                )
            arrays = {"state1": slot.codes_m, "state2": slot.codes_v,
                      "absmax1": slot.absmax_m, "absmax2": slot.absmax_v}  # fmt: skip
            q = {key: np.array(be.to_host(a)) for key, a in arrays.items()}
            q.update(qmap1=np.array(dynamic_map(True)), qmap2=np.array(dynamic_map(False)))
        elif slot.m.dtype != np.float32:
            raise ValueError(f"{where} is {state.dtypes[i]}; bitsandbytes keeps float32 state")
        else:
            q = {"state1": np.array(be.to_host(slot.m)), "state2": np.array(be.to_host(slot.v))}
        out[pid] = {"step": int(state.step), _BNB_WRAP: q}
    return {"state": out, "param_groups": out_groups}


# -- matching leaves and parameters


def _groups(state_dict, peer: str) -> list:
    try:
        groups, _ = list(state_dict["param_groups"]), state_dict["state"]
    except (KeyError, TypeError):
        raise ValueError(
            f"not a {peer} state dict: expected a dict with 'state' and 'param_groups'"
        ) from None
    return groups


def _match(paths, groups, order, names, peer: str):
    """``(path of each peer parameter, its id)`` in the peer's order, checked one to one."""
    ids = [pid for g in groups for pid in g["params"]]
    if order is not None and names is not None:
        raise TypeError("give order= or names=, not both")
    if names is not None:
        peer_names = [n for g in groups for n in g.get("param_names", ())] or list(names)
        if len(peer_names) != len(ids):
            raise ValueError(
                f"{peer} has {len(ids)} params but {len(peer_names)} names "
                "(its param_names, or names= when it has none)"
            )
        for k, name in enumerate(peer_names):
            if name not in names:
                raise ValueError(f"{peer} param {k} ({name!r}) is not a key of names=")
        order = [names[n] for n in peer_names]
    order = list(paths) if order is None else list(order)
    if len(order) != len(ids):
        raise ValueError(
            f"{peer} has {len(ids)} params, order/names give {len(order)}; params has "
            f"{len(paths)} leaves"
        )
    seen = {}
    for k, path in enumerate(order):
        if path not in paths:
            raise ValueError(
                f"{peer} param {k} is matched to {path!r}, which is not a leaf; leaves: "
                + ", ".join(paths)
            )
        if path in seen:
            raise ValueError(f"{peer} params {seen[path]} and {k} are both matched to {path}")
        seen[path] = k
    missing = [p for p in paths if p not in seen]
    if missing:
        raise ValueError(f"leaf {missing[0]} matches no {peer} param (order/names)")
    return order, ids


def _group_configs(order, groups, make):
    """``(config, labels)`` for :func:`adamnp.init` from the peer's param groups: one config,
    or one label ``"group<g>"`` per group when they differ."""
    configs = [make(g, gi) for gi, g in enumerate(groups)]
    if all(c == configs[0] for c in configs):
        return configs[0], None
    sizes = [len(g["params"]) for g in groups]
    label = dict(zip(order, (f"group{gi}" for gi, n in enumerate(sizes) for _ in range(n))))
    return {f"group{gi}": c for gi, c in enumerate(configs)}, lambda path, a: label[path]


def _group_of(state, i):
    return next(g for g in state.groups if i in g.leaf_ids)


def _torch_config(g, gi):
    if "decoupled_weight_decay" not in g:
        raise ValueError(
            f"torch param group {gi} has no 'decoupled_weight_decay' (an older torch): pass "
            "config=adamnp.adam(...) or adamnp.adamw(...)"
        )
    make = adamw if g["decoupled_weight_decay"] else adam
    b1, b2 = g["betas"][:2]
    return make(lr=float(g["lr"]), betas=(float(b1), float(b2)), eps=float(g["eps"]),
                weight_decay=float(g["weight_decay"]), amsgrad=bool(g.get("amsgrad", False)),
                maximize=bool(g.get("maximize", False)))  # fmt: skip


def _bnb_config(g, gi):
    b1, b2 = g["betas"][:2]
    return adamw(lr=float(g["lr"]), betas=(float(b1), float(b2)), eps=float(g["eps"]),
                 weight_decay=float(g["weight_decay"]))  # fmt: skip


def _check_hyper(cfg: AdamConfig, groups, pid, where: str, peer: str) -> None:
    """``cfg`` agrees with the peer's group of ``pid`` except in ``lr``; else ValueError."""
    g = next(g for g in groups if pid in g["params"])
    if peer == "torch":  # an older torch's group does not say: the config's choice
        want = _torch_config({"decoupled_weight_decay": cfg.decoupled, **g}, 0)
    else:
        want = _bnb_config(g, 0)
    for name in ("betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled"):
        a, b = getattr(cfg, name), getattr(want, name)
        if name == "decoupled" and cfg.weight_decay == 0:
            continue  # adam and adamw are one optimizer without decay
        if a != b:
            raise ValueError(f"{where}: config has {name}={a!r}, its {peer} param group {b!r}")


def _step_of(entry, where: str) -> int:
    if not entry:
        return 0  # never stepped: torch and bitsandbytes create the state on the first step
    step = float(np.asarray(entry["step"]))
    if not step.is_integer() or step < 0:
        raise ValueError(f"{where} has step {step}, not a count")
    return int(step)


def _one_step(steps, order) -> int:
    if len(set(steps)) > 1:
        lo, hi = int(np.argmin(steps)), int(np.argmax(steps))
        raise ValueError(
            f"param {lo} ({order[lo]}) is at step {steps[lo]}, param {hi} ({order[hi]}) at "
            f"step {steps[hi]}; adamnp keeps one step count for all leaves"
        )
    return steps[0] if steps else 0


def _bnb_entry(entry):
    if not entry:
        return entry
    flat = {k: v for k, v in entry.items() if k != _BNB_WRAP}
    flat.update(entry.get(_BNB_WRAP, {}))
    return flat


def _array(value, shape, dtype, where: str, key: str) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype != dtype or a.shape != tuple(shape):
        raise ValueError(
            f"{where}: {key} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} {tuple(shape)}"
        )
    return np.ascontiguousarray(a)


def _moment(value, shape, dtype, where: str, key: str) -> np.ndarray:
    """A torch moment of a leaf of ``dtype``, as the state stores it: ``_array`` of it, but
    for a float16 or bfloat16 leaf one in that dtype (torch's) or float32, upcast exactly."""
    fmt = half_format(dtype)
    if str(getattr(value, "dtype", "")) == "torch.bfloat16":
        value = value.float()  # NumPy has no bfloat16 of its own; exact
    a = np.asarray(value)
    if fmt < 0 or a.dtype == np.float32:
        return _array(a, shape, dtype if fmt < 0 else np.float32, where, key)
    if a.dtype != dtype or a.shape != tuple(shape):
        raise ValueError(
            f"{where}: {key} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} or float32 "
            f"{tuple(shape)}"
        )
    bits = np.ascontiguousarray(a).view(np.uint16)
    return to_f32_array(bits, fmt).reshape(a.shape)


def _in_param_dtype(moment: np.ndarray, dtype) -> np.ndarray:
    """A float32 moment of a leaf of ``dtype`` in that dtype: rounded to nearest for a
    float16 or bfloat16 leaf (:mod:`adamnp.lowbit.half`); any other moment as it is."""
    fmt = half_format(dtype)
    if fmt < 0:
        return moment
    return round_half_array(moment, fmt).view(dtype).reshape(moment.shape)


def _eight_bit_dtype(a) -> bool:
    """Whether a leaf of ``a``'s dtype can have 8-bit state: float32, float16, bfloat16."""
    dtype = getattr(a, "dtype", None)
    try:
        dtype = np.dtype(dtype) if dtype is not None else None
    except TypeError:
        return False
    return dtype is not None and (dtype == np.float32 or half_format(dtype) >= 0)


def _fill(state: AdamState, fills) -> None:
    be = get_backend(state.backend)
    for dst, src in fills:
        be.copy_from_host(dst, src)


# -- param groups of an export


def _export_plan(state, groups, order, names, make, peer: str):
    """``(order, ids, param_groups)`` of an export, from template groups or new ones (one
    per run of leaves with the same config, in the peer's order)."""
    fresh = groups is None
    if fresh:
        order, _ = _match(state.paths, [{"params": state.paths}], order, names, peer)
        cfgs = [_config_at(state, p) for p in order]
        groups = []
        for k, cfg in enumerate(cfgs):
            if k == 0 or cfg is not cfgs[k - 1]:
                groups.append({"params": []})
            groups[-1]["params"].append(k)
        names = None  # resolved into order
    order, ids = _match(state.paths, groups, order, names, peer)
    out, k = [], 0
    for gi, g in enumerate(groups):
        cfgs = [_config_at(state, p) for p in order[k : k + len(g["params"])]]
        k += len(g["params"])
        if any(c is not cfgs[0] for c in cfgs):
            raise ValueError(f"{peer} param group {gi} holds leaves with different configs")
        new = {} if fresh else dict(g)
        if cfgs:
            new.update(make(cfgs[0], state.step, fresh))
        new["params"] = list(g["params"])
        out.append(new)
    return order, ids, out


def _config_at(state, path):
    return state.config_of(_group_of(state, state.paths.index(path)))


def _torch_group(cfg: AdamConfig, step: int, fresh: bool) -> dict:
    out = {"lr": cfg.lr_at(step), "betas": cfg.betas, "eps": cfg.eps,
           "weight_decay": cfg.weight_decay, "amsgrad": cfg.amsgrad, "maximize": cfg.maximize,
           "decoupled_weight_decay": cfg.decoupled}  # fmt: skip
    if fresh:
        out.update(foreach=None, capturable=False, differentiable=False, fused=None)
    return out


def _bnb_group(cfg: AdamConfig, step: int, fresh: bool) -> dict:
    if cfg.weight_decay and not cfg.decoupled:
        raise ValueError("bitsandbytes' decay is decoupled: adam(weight_decay>0) has no match")
    out = {"lr": cfg.lr_at(step), "betas": cfg.betas, "eps": cfg.eps,
           "weight_decay": cfg.weight_decay}  # fmt: skip
    if fresh:
        out.update(alpha=0.0, t_alpha=None, t_beta3=None)
    return out
