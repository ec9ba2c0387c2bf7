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


#: How deep a tree may nest containers (a leaf at depth ``MAX_DEPTH`` is fine, one more level
#: of dict / list / tuple is refused). Real parameter trees are a few levels deep; the limit
#: turns a runaway or self-containing structure into a clear ``ValueError`` instead of a
#: ``RecursionError``, with room to spare below Python's recursion limit.
MAX_DEPTH = 100


def _too_deep(root: str) -> ValueError:
    return ValueError(
        f"{root} is nested more than {MAX_DEPTH} levels deep (dicts / lists / tuples inside "
        "each other); adamnp supports trees up to that depth. Does a container contain itself?"
    )


def flatten(tree: Any, root: str = "params") -> tuple[list, tuple | None, list[str]]:
    """Return ``(leaves, treedef, paths)`` of a tree, leaves in a deterministic order.

    Anything that is not a dict, list or tuple is a leaf. ``paths`` name each leaf the way
    Python would index it, e.g. ``params['w']`` or ``params[1][0]``; ``root`` is the name of
    the whole tree. Containers may nest up to :data:`MAX_DEPTH` levels deep; a deeper tree
    (or one that contains itself) raises ``ValueError``.

    Examples
    --------
    >>> leaves, treedef, paths = flatten({"b": 2, "a": [1, (3,)]})
    >>> leaves, paths
    ([1, 3, 2], ["params['a'][0]", "params['a'][1][0]", "params['b']"])
    """
    leaves: list = []
    paths: list[str] = []

    def walk(node, path, depth):
        if isinstance(node, dict | list | tuple):
            if depth == MAX_DEPTH:
                raise _too_deep(root)
            depth += 1
            if isinstance(node, dict):
                keys = _sorted_keys(node, path)
                return (
                    "dict",
                    tuple((k, walk(node[k], f"{path}[{k!r}]", depth)) for k in keys),
                )
            kind = "list" if isinstance(node, list) else "tuple"
            return (kind, tuple(walk(c, f"{path}[{i}]", depth) for i, c in enumerate(node)))
        leaves.append(node)
        paths.append(path)
        return None

    treedef = walk(tree, root, 0)
    return leaves, treedef, paths


def _kind(treedef) -> str:
    return "leaf" if treedef is None else treedef[0]


def first_difference(a, b, root_a: str = "grads", root_b: str = "params") -> str | None:
    """Where tree definitions ``a`` and ``b`` first differ, in words; None if they are equal.

    The walk follows tree order. Dicts: the first key missing from ``a``, else the first key
    ``a`` has beyond ``b``. Lists and tuples: their lengths. A leaf against a container, or
    two kinds of container: the path and both kinds. ``root_a`` and ``root_b`` name the trees.

    Examples
    --------
    >>> _, g, _ = flatten({"w": 1, "b": [1]}, "grads")
    >>> _, p, _ = flatten({"w": 1, "b": [1, 2]})
    >>> first_difference(g, p)
    "grads['b'] is a list of 1 item, params['b'] a list of 2"
    >>> first_difference(flatten({"w": 1})[1], p)
    "grads is missing key 'b', which params has"
    """

    def walk(a, b, path_a, path_b):
        if a == b:
            return None
        kind_a, kind_b = _kind(a), _kind(b)
        if kind_a != kind_b:
            article = "an" if kind_b[0] in "aeiou" else "a"
            return f"{path_a} is a {kind_a}, {path_b} {article} {kind_b}"
        children_a, children_b = a[1], b[1]
        if kind_a == "dict":
            keys_a, keys_b = dict(children_a), dict(children_b)
            for key in keys_b:
                if key not in keys_a:
                    return f"{path_a} is missing key {key!r}, which {path_b} has"
            for key in keys_a:
                if key not in keys_b:
                    return f"{path_a} has an extra key {key!r}, which {path_b} does not have"
            pairs = [(keys_a[k], keys_b[k], f"[{k!r}]") for k in keys_b]
        else:
            n_a, n_b = len(children_a), len(children_b)
            if n_a != n_b:
                return (
                    f"{path_a} is a {kind_a} of {n_a} item{'s' if n_a != 1 else ''}, "
                    f"{path_b} a {kind_b} of {n_b}"
                )
            pairs = [(x, y, f"[{i}]") for i, (x, y) in enumerate(zip(children_a, children_b))]
        for x, y, index in pairs:
            found = walk(x, y, path_a + index, path_b + index)
            if found is not None:
                return found
        return None  # pragma: no cover - unequal trees differ somewhere

    return walk(a, b, root_a, root_b)


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


def treedef_from_json(obj, _depth: int = 0) -> Any:
    """Inverse of :func:`treedef_to_json`; raises ``ValueError`` on anything malformed
    (including nesting deeper than :data:`MAX_DEPTH`)."""
    if obj is None:
        return None
    if not isinstance(obj, dict) or len(obj) != 1:
        raise ValueError(f"malformed tree definition: {obj!r}")
    if _depth == MAX_DEPTH:
        raise ValueError(f"malformed tree definition: nested more than {MAX_DEPTH} levels deep")
    ((kind, children),) = obj.items()
    if kind == "dict" and isinstance(children, list):
        out = []
        for item in children:
            if not (isinstance(item, list) and len(item) == 2):
                raise ValueError(f"malformed dict entry in tree definition: {item!r}")
            key, child = item
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise ValueError(f"malformed dict key in tree definition: {key!r}")
            out.append((key, treedef_from_json(child, _depth + 1)))
        return ("dict", tuple(out))
    if kind in ("list", "tuple") and isinstance(children, list):
        return (kind, tuple(treedef_from_json(c, _depth + 1) for c in children))
    raise ValueError(f"malformed tree definition: {obj!r}")
