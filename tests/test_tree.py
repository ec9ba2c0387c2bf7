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
