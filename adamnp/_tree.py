"""A minimal pytree: flatten nested dict / list / tuple containers of arrays.

A tree definition (``treedef``) is a nested tuple that compares with ``==`` and converts to
and from JSON, so checkpoints can record the structure they belong to:

* ``None`` for a leaf,
* ``("dict", ((key, child), ...))`` with keys sorted (``str`` or ``int`` keys),
* ``("list", (child, ...))`` and ``("tuple", (child, ...))``.
"""

from __future__ import annotations

from typing import Any


def _sorted_keys(node: dict, path: str) -> list:
    for key in node:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise TypeError(f"{path}: dict keys must be str or int, got {key!r}")
    return sorted(node, key=lambda k: (isinstance(k, str), k))


def flatten(tree: Any, root: str = "params") -> tuple[list, tuple | None, list[str]]:
    """Return ``(leaves, treedef, paths)`` of a tree, leaves in a deterministic order.

    Anything that is not a dict, list or tuple is a leaf. ``paths`` name each leaf the way
    Python would index it, e.g. ``params['w']`` or ``params[1][0]``.

    Examples
    --------
    >>> leaves, treedef, paths = flatten({"b": 2, "a": [1, (3,)]})
    >>> leaves, paths
    ([1, 3, 2], ["params['a'][0]", "params['a'][1][0]", "params['b']"])
    """
    leaves: list = []
    paths: list[str] = []

    def walk(node, path):
        if isinstance(node, dict):
            keys = _sorted_keys(node, path)
            return ("dict", tuple((k, walk(node[k], f"{path}[{k!r}]")) for k in keys))
        if isinstance(node, (list, tuple)):
            kind = "list" if isinstance(node, list) else "tuple"
            return (kind, tuple(walk(c, f"{path}[{i}]") for i, c in enumerate(node)))
        leaves.append(node)
        paths.append(path)
        return None

    treedef = walk(tree, root)
    return leaves, treedef, paths


def unflatten(treedef: tuple | None, leaves: list) -> Any:
    """Rebuild a tree of ``leaves`` with the structure ``treedef`` (inverse of :func:`flatten`).

    Examples
    --------
    >>> leaves, treedef, _ = flatten({"b": 2, "a": [1, (3,)]})
    >>> unflatten(treedef, [10, 30, 20])
    {'a': [10, (30,)], 'b': 20}
    """
    it = iter(leaves)

    def build(node):
        if node is None:
            return next(it)
        kind, children = node
        if kind == "dict":
            return {k: build(c) for k, c in children}
        built = [build(c) for c in children]
        return built if kind == "list" else tuple(built)

    return build(treedef)


def treedef_to_json(treedef) -> Any:
    """A JSON-compatible form of ``treedef`` (dict keys keep their str/int type)."""
    if treedef is None:
        return None
    kind, children = treedef
    if kind == "dict":
        return {"dict": [[k, treedef_to_json(c)] for k, c in children]}
    return {kind: [treedef_to_json(c) for c in children]}


def treedef_from_json(obj) -> Any:
    """Inverse of :func:`treedef_to_json`; raises ``ValueError`` on anything malformed."""
    if obj is None:
        return None
    if not isinstance(obj, dict) or len(obj) != 1:
        raise ValueError(f"malformed tree definition: {obj!r}")
    ((kind, children),) = obj.items()
    if kind == "dict":
        out = []
        for item in children:
            if not (isinstance(item, list) and len(item) == 2):
                raise ValueError(f"malformed dict entry in tree definition: {item!r}")
            key, child = item
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise ValueError(f"malformed dict key in tree definition: {key!r}")
            out.append((key, treedef_from_json(child)))
        return ("dict", tuple(out))
    if kind in ("list", "tuple") and isinstance(children, list):
        return (kind, tuple(treedef_from_json(c) for c in children))
    raise ValueError(f"malformed tree definition: {obj!r}")
