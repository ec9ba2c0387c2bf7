"""Fuzzing ``load_state``: a damaged or forged checkpoint is refused, or loads unchanged.

The checkpoint is small: three leaves (an 8-bit float32 leaf of 128 elements in two blocks
of 64, a float32 leaf and a float64 leaf with float32/float64 moments) after two steps, about
7 KB. From it:

(a) every truncation: the file cut at each byte offset (about 7,200 cases);
(b) bit flips: every bit of the first member's zip and ``.npy`` headers (175 bytes), of the
    first and the last entry of the central directory and of its end record (165 bytes), and
    1,500 further bits drawn with a fixed seed (4,220 cases);
(c) forged headers, each written as a valid zip with correct CRCs: hand-written cases (the
    forgeries of the reliability issue), a grid setting every value of the JSON header in
    turn to each of a pool of 31 hostile values (about 2,900 cases), and 500 random mutations
    of one to three values, keys removed or added (fixed seed).

Every case must raise :class:`CheckpointError` or load a state identical to the original:
every buffer byte for byte, the step counters, config, layout, tree and leaves. A forged
header may also load a state that differs harmlessly (another ``lr``, step count, backend
name, ...): such a state must be one that :func:`adamnp.init` builds for its tree and
options (same slots, buffers of the same shapes and dtypes), and a step on it must run (NumPy
backend). All of it takes about 7 s of CPU time; the counts are checked below so that the
cases stay as many as stated.
"""

from __future__ import annotations

import copy
import io
import json
import random
import struct
import warnings
import zipfile

import numpy as np
import pytest

import adamnp
from adamnp import CheckpointError
from adamnp._tree import unflatten


def _original_state():
    params = {
        "a": np.linspace(-1, 1, 128, dtype=np.float32),
        "b": np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3),
        "c": np.array([0.5, -1.5, 2.0]),
    }
    state = adamnp.init(
        params, adamnp.adamw(lr=1e-2), backend="numpy", state_bits=8, min_8bit_size=100,
        block_size=64,
    )  # fmt: skip
    for k in range(2):
        grads = {key: np.full_like(a, 0.25 * (k + 1)) for key, a in params.items()}
        adamnp.step(params, grads, state)
    return state


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """``(state, file bytes, scratch file)``."""
    folder = tmp_path_factory.mktemp("fuzz")
    state = _original_state()
    adamnp.save_state(folder / "original.npz", state)
    data = (folder / "original.npz").read_bytes()
    with open(folder / "case.npz", "w+b") as scratch:
        yield state, data, _Scratch(folder / "case.npz", scratch)


class _Scratch:
    """One file rewritten in place for every case (no truncation to zero and no new file:
    both are slow on some file systems)."""

    def __init__(self, path, f):
        self.path, self.f = path, f

    def load(self, data: bytes):
        """``load_state`` of ``data`` onto the NumPy backend, or the CheckpointError."""
        self.f.seek(0)
        self.f.write(data)
        self.f.truncate()
        self.f.flush()
        try:
            return adamnp.load_state(self.path, backend="numpy")
        except CheckpointError as exc:
            return exc


def _buffers(state) -> list:
    return [
        (g.kind, g.dtype.str, name, b.shape, b.tobytes())
        for g in state.groups
        for name, b in sorted(g.buffers.items())
    ]


def _description(state) -> tuple:
    return (
        state.config, state.step, state.skipped_steps, state.treedef, state.paths,
        state.shapes, state.dtypes, state.layout, [type(s).__name__ for s in state.slots],
    )  # fmt: skip


def _identical(a, b) -> bool:
    slots = all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        for s, t in zip(a.slots, b.slots)
        for x, y in zip(s, t)
        if isinstance(x, np.ndarray)
    )
    return _description(a) == _description(b) and _buffers(a) == _buffers(b) and slots


def _params_for(state, value):
    leaves = [np.full(shape, value, dtype) for shape, dtype in zip(state.shapes, state.dtypes)]
    return unflatten(state.treedef, leaves)


def _check_harmless(state) -> None:
    """A loaded state that differs from the original: as init would build it, and steppable."""
    params = _params_for(state, 0.5)
    layout = state.layout
    with warnings.catch_warnings():  # init warns when state_bits=8 gives no 8-bit leaf
        warnings.simplefilter("ignore", UserWarning)
        fresh = adamnp.init(
            params, state.config, backend="numpy", state_bits=layout.state_bits,
            block_size=layout.block_size, min_8bit_size=layout.min_8bit_size,
            v_rounding=layout.v_rounding, keep_fp32=list(layout.keep_fp32),
        )  # fmt: skip
    assert [b[:4] for b in _buffers(state)] == [b[:4] for b in _buffers(fresh)]
    assert [type(s) for s in state.slots] == [type(s) for s in fresh.slots]
    with np.errstate(all="ignore"):  # a forged lr of 1e300 overflows: harmless
        adamnp.step(params, _params_for(state, 0.25), state)


def _judge(outcome, state, counts: dict, case) -> None:
    if isinstance(outcome, CheckpointError):
        counts["refused"] += 1
    elif _identical(outcome, state):
        counts["identical"] += 1
    else:
        assert counts.get("harmless") is not None, f"{case}: loaded a different state"
        _check_harmless(outcome)
        counts["harmless"] += 1


def test_every_truncation(original):
    state, data, scratch = original
    counts = {"refused": 0, "identical": 0}
    for n in range(len(data)):
        _judge(scratch.load(data[:n]), state, counts, f"truncated to {n} bytes")
    assert counts["refused"] == len(data) > 6000


def _flip_positions(data: bytes) -> tuple[list, int]:
    """``(bits to flip, how many of them are drawn at random)``: every bit of the first
    member's zip and ``.npy`` headers, of the first and the last entry of the central
    directory and of its end record, and 1,500 more drawn with a fixed seed."""
    name_len, extra_len = struct.unpack("<HH", data[26:30])
    npy = 30 + name_len + extra_len
    first = range(npy + 10 + int.from_bytes(data[npy + 8 : npy + 10], "little"))
    entries, at = [], int.from_bytes(data[-6:-2], "little")  # the directory's offset
    while data[at : at + 4] == b"PK\x01\x02":
        entries.append(range(at, at + 46 + sum(struct.unpack("<HHH", data[at + 28 : at + 34]))))
        at = entries[-1].stop
    chosen = {bit for r in (first, entries[0], range(entries[-1].start, len(data))) for byte in r
              for bit in range(byte * 8, byte * 8 + 8)}  # fmt: skip
    rest = [bit for bit in range(len(data) * 8) if bit not in chosen]
    return sorted(chosen | set(random.Random(0).sample(rest, 1500))), 1500


def test_bit_flips(original):
    state, data, scratch = original
    counts = {"refused": 0, "identical": 0}
    positions, drawn = _flip_positions(data)
    for bit in positions:
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        _judge(scratch.load(bytes(damaged)), state, counts, f"bit {bit} flipped")
    assert 2500 < len(positions) - drawn < 3000  # as the module's docstring says
    assert counts["refused"] > len(positions) / 2  # zip fields no one reads are not checked


# -- forged headers


def _members(data: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def _header(members: dict) -> dict:
    return json.loads(str(np.load(io.BytesIO(members["__adamnp__.npy"]))[()]))


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def _zip(members: dict, header=None, text=None) -> bytes:
    """The checkpoint of ``members`` with ``header`` (or the JSON ``text``) as its header."""
    members = dict(members)
    members["__adamnp__.npy"] = _npy(np.array(json.dumps(header) if text is None else text))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _q8_of_float64(h, m):
    """Leaf 'c' (float64) declared 8-bit, consistently, its arrays replaced to match."""
    h["leaves"][2].update(
        slot="q8", block_size=64, map_m="dynamic-signed-8bit", map_v="dynamic-unsigned-8bit",
        arrays={"codes_m": {"dtype": "|u1", "shape": [3]},
                "codes_v": {"dtype": "|u1", "shape": [3]},
                "absmax_m": {"dtype": "<f4", "shape": [1]},
                "absmax_v": {"dtype": "<f4", "shape": [1]}},
    )  # fmt: skip
    h["min_8bit_size"] = 1
    for name in ("m", "v"):
        del m[f"leaf2/{name}.npy"]
        m[f"leaf2/codes_{name}.npy"] = _npy(np.zeros(3, np.uint8))
        m[f"leaf2/absmax_{name}.npy"] = _npy(np.zeros(1, np.float32))


def _huge_q8(h, m):
    h["leaves"][0]["shape"] = [3 * 10**9]
    for name, spec in h["leaves"][0]["arrays"].items():
        spec["shape"] = [3 * 10**9] if name.startswith("codes") else [-(-3 * 10**9 // 64)]


def _object_member(h, m):
    text = b"{'descr': '|O', 'fortran_order': False, 'shape': (2, 3), }".ljust(117) + b"\n"
    m["leaf1/m.npy"] = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + bytes(48)


def _tree(*keys):
    return {"dict": [[k, None] for k in keys]}


HAND_WRITTEN = {
    "tree with fewer leaves than the table": lambda h, m: h.update(treedef=_tree("a", "b")),
    "tree with more leaves than the table": lambda h, m: h.update(treedef=_tree(*"abcd")),
    "tree naming other leaves": lambda h, m: h.update(treedef=_tree("a", "b", "x")),
    "single-leaf tree": lambda h, m: h.update(treedef=None),
    "8-bit slot of a float64 leaf": _q8_of_float64,
    "8-bit leaf of 3e9 elements": _huge_q8,
    "object member": _object_member,
    "raw-bytes member": lambda h, m: m.update({"leaf1/m.npy": b"raw" * 40}),
    "member of another dtype": lambda h, m: m.update({"leaf1/m.npy": _npy(np.zeros((2, 3)))}),
    "member of another shape": lambda h, m: m.update(
        {"leaf1/m.npy": _npy(np.zeros(6, np.float32))}
    ),
    "member missing": lambda h, m: m.pop("leaf1/v.npy"),
    "member extra": lambda h, m: m.update({"extra.npy": _npy(np.zeros(1))}),
    "amsgrad without its buffers": lambda h, m: h["config"].update(amsgrad=True),
    "version true": lambda h, m: h.update(version=True),
    "step true": lambda h, m: h.update(step=True),
    "step 2**200": lambda h, m: h.update(step=2**200),
    "skipped_steps 2**64": lambda h, m: h.update(skipped_steps=2**64),
    "state_bits abc": lambda h, m: h.update(state_bits="abc"),
    "state_bits 7": lambda h, m: h.update(state_bits=7),
    "shape [-5]": lambda h, m: h["leaves"][1].update(shape=[-5]),
    "shape [1e12]": lambda h, m: h["leaves"][1].update(shape=[10**12]),
    "backend evil": lambda h, m: h.update(backend="evil"),
}


@pytest.mark.parametrize("case", sorted(HAND_WRITTEN))
def test_hand_written_forgery(original, case):
    _, data, scratch = original
    members = _members(data)
    header = _header(members)
    HAND_WRITTEN[case](header, members)
    assert isinstance(scratch.load(_zip(members, header)), CheckpointError)


@pytest.mark.parametrize("depth", [200, 5_000, 200_000])
def test_deep_json(original, depth):
    _, data, scratch = original
    text = '{"format": "adamnp-state", "x": ' + "[" * depth + "]" * depth + "}"
    assert isinstance(scratch.load(_zip(_members(data), text=text)), CheckpointError)


POOL = [
    None, True, 0, 1, -1, 7, 8, 64, 2**63 - 2, 2**63, -5, 10**12, 0.5, 8.0, float("nan"),
    float("inf"), "", "abc", "<f8", "|O", "q8", "fp32", "evil", "adam", "stochastic",
    "params['a']", [], [-5], [2, 3], {}, {"list": []},
]  # fmt: skip


def _locations(node, at=()):
    """The path (keys and indices) of every value inside ``node``."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        yield (*at, key)
        if isinstance(value, dict | list):
            yield from _locations(value, (*at, key))


def _set(header, at, value):
    node = header
    for key in at[:-1]:
        node = node[key]
    node[at[-1]] = value


def test_every_header_value_set_to_each_hostile_value(original):
    state, data, scratch = original
    members = _members(data)
    header = _header(members)
    counts = {"refused": 0, "identical": 0, "harmless": 0}
    locations = [at for at in _locations(header) if at != ("format",)]
    for at in locations:
        for value in POOL:
            forged = copy.deepcopy(header)
            _set(forged, at, value)
            _judge(scratch.load(_zip(members, forged)), state, counts, f"{at} = {value!r}")
    assert sum(counts.values()) == len(locations) * len(POOL) > 2500
    assert counts["refused"] > 0.8 * sum(counts.values())


def _mutate(header, rng: random.Random) -> None:
    at = rng.choice(list(_locations(header)))
    parent = header
    for key in at[:-1]:
        parent = parent[key]
    roll = rng.random()
    if roll < 0.15 and isinstance(parent, dict):
        del parent[at[-1]]
    elif roll < 0.25 and isinstance(parent, dict):
        parent[rng.choice(["extra", "block_size", "vmax", "path"])] = rng.choice(POOL)
    elif roll < 0.5 and type(parent[at[-1]]) is int:
        parent[at[-1]] += rng.choice([-1, 1, 64, -(2**63), 2**63])
    else:
        parent[at[-1]] = copy.deepcopy(rng.choice(POOL))


def test_random_header_mutations(original):
    state, data, scratch = original
    members = _members(data)
    header = _header(members)
    rng = random.Random(1)
    counts = {"refused": 0, "identical": 0, "harmless": 0}
    for case in range(500):
        forged = copy.deepcopy(header)
        for _ in range(rng.randint(1, 3)):
            if forged:
                _mutate(forged, rng)
        _judge(scratch.load(_zip(members, forged)), state, counts, f"mutation {case}")
    assert sum(counts.values()) == 500
