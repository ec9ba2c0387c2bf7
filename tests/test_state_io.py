"""In-memory optimizer state: save_state / load_state with binary file objects, and
state_dict / load_state_dict. Round trips continue bit for bit; a state_dict is checked by
the code that checks files, exactly as strictly; file objects of the wrong kind say what to
pass instead."""

from __future__ import annotations

import copy
import io
import json
import tracemalloc

import numpy as np
import pytest
from conftest import snapshot
from test_checkpoint import _declare_q8, _small
from test_checkpoint_fuzz import (
    POOL,
    _header,
    _identical,
    _locations,
    _members,
    _original_state,
    _set,
    _zip,
)

import adamnp
from adamnp import CheckpointError

# -- round trips: stepping on after loading equals stepping on the original, bit for bit

CASES = {
    "float32": dict(state_bits=32),
    "sqrt": dict(state_bits=8, keep_fp32=["params['k']"]),  # the default 8-bit format
    "bnb": dict(state_bits=8, state_format="bnb", keep_fp32=["params['k']"]),
}


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((64, 80)).astype(np.float32),  # 8-bit in the 8-bit cases
        "k": rng.standard_normal(5000).astype(np.float32),  # kept float32 there (keep_fp32)
        "b": rng.standard_normal(17),  # float64
        "s": np.float32([0.5]),
    }


def _grads(params, k):
    r = np.random.default_rng(100 + k)
    return {key: r.standard_normal(a.shape).astype(a.dtype) for key, a in params.items()}


def _via_state_dict(state):
    d = adamnp.state_dict(state)
    return lambda **kw: adamnp.load_state_dict(d, **kw)


def _via_bytes(state):
    buf = io.BytesIO()
    adamnp.save_state(buf, state)
    return lambda **kw: adamnp.load_state(io.BytesIO(buf.getvalue()), **kw)


@pytest.mark.parametrize("via", [_via_state_dict, _via_bytes], ids=["state_dict", "BytesIO"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_continues_bit_for_bit(backend, case, via):
    params = _params()
    cfg = adamnp.adamw(lr=1e-2, amsgrad=True)
    state = adamnp.init(params, cfg, backend=backend, **CASES[case])
    assert any(type(s).__name__ == "QuantSlot" for s in state.slots) == (case != "float32")
    for k in range(3):
        adamnp.step(params, _grads(params, k), state)
    load = via(state)  # taken now; the original steps on before it is loaded
    saved_params = copy.deepcopy(params)
    for k in range(3, 6):
        adamnp.step(params, _grads(params, k), state)
    loaded = load()
    assert loaded.backend == backend and loaded.layout == state.layout
    for k in range(3, 6):
        adamnp.step(saved_params, _grads(saved_params, k), loaded)
    assert snapshot(saved_params, loaded) == snapshot(params, state)


def test_state_dict_is_plain_and_a_copy(backend, tmp_path):
    params = _params()
    state = adamnp.init(params, adamnp.adam(), backend=backend, state_bits=8)
    adamnp.step(params, _grads(params, 0), state)
    d = adamnp.state_dict(state)
    assert sorted(d) == ["arrays", "header"]
    assert json.loads(json.dumps(d["header"])) == d["header"]
    # the same contents as the file
    adamnp.save_state(tmp_path / "s.npz", state)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as npz:
        assert json.loads(str(npz["__adamnp__"][()])) == d["header"]
        assert sorted(npz.files) == sorted([*d["arrays"], "__adamnp__"])
        for name, a in d["arrays"].items():
            assert type(a) is np.ndarray and a.flags.c_contiguous
            assert a.dtype == npz[name].dtype and a.tobytes() == npz[name].tobytes()
    before = {name: a.copy() for name, a in d["arrays"].items()}
    slots = [x for s in state.slots for x in s if isinstance(x, np.ndarray)]
    assert not any(np.shares_memory(a, x) for a in d["arrays"].values() for x in slots)
    adamnp.step(params, _grads(params, 1), state)
    assert all(before[n].tobytes() == a.tobytes() for n, a in d["arrays"].items())
    assert d["header"]["step"] == 1
    loaded = adamnp.load_state_dict(d)  # a loaded state does not share the dict's arrays
    loaded_slots = [x for s in loaded.slots for x in s if isinstance(x, np.ndarray)]
    assert not any(np.shares_memory(a, x) for a in d["arrays"].values() for x in loaded_slots)


def test_arrays_may_be_any_mapping(tmp_path):
    """For example the NpzFile of np.load, when the user stored the arrays with np.savez."""
    _, _, state = _small(tmp_path)
    d = adamnp.state_dict(state)
    np.savez(tmp_path / "arrays.npz", **d["arrays"])
    with np.load(tmp_path / "arrays.npz", allow_pickle=False) as npz:
        loaded = adamnp.load_state_dict({"header": d["header"], "arrays": npz})
    assert _identical(loaded, state)


# -- file objects


def test_file_objects_hold_the_file_format(tmp_path):
    _, _, state = _small(tmp_path)
    buf = io.BytesIO()
    adamnp.save_state(buf, state)
    (tmp_path / "from_bytes.npz").write_bytes(buf.getvalue())
    assert _identical(adamnp.load_state(tmp_path / "from_bytes.npz"), state)
    with open(tmp_path / "opened.npz", "wb") as f:
        adamnp.save_state(f, state)
        assert not f.closed
    with open(tmp_path / "opened.npz", "rb") as f:
        assert _identical(adamnp.load_state(f), state)
        assert not f.closed
    assert _identical(adamnp.load_state(tmp_path / "opened.npz"), state)


def test_file_object_is_written_from_its_position(tmp_path):
    _, _, state = _small(tmp_path)
    buf = io.BytesIO()
    buf.write(b"a preamble of the user's own")
    adamnp.save_state(buf, state)
    assert buf.getvalue().startswith(b"a preamble")
    assert _identical(adamnp.load_state(buf), state)  # a zip is found from its end


class _WriteOnly(io.RawIOBase):
    """A stream that can only be written, not sought (as a pipe or a socket)."""

    def __init__(self):
        self.chunks = []

    def writable(self):
        return True

    def write(self, data):
        self.chunks.append(bytes(data))
        return len(data)


def test_unseekable_stream_is_written_but_must_be_read_via_bytesio(tmp_path):
    _, _, state = _small(tmp_path)
    out = _WriteOnly()
    adamnp.save_state(out, state)
    data = b"".join(out.chunks)
    assert _identical(adamnp.load_state(io.BytesIO(data)), state)

    class ReadOnly:
        def read(self, n=-1):
            return data

        def seekable(self):
            return False

    with pytest.raises(ValueError, match=r"not seekable.*io\.BytesIO\(stream\.read\(\)\)"):
        adamnp.load_state(ReadOnly())


def test_wrong_file_objects_say_what_to_pass(tmp_path):
    path, _, state = _small(tmp_path)
    with open(tmp_path / "t.npz", "w") as f, pytest.raises(TypeError, match=r"text mode.*'wb'"):
        adamnp.save_state(f, state)
    with open(path) as f, pytest.raises(TypeError, match=r"text mode.*'rb'"):
        adamnp.load_state(f)
    with pytest.raises(TypeError, match="text mode"):
        adamnp.load_state(io.StringIO("text"))
    with open(path, "rb") as f, pytest.raises(ValueError, match=r"not open for writing.*'wb'"):
        adamnp.save_state(f, state)
    with open(tmp_path / "w.npz", "wb") as f, pytest.raises(ValueError, match="not open for read"):
        adamnp.load_state(f)
    closed = io.BytesIO()
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        adamnp.save_state(closed, state)
    with pytest.raises(ValueError, match="closed"):
        adamnp.load_state(closed)
    with pytest.raises(TypeError, match="load_state_dict"):
        adamnp.load_state(adamnp.state_dict(state))
    with pytest.raises(TypeError, match=r"a path or a binary file object \(such as io\.BytesIO"):
        adamnp.save_state(3.5, state)
    with pytest.raises(TypeError, match="must be an AdamState"):
        adamnp.save_state(io.BytesIO(), adamnp.state_dict(state))


def test_damaged_file_object_names_it(tmp_path):
    path, _, _ = _small(tmp_path)
    data = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"^<BytesIO>: zip directory: not readable"):
        adamnp.load_state(io.BytesIO(data[: len(data) // 2]))
    with open(path, "r+b") as f:
        f.truncate(100)
        f.seek(0)
        with pytest.raises(CheckpointError, match=r"small\.npz: zip directory"):
            adamnp.load_state(f)


# -- tampered state_dicts: CheckpointError naming the key, nothing used before it is checked


def _tampered(tmp_path, edit):
    _, _, state = _small(tmp_path)
    d = adamnp.state_dict(state)
    edit(d["header"], d["arrays"], d)
    return d


def _set_header(**fields):
    return lambda h, a, d: h.update(fields)


TAMPERED = {
    "no arrays": (lambda h, a, d: d.pop("arrays"), r"arrays: missing"),
    "no header": (lambda h, a, d: d.pop("header"), r"header: missing"),
    "extra key": (lambda h, a, d: d.update(params={}), r"state_dict: unexpected keys \['params'\]"),
    "arrays a list": (lambda h, a, d: d.update(arrays=[]), r"arrays: a list, not a dict"),
    "missing array": (
        lambda h, a, d: a.pop("leaf1/v"),
        r"array leaf1/v \(params\['b'\]\): missing",
    ),
    "extra array": (
        lambda h, a, d: a.update({"leaf1/vmax": np.zeros((2, 3), np.float32)}),
        r"arrays: unexpected arrays \['leaf1/vmax'\]",
    ),
    "non-str array key": (lambda h, a, d: a.update({7: a["leaf1/m"]}), r"unexpected arrays \[7\]"),
    "float64 for float32": (
        lambda h, a, d: a.update({"leaf1/m": a["leaf1/m"].astype(np.float64)}),
        r"array leaf1/m \(params\['b'\]\): dtype <f8, but the header implies <f4",
    ),
    "byte-swapped": (
        lambda h, a, d: a.update({"leaf2/m": a["leaf2/m"].astype(">f8")}),
        r"array leaf2/m \(params\['c'\]\): dtype >f8",
    ),
    "int8 codes": (
        lambda h, a, d: a.update({"leaf0/codes_m": a["leaf0/codes_m"].view(np.int8)}),
        r"array leaf0/codes_m \(params\['a'\]\): dtype \|i1",
    ),
    "object array": (
        lambda h, a, d: a.update({"leaf1/m": a["leaf1/m"].astype(object)}),
        r"leaf1/m .*dtype \|O",
    ),
    "wrong shape": (
        lambda h, a, d: a.update({"leaf1/m": a["leaf1/m"].reshape(6)}),
        r"array leaf1/m \(params\['b'\]\): shape \(6,\), but the header implies \(2, 3\)",
    ),
    "absmax blocks": (
        lambda h, a, d: a.update({"leaf0/absmax_v": a["leaf0/absmax_v"][:4].copy()}),
        r"array leaf0/absmax_v .*shape \(4,\)",
    ),
    "Fortran order": (
        lambda h, a, d: a.update({"leaf1/m": np.asfortranarray(a["leaf1/m"])}),
        r"array leaf1/m .*not C-contiguous.*np\.ascontiguousarray",
    ),
    "strided": (
        lambda h, a, d: a.update({"leaf2/v": np.zeros(10)[::2]}),
        r"array leaf2/v .*not C-contiguous",
    ),
    "a list": (
        lambda h, a, d: a.update({"leaf1/m": a["leaf1/m"].tolist()}),
        r"array leaf1/m \(params\['b'\]\): a builtins\.list, not a numpy\.ndarray",
    ),
    "a subclass": (
        lambda h, a, d: a.update({"leaf1/m": np.ma.masked_array(a["leaf1/m"])}),
        r"leaf1/m .*MaskedArray, not a numpy\.ndarray \(subclasses are refused; pass np\.asarray",
    ),
    "header not a dict": (_set_header(), None),  # replaced below
    "step -1": (_set_header(step=-1), r"header\['step'\]: bad step counter"),
    "step True": (_set_header(step=True), r"header\['step'\]: bad step counter"),
    "step NumPy int": (
        _set_header(step=np.int64(1)),
        r"header\['step'\]: a numpy\.int64 \(.*\), not JSON data",
    ),
    "shape a tuple": (
        lambda h, a, d: h["leaves"][1].update(shape=(2, 3)),
        r"header\['leaves'\]\[1\]\['shape'\]: a builtins\.tuple",
    ),
    "int dict key": (
        lambda h, a, d: h["config"].update({1: 2}),
        r"header\['config'\]: key 1 is not a str",
    ),
    "leaf table one short": (
        lambda h, a, d: h["leaves"].pop(),
        r"header\['leaves'\]: bad leaf table: 2 entries, but the tree has 3 leaves",
    ),
    "unknown header key": (_set_header(momentum=0.9), r"__adamnp__: unknown header keys"),
    "newer version": (_set_header(version=2), r"header\['version'\]: format version 2, newer"),
    "not adamnp": (_set_header(format="other"), r"__adamnp__: header does not describe"),
    "amsgrad without its arrays": (
        lambda h, a, d: h["config"].update(amsgrad=True),
        r"header\['leaves'\]\[0\]: .*amsgrad=True",
    ),
}
TAMPERED["header not a dict"] = (lambda h, a, d: d.update(header=[h]), r"__adamnp__: header does")


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_state_dict_names_the_key(tmp_path, case):
    edit, words = TAMPERED[case]
    d = _tampered(tmp_path, edit)
    with pytest.raises(CheckpointError, match=words) as caught:
        adamnp.load_state_dict(d, backend="numpy")
    assert str(caught.value).startswith("state_dict: ")


def test_not_a_dict():
    with pytest.raises(CheckpointError, match=r"^state_dict: state_dict: a str.*load_state"):
        adamnp.load_state_dict("opt.npz")


def test_deep_or_cyclic_header(tmp_path):
    deep = []
    for _ in range(100_000):
        deep = [deep]
    d = _tampered(tmp_path, lambda h, a, d: h.update(treedef=deep))
    with pytest.raises(CheckpointError, match=r"header\['treedef'\](\[0\])+: nested more than"):
        adamnp.load_state_dict(d)
    cyclic = {}
    cyclic["x"] = cyclic
    d = _tampered(tmp_path, lambda h, a, d: h.update(treedef=cyclic))
    with pytest.raises(CheckpointError, match="nested more than 308 levels"):
        adamnp.load_state_dict(d)


def test_deepest_tree_round_trips():
    """A tree of dicts as deep as adamnp takes (MAX_DEPTH) is no deeper than a header may be."""
    from adamnp._tree import MAX_DEPTH

    params = np.ones(3, np.float32)
    for _ in range(MAX_DEPTH):
        params = {"x": params}
    state = adamnp.init(params, adamnp.adam(), backend="numpy")
    assert _identical(adamnp.load_state_dict(adamnp.state_dict(state)), state)
    buf = io.BytesIO()
    adamnp.save_state(buf, state)
    assert _identical(adamnp.load_state(buf), state)


@pytest.mark.parametrize("n", [200_000_000, 10**12, 2**59])
def test_huge_declared_size_allocates_nothing(tmp_path, n):
    """A header, consistent in itself, that declares an 8-bit leaf of ``n`` elements: refused
    when the arrays are checked, before the state is allocated (no MemoryError, and the peak
    memory stays small)."""
    d = _tampered(tmp_path, lambda h, a, d: _declare_q8(h, 0, n))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"array leaf0/codes_m .*shape \(300,\)"):
            adamnp.load_state_dict(d, backend="numpy")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_schedule_needs_config():
    params = {"w": np.ones(3, np.float32)}
    cfg = adamnp.adamw(lr=lambda count: 1e-3)
    state = adamnp.init(params, cfg, backend="numpy")
    d = adamnp.state_dict(state)
    assert d["header"]["config"]["lr"] is None
    with pytest.raises(ValueError, match=r"pass config=\.\.\. to load_state_dict"):
        adamnp.load_state_dict(d)
    assert adamnp.load_state_dict(d, config=cfg).config is cfg


# -- one home for the checks: a state_dict is refused exactly when the file would be


def _key_and_rest(exc: CheckpointError) -> tuple[str, str]:
    _where, key, rest = str(exc).split(": ", 2)
    return key, rest


def test_state_dict_is_exactly_as_strict_as_the_file():
    """Every value of the header set to each hostile value of the fuzz test: the file and the
    state_dict are refused alike (the same key; for the header the same message) or load
    the same state."""
    state = _original_state()
    arrays = adamnp.state_dict(state)["arrays"]
    members = _members(_zip_of(state))
    header = _header(members)
    refused = loaded = 0
    for at in [at for at in _locations(header) if at != ("format",)]:
        for value in POOL:
            forged = copy.deepcopy(header)
            _set(forged, at, value)
            from_file = _outcome(lambda f=forged: adamnp.load_state(io.BytesIO(_zip(members, f))))
            from_dict = _outcome(
                lambda f=forged: adamnp.load_state_dict({"header": f, "arrays": arrays})
            )
            case = f"{at} = {value!r}"
            assert type(from_file) is type(from_dict), case
            if isinstance(from_file, CheckpointError):
                (kf, rf), (kd, rd) = _key_and_rest(from_file), _key_and_rest(from_dict)
                assert kf == kd, case
                assert kf.startswith("array ") or rf == rd, case
                refused += 1
            else:
                assert _identical(from_file, from_dict), case
                loaded += 1
    assert refused > 2000 and loaded > 0


def _zip_of(state) -> bytes:
    buf = io.BytesIO()
    adamnp.save_state(buf, state)
    return buf.getvalue()


def _outcome(load):
    try:
        return load()
    except CheckpointError as exc:
        return exc
