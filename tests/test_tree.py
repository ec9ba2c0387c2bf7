"""The minimal pytree: deterministic order, round trips, JSON form."""

import json

import numpy as np
import pytest

from adamnp._tree import flatten, treedef_from_json, treedef_to_json, unflatten


def test_dict_order_does_not_matter():
    a = {"x": 1, "y": [2, 3]}
    b = {"y": [2, 3], "x": 1}
    assert flatten(a) == flatten(b)


def test_round_trip_and_json():
    tree = {"w": [np.zeros(2), (np.ones(1), {3: np.ones(3)})], "b": np.zeros(1)}
    leaves, treedef, paths = flatten(tree)
    assert paths == [
        "params['b']",
        "params['w'][0]",
        "params['w'][1][0]",
        "params['w'][1][1][3]",
    ]
    rebuilt = unflatten(treedef, leaves)
    assert flatten(rebuilt)[1] == treedef
    assert treedef_from_json(json.loads(json.dumps(treedef_to_json(treedef)))) == treedef


def test_single_array_is_one_leaf():
    leaves, treedef, paths = flatten(np.zeros(3))
    assert len(leaves) == 1 and treedef is None and paths == ["params"]


def test_bad_keys_and_malformed_json():
    with pytest.raises(TypeError, match="dict keys"):
        flatten({(1, 2): np.zeros(1)})
    with pytest.raises(ValueError, match="malformed"):
        treedef_from_json({"set": []})


def test_first_difference_names_the_key():
    from adamnp._tree import first_difference

    def td(tree):
        return flatten(tree)[1]

    base = td({"a": [1, 2], "b": {"c": 1}})
    assert first_difference(base, base) is None
    cases = {
        "grads is missing key 'b', which params has": {"a": [1, 2]},
        "grads has an extra key 'z', which params does not have": {
            "a": [1, 2],
            "b": {"c": 1},
            "z": 1,
        },
        "grads['a'] is a list of 1 item, params['a'] a list of 2": {"a": [1], "b": {"c": 1}},
        "grads['a'] is a tuple, params['a'] a list": {"a": (1, 2), "b": {"c": 1}},
        "grads['b'] is a leaf, params['b'] a dict": {"a": [1, 2], "b": 1},
        "grads['b']['c'] is a list, params['b']['c'] a leaf": {"a": [1, 2], "b": {"c": [1]}},
        "grads['b'] is missing key 'c', which params['b'] has": {"a": [1, 2], "b": {0: 1}},
        "grads is a leaf, params a dict": 1,
    }
    for words, tree in cases.items():
        assert first_difference(td(tree), base) == words
    assert (
        first_difference(td([1, 2, 3]), td([1]), "x", "y")
        == "x is a list of 3 items, y a list of 1"
    )


def test_depth_limit():
    from adamnp._tree import MAX_DEPTH

    tree: object = 1.0
    for _ in range(MAX_DEPTH + 1):
        tree = {"k": tree}
    with pytest.raises(ValueError, match=f"params is nested more than {MAX_DEPTH} levels"):
        flatten(tree)
    ok = tree["k"]
    treedef = flatten(ok)[1]
    assert treedef_from_json(json.loads(json.dumps(treedef_to_json(treedef)))) == treedef
    deep = {"list": [None]}
    for _ in range(MAX_DEPTH):
        deep = {"list": [deep]}
    with pytest.raises(ValueError, match="malformed tree definition: nested more than"):
        treedef_from_json(deep)
    with pytest.raises(ValueError, match="malformed"):
        treedef_from_json({"dict": 5})
