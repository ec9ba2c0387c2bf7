"""Checkpoints: bit-exact resume across processes, atomic writes, loud failures."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

import adamnp
from adamnp import CheckpointError, backends

ROOT = Path(__file__).resolve().parent.parent

# A training script run in fresh processes: `run(state_or_none, first, last)` takes steps
# first..last-1 with gradients that depend only on the step index.
SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, adamnp
    mode, backend, bits, path, out, n, m = sys.argv[1:8]
    n, m = int(n), int(m)
    formats = {"8b": (8, "bnb", "nearest"), "8s": (8, "bnb", "stochastic")}
    bits, fmt, rounding = formats[bits] if bits in formats else (int(bits), "sqrt", None)
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((64, 80)).astype(np.float32),
              "b": rng.standard_normal(17).astype(np.float64), "s": np.float32([0.5])}
    def grads(k):
        r = np.random.default_rng(100 + k)
        return {key: r.standard_normal(a.shape).astype(a.dtype) for key, a in params.items()}
    cfg = adamnp.adamw(lr=1e-2, amsgrad=True, nonfinite="skip")
    if mode == "all":
        state = adamnp.init(params, cfg, backend=backend, state_bits=bits,
                             state_format=fmt, v_rounding=rounding)
        steps = range(n + m)
    elif mode == "first":
        state = adamnp.init(params, cfg, backend=backend, state_bits=bits,
                             state_format=fmt, v_rounding=rounding)
        steps = range(n)
    else:
        loaded = np.load(out + ".params.npz")
        for key in params:
            params[key][...] = loaded[key]
        state = adamnp.load_state(path)
        steps = range(n, n + m)
    for k in steps:
        g = grads(k)
        if k == 3:
            g["w"][0, 0] = np.nan  # a skipped step must survive the round trip too
        adamnp.step(params, g, state)
    if mode == "first":
        adamnp.save_state(path, state)
        np.savez(out + ".params.npz", **params)
    else:
        np.savez(out, step=state.step, skipped=state.skipped_steps, **params,
                 **{f"state{i}_{k}": np.asarray(v) for i, s in enumerate(state.slots)
                    for k, v in s._asdict().items() if isinstance(v, np.ndarray)})
    """
)


def _run(tmp_path, *args):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(adamnp.__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, str(script), *map(str, args)], check=True, env=env)


# 8: the default "sqrt" format; 8b / 8s: the "bnb" format, v rounded to nearest / stochastically
@pytest.mark.parametrize("bits", [32, 8, "8b", "8s"])
def test_resume_in_new_process_is_bit_identical(tmp_path, backend, bits):
    ckpt, full, resumed = tmp_path / "s.npz", tmp_path / "full", tmp_path / "resumed"
    _run(tmp_path, "all", backend, bits, ckpt, full, 5, 4)
    _run(tmp_path, "first", backend, bits, ckpt, resumed, 5, 4)
    _run(tmp_path, "rest", backend, bits, ckpt, resumed, 5, 4)
    a, b = np.load(f"{full}.npz"), np.load(f"{resumed}.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        assert a[key].dtype == b[key].dtype
        assert a[key].tobytes() == b[key].tobytes(), key
    assert int(a["skipped"]) == 1 and int(a["step"]) == 8


def _saved(tmp_path, **cfg):
    p = {"w": np.ones((3, 4), np.float32)}
    state = adamnp.init(p, adamnp.adamw(**cfg), backend="numpy")
    adamnp.step(p, {"w": np.full((3, 4), 0.5, np.float32)}, state)
    path = tmp_path / "ckpt.npz"
    adamnp.save_state(path, state)
    return path, state


def test_dtypes_and_values_preserved(tmp_path):
    path, state = _saved(tmp_path)
    loaded = adamnp.load_state(path)
    assert loaded.step == 1 and loaded.config == state.config
    for s, t in zip(state.slots, loaded.slots):
        assert s.m.dtype == t.m.dtype and s.m.tobytes() == t.m.tobytes()


def test_truncated_file(tmp_path):
    path, _ = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged, truncated"):
        adamnp.load_state(path)


def test_corrupted_byte(tmp_path):
    path, state = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    # flip a byte inside the stored first moment
    needle = state.slots[0].m.tobytes()
    pos = bytes(data).index(needle)
    data[pos + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        adamnp.load_state(path)


def test_foreign_npz_and_non_zip(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, m=np.zeros(3))
    with pytest.raises(CheckpointError, match="not an adamnp checkpoint"):
        adamnp.load_state(foreign)
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(CheckpointError):
        adamnp.load_state(text)


def _rewrite_header(path, edit):
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(str(arrays["__adamnp__"][()]))
    edit(header, arrays)
    arrays["__adamnp__"] = np.array(json.dumps(header))
    np.savez(path, **arrays)


def test_v_rounding_is_saved_and_checked(tmp_path):
    p = {"w": np.ones(5000, np.float32)}
    state = adamnp.init(p, adamnp.adamw(), backend="numpy", state_bits=8, v_rounding="stochastic",
                        state_format="bnb")  # fmt: skip
    path = tmp_path / "sr.npz"
    adamnp.save_state(path, state)
    assert adamnp.load_state(path).v_rounding == "stochastic"
    assert all(g.v_rounding == "stochastic" for g in adamnp.load_state(path).groups)
    # files written before the options existed hold bnb-format, nearest-rounded state
    _rewrite_header(path, lambda h, a: (h.pop("v_rounding"), h.pop("state_format")))
    loaded = adamnp.load_state(path)
    assert (loaded.v_rounding, loaded.state_format) == ("nearest", "bnb")
    _rewrite_header(path, lambda h, a: h.update(v_rounding="dithered"))
    with pytest.raises(CheckpointError, match="v_rounding"):
        adamnp.load_state(path)


def test_newer_format_version(tmp_path):
    path, _ = _saved(tmp_path)
    _rewrite_header(path, lambda h, a: h.update(version=99))
    with pytest.raises(CheckpointError, match="newer"):
        adamnp.load_state(path)


def test_array_that_disagrees_with_header(tmp_path):
    path, _ = _saved(tmp_path)
    _rewrite_header(path, lambda h, a: a.update({"leaf0/m": a["leaf0/m"].astype(np.float64)}))
    with pytest.raises(CheckpointError, match="dtype"):
        adamnp.load_state(path)
    path, _ = _saved(tmp_path)
    _rewrite_header(path, lambda h, a: a.update({"extra": np.zeros(1)}))
    with pytest.raises(CheckpointError, match="unexpected"):
        adamnp.load_state(path)
    path, _ = _saved(tmp_path)
    _rewrite_header(path, lambda h, a: a.pop("leaf0/v"))
    with pytest.raises(CheckpointError, match="missing"):
        adamnp.load_state(path)


def test_no_pickle_inside(tmp_path):
    path, _ = _saved(tmp_path)
    with np.load(path, allow_pickle=False) as npz:
        assert all(npz[k].dtype != object for k in npz.files)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None


def test_crash_during_write_keeps_previous_file(tmp_path, monkeypatch):
    path, state = _saved(tmp_path)
    good = path.read_bytes()

    def boom(f, **arrays):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        adamnp.save_state(path, state)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]  # no temporary left behind
    monkeypatch.undo()
    assert adamnp.load_state(path).step == 1


def test_schedule_needs_config(tmp_path):
    path, state = _saved(tmp_path, lr=lambda c: 1e-3)
    with pytest.raises(ValueError, match="lr schedule"):
        adamnp.load_state(path)
    loaded = adamnp.load_state(path, config=state.config)
    assert loaded.step == 1
    with pytest.raises(ValueError, match="weight_decay"):
        adamnp.load_state(path, config=adamnp.adamw(lr=lambda c: 1e-3, weight_decay=0.5))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        adamnp.load_state(os.path.join(tmp_path, "nope.npz"))


def _layout_tree():
    return {"big": np.ones(5000, np.float32), "emb": np.ones((70, 80), np.float32),
            "mid": np.ones(300, np.float32), "f64": np.ones(6000, np.float64)}  # fmt: skip


LAYOUTS = {
    "32-bit": {},
    "defaults": dict(state_bits=8),
    "keep": dict(state_bits=8, block_size=64, keep_fp32=["params['emb']"]),
    "min 100": dict(state_bits=8, min_8bit_size=100, v_rounding="stochastic"),
    "bnb": dict(state_bits=8, state_format="bnb"),
    "bnb + keep": dict(
        state_bits=8, state_format="bnb", block_size=64, keep_fp32=["params['emb']"]
    ),
    "min 100 + keep": dict(state_bits=8, min_8bit_size=100, keep_fp32=lambda p, a: a.ndim == 2),
    "huge min": dict(state_bits=8, min_8bit_size=10**9),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_layout_round_trip(tmp_path, case):
    with warnings.catch_warnings():  # "huge min": init warns that no leaf is 8-bit
        warnings.simplefilter("ignore", UserWarning)
        state = adamnp.init(_layout_tree(), adamnp.adamw(), backend="numpy", **LAYOUTS[case])
    path = tmp_path / "s.npz"
    adamnp.save_state(path, state)
    loaded = adamnp.load_state(path)
    assert loaded.layout == state.layout
    assert all(g.layout is loaded.layout for g in loaded.groups)
    kinds = lambda s: [type(x).__name__ for x in s.slots]  # noqa: E731
    # Files written before min_8bit_size and keep_fp32 were recorded: a layout that gives the
    # same slots (and the same layout where init's default min_8bit_size explains them).
    _rewrite_header(path, lambda h, a: (h.pop("min_8bit_size"), h.pop("keep_fp32")))
    old = adamnp.load_state(path)
    assert kinds(old) == kinds(state)
    assert old.layout.eight_bit(old.paths, old.shapes, old.dtypes) == [
        type(x).__name__ == "QuantSlot" for x in state.slots
    ]
    fields = ("state_bits", "block_size", "v_rounding")
    assert [getattr(old.layout, f) for f in fields] == [getattr(state.layout, f) for f in fields]
    if case in ("32-bit", "defaults", "keep", "bnb", "bnb + keep"):
        assert old.layout == state.layout
    for a, b in zip(old.slots, state.slots):
        assert all(np.array_equal(x, y) for x, y in zip(a, b) if isinstance(x, np.ndarray))


def test_header_format_is_unchanged_but_for_three_layout_keys(tmp_path):
    state = adamnp.init(_layout_tree(), adamnp.adam(), backend="numpy", **LAYOUTS["bnb + keep"])
    path = tmp_path / "s.npz"
    adamnp.save_state(path, state)
    with np.load(path) as npz:
        header = json.loads(str(npz["__adamnp__"][()]))
    assert header["version"] == 1
    assert list(header) == ["format", "version", "config", "backend", "step", "skipped_steps",
                            "state_bits", "state_format", "block_size", "min_8bit_size",
                            "v_rounding",
                            "keep_fp32", "treedef", "leaves"]  # fmt: skip
    assert list(header["config"]) == ["optimizer", "lr", "lr_schedule", "betas", "eps",
                                      "weight_decay", "amsgrad", "maximize", "nonfinite",
                                      "max_grad_norm"]  # fmt: skip
    assert header["keep_fp32"] == ["params['emb']"] and header["min_8bit_size"] == 4096
    q8 = [e for e in header["leaves"] if e["slot"] == "q8"]
    maps = ("dynamic-signed-8bit", "dynamic-unsigned-8bit")
    assert q8 and all((e["block_size"], e["map_m"], e["map_v"]) == (64, *maps) for e in q8)
    assert list(q8[0]["arrays"]) == ["codes_m", "codes_v", "absmax_m", "absmax_v"]


BAD_HEADERS = {
    "state_bits": (lambda h, a: h.update(state_bits=16), "state_bits must be 32 or 8"),
    "no state_bits": (lambda h, a: h.pop("state_bits"), "incomplete header: no state_bits"),
    "block_size": (lambda h, a: h.update(block_size=100), "block_size must be a power of two"),
    "state_format": (lambda h, a: h.update(state_format="fp8"), "state_format must be one of"),
    "format of other maps": (
        lambda h, a: h.update(state_format="bnb"),
        r"params\['w'\]: 8-bit layout \(block size or maps\) not supported",
    ),
    "sqrt, nearest": (lambda h, a: h.update(v_rounding="nearest"), "only available with"),
    "block_size text": (lambda h, a: h.update(block_size="256"), "block_size"),
    "min_8bit_size": (lambda h, a: h.update(min_8bit_size="big"), "min_8bit_size must be an int"),
    "keep_fp32 text": (lambda h, a: h.update(keep_fp32="params['w']"), "keep_fp32 must be a list"),
    "keep_fp32 null": (lambda h, a: h.update(keep_fp32=None), "keep_fp32 must be a list"),
    "keep_fp32 path": (lambda h, a: h.update(keep_fp32=["params['x']"]), "keep_fp32 names"),
    "kept but 8-bit": (
        lambda h, a: h.update(keep_fp32=["params['w']"]),
        r"params\['w'\] has q8 moments, which its layout",
    ),
    "8-bit but 32": (lambda h, a: h.update(state_bits=32), r"params\['w'\] has q8 moments"),
    "slot kind": (lambda h, a: h["leaves"][0].update(slot="q4"), "bad leaf entry"),
    "leaf dtype": (lambda h, a: h["leaves"][0].update(dtype="<i4"), "bad leaf entry"),
    "leaf path": (lambda h, a: h["leaves"][0].update(path=["w"]), "bad leaf entry"),
    "leaf block size": (lambda h, a: h["leaves"][0].update(block_size=64), "8-bit layout"),
    "leaf map": (lambda h, a: h["leaves"][0].update(map_v="signed"), "8-bit layout"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_layout_in_header_is_named(tmp_path, case):
    p = {"w": np.ones(5000, np.float32)}
    state = adamnp.init(p, adamnp.adamw(), backend="numpy", state_bits=8)
    path = tmp_path / "s.npz"
    adamnp.save_state(path, state)
    edit, words = BAD_HEADERS[case]
    _rewrite_header(path, edit)
    with pytest.raises(CheckpointError, match=words):
        adamnp.load_state(path)


def test_config_options_added_later_take_their_default(monkeypatch):
    """An AdamConfig field with a default is an option older files may lack."""
    import dataclasses

    from adamnp import _checkpoint

    @dataclasses.dataclass(frozen=True)
    class Extended(adamnp.AdamConfig):
        coefficient: tuple = (0.5, 1.0)

    saved = _checkpoint._config_to_json(adamnp.adam())
    assert _checkpoint._saved_config(saved) == saved
    monkeypatch.setattr(_checkpoint, "AdamConfig", Extended)
    assert _checkpoint._saved_config(saved) == {**saved, "coefficient": [0.5, 1.0]}
    assert _checkpoint._saved_config({**saved, "coefficient": [2, 3]})["coefficient"] == [2, 3]


def test_header_config_must_be_complete(tmp_path):
    path, _ = _saved(tmp_path)
    _rewrite_header(path, lambda h, a: h["config"].pop("eps"))
    with pytest.raises(CheckpointError, match="bad configuration in header: 'eps'"):
        adamnp.load_state(path)
    _rewrite_header(path, lambda h, a: h.update(config=[1, 2]))
    with pytest.raises(CheckpointError, match="bad configuration in header"):
        adamnp.load_state(path)


# -- hostile files (reliability issue): checked before anything is allocated, every failure a
# CheckpointError naming the file and the key, no loaded state that a step could crash on


def _small(tmp_path, **cfg):
    """A checkpoint of an 8-bit leaf 'a' (300 elements, 5 blocks of 64), a float32 leaf 'b'
    and a float64 leaf 'c', after one step."""
    params = {
        "a": np.linspace(-1, 1, 300, dtype=np.float32),
        "b": np.ones((2, 3), np.float32),
        "c": np.ones(5, np.float64),
    }
    state = adamnp.init(
        params, adamnp.adamw(**cfg), backend="numpy", state_bits=8, min_8bit_size=100,
        block_size=64,
    )  # fmt: skip
    adamnp.step(params, {k: np.full_like(v, 0.5) for k, v in params.items()}, state)
    path = tmp_path / "small.npz"
    adamnp.save_state(path, state)
    return path, params, state


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def _forge(path, edit=None, header_text=None, compression=zipfile.ZIP_STORED):
    """Rewrite checkpoint ``path`` as a valid zip: ``edit(header, members)`` may change the
    header (a dict) and the members (name -> bytes) in place; ``header_text`` replaces the
    header's JSON text outright."""
    with zipfile.ZipFile(path) as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    header = json.loads(str(np.load(io.BytesIO(members["__adamnp__.npy"]))[()]))
    if edit is not None:
        edit(header, members)
    text = json.dumps(header) if header_text is None else header_text
    members["__adamnp__.npy"] = _npy(np.array(text))
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)


def _set_tree(h, children):
    h["treedef"] = {"dict": [[k, None] for k in children]}


def _declare_q8(h, i, n, dtype="<f4"):
    """Make leaf ``i`` of the header an 8-bit leaf of ``n`` elements, consistently."""
    blocks = -(-n // h["block_size"])
    h["leaves"][i].update(
        shape=[n], dtype=dtype, slot="q8", block_size=h["block_size"],
        map_m="ratio-int8", map_v="sqrt-graded-8bit-2",
        arrays={"codes_m": {"dtype": "|u1", "shape": [n]},
                "codes_v": {"dtype": "|u1", "shape": [n]},
                "absmax_m": {"dtype": "<f4", "shape": [blocks]},
                "absmax_v": {"dtype": "<f4", "shape": [blocks]}},
    )  # fmt: skip


def _arrays(h, i, **fields):
    h["leaves"][i]["arrays"].update(fields)


FORGED = {
    # the tree against the leaf table: a short tree made the next step crash (segfault on
    # numba, IndexError after changing params on NumPy)
    "tree has fewer leaves": (lambda h, m: _set_tree(h, "ab"), "2 leaves"),
    "tree has more leaves": (lambda h, m: _set_tree(h, "abcd"), "4 leaves"),
    "tree names other leaves": (lambda h, m: _set_tree(h, "abd"), "leaf 2 of the tree"),
    "tree keys unsorted": (lambda h, m: _set_tree(h, "bac"), "unsorted"),
    "tree keys repeated": (lambda h, m: _set_tree(h, "abcc"), "repeated"),
    "tree too deep": (
        lambda h, m: h.update(treedef=json.loads('{"list": [' * 150 + "null" + "]}" * 150)),
        "tree",  # deeper than _tree.MAX_DEPTH, or else one leaf for three entries
    ),
    # slot kinds against dtypes, stored arrays against leaf shapes, dtypes, block counts
    "8-bit slot of a float64 leaf": (
        lambda h, m: _declare_q8(h, 2, 5, "<f8"),
        "float32 leaves only",
    ),
    "leaf dtype float16": (lambda h, m: h["leaves"][1].update(dtype="<f2"), "dtype '<f2'"),
    "leaf dtype object": (lambda h, m: h["leaves"][1].update(dtype="|O"), "dtype '|O'"),
    "array shape": (lambda h, m: _arrays(h, 1, m={"dtype": "<f4", "shape": [6]}), "'m'"),
    "array dtype object": (
        lambda h, m: _arrays(h, 1, m={"dtype": "|O", "shape": [2, 3]}),
        r"'\|O'",
    ),
    "array dtype float64": (lambda h, m: _arrays(h, 1, m={"dtype": "<f8", "shape": [2, 3]}), "<f8"),
    "codes dtype": (
        lambda h, m: _arrays(h, 0, codes_m={"dtype": "|i1", "shape": [300]}),
        "codes_m",
    ),
    "absmax blocks": (
        lambda h, m: _arrays(h, 0, absmax_m={"dtype": "<f4", "shape": [4]}),
        "absmax_m",
    ),
    "amsgrad arrays without amsgrad": (
        lambda h, m: (
            _arrays(h, 1, vmax={"dtype": "<f4", "shape": [2, 3]}),
            m.update({"leaf1/vmax.npy": _npy(np.zeros((2, 3), np.float32))}),
        ),
        "amsgrad=False",
    ),
    "amsgrad without its arrays": (lambda h, m: h["config"].update(amsgrad=True), "amsgrad=True"),
    "unknown leaf key": (lambda h, m: h["leaves"][1].update(block_size=64), "unknown keys"),
    # unvalidated fields
    "version true": (lambda h, m: h.update(version=True), "version"),
    "step true": (lambda h, m: h.update(step=True), "step"),
    "step 2**200": (lambda h, m: h.update(step=2**200), "step"),
    "step negative": (lambda h, m: h.update(step=-1), "step"),
    "skipped 2**63": (lambda h, m: h.update(skipped_steps=2**63), "skipped_steps"),
    "skipped float": (lambda h, m: h.update(skipped_steps=1.0), "skipped_steps"),
    "state_bits text": (lambda h, m: h.update(state_bits="abc"), "state_bits"),
    "state_bits 7": (lambda h, m: h.update(state_bits=7), "state_bits"),
    "state_bits float": (lambda h, m: h.update(state_bits=8.0), "state_bits"),
    "backend evil": (lambda h, m: h.update(backend="evil"), "backend"),
    "shape -5": (lambda h, m: h["leaves"][1].update(shape=[-5]), "shape"),
    "shape text": (lambda h, m: h["leaves"][1].update(shape="23"), "shape"),
    "shape bool": (lambda h, m: h["leaves"][1].update(shape=[True, 6]), "shape"),
    "unknown header key": (lambda h, m: h.update(momentum=0.9), "unknown header keys"),
    "lr schedule and lr": (lambda h, m: h["config"].update(lr_schedule="f"), "lr_schedule"),
    "optimizer list": (lambda h, m: h["config"].update(optimizer=["adam"]), "optimizer"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_header_is_refused(tmp_path, case):
    path, _, _ = _small(tmp_path)
    edit, words = FORGED[case]
    _forge(path, edit)
    with pytest.raises(CheckpointError, match=words) as caught:
        adamnp.load_state(path, backend="numpy")
    assert str(path) in str(caught.value)


def test_tree_shorter_than_leaf_table_cannot_reach_a_step(tmp_path):
    """The forged file used to load; its first step raised IndexError after params of the
    8-bit group had been updated (NumPy) or segfaulted (numba)."""
    path, _, _ = _small(tmp_path)
    _forge(path, lambda h, m: _set_tree(h, "ab"))
    with pytest.raises(CheckpointError, match=r"header\['leaves'\]: bad leaf table: 3 entries"):
        adamnp.load_state(path, backend="numpy")


def test_deep_json_header(tmp_path):
    path, _, _ = _small(tmp_path)
    _forge(path, header_text="[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="unreadable header"):
        adamnp.load_state(path)


def test_flipped_compression_method(tmp_path):
    path, _, _ = _small(tmp_path)
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02")  # the last entry of the central directory
    data[central + 10] ^= 1  # its compression method: stored (0) -> shrunk (1)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="compression method 1"):
        adamnp.load_state(path)


def test_damaged_npy_header_with_a_valid_crc(tmp_path):
    path, _, _ = _small(tmp_path)
    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': ((2, 3), }"
    text = text.ljust(118) + b"\n"
    damaged = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + bytes(24)
    _forge(path, lambda h, m: m.update({"leaf1/m.npy": damaged}))
    with pytest.raises(CheckpointError, match=r"leaf1/m \(params\['b'\]\).*\.npy header"):
        adamnp.load_state(path)


def test_member_that_is_not_an_array(tmp_path):
    path, _, _ = _small(tmp_path)
    _forge(path, lambda h, m: m.update({"leaf1/m.npy": b"raw bytes, no .npy header" * 5}))
    with pytest.raises(CheckpointError, match=r"leaf1/m .*not a \.npy array"):
        adamnp.load_state(path)


def test_object_member_is_refused_without_unpickling(tmp_path):
    path, _, _ = _small(tmp_path)
    text = b"{'descr': '|O', 'fortran_order': False, 'shape': (2, 3), }".ljust(117) + b"\n"
    obj = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + bytes(24)
    _forge(path, lambda h, m: m.update({"leaf1/m.npy": obj}))
    with pytest.raises(CheckpointError, match=r"'\|O'"):
        adamnp.load_state(path)


def test_plain_npy_file(tmp_path):
    path = tmp_path / "plain.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(CheckpointError, match=r"not an \.npz file"):
        adamnp.load_state(path)


def _peak_bytes_refusing(path) -> int:
    """The most memory Python and NumPy held while ``load_state(path)`` refused the file."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError):
            adamnp.load_state(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_huge_declared_leaf_is_refused_before_allocating(tmp_path):
    """A small file whose header, consistent in itself, declares a 200 MB 8-bit leaf (the
    issue's 10 KB file declared 3e9 elements and drove the process to 5.9 GB)."""
    path, _, _ = _small(tmp_path)
    _forge(path, lambda h, m: _declare_q8(h, 0, 200_000_000))
    assert path.stat().st_size < 20_000
    assert _peak_bytes_refusing(path) < 8 << 20
    with pytest.raises(
        CheckpointError, match=r"leaf0/codes_m .*declares \d+ bytes; the header implies 200000010"
    ):
        adamnp.load_state(path)


def test_shape_beyond_memory_is_refused(tmp_path):
    path, _, _ = _small(tmp_path)
    _forge(path, lambda h, m: _declare_q8(h, 0, 10**12))
    with pytest.raises(CheckpointError, match="declares"):
        adamnp.load_state(path)


def _deflated_member(path, name, array_bytes: int):
    """Replace member ``name`` by a deflated .npy of ``array_bytes`` bytes of zeros."""
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist() if i.filename != name}
    shape = (array_bytes // 4,)
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": shape}
            )
            zeros = bytes(1 << 22)
            for _ in range(array_bytes // len(zeros)):
                f.write(zeros)


def test_deflated_member_larger_than_the_header_implies(tmp_path):
    """The issue's 3 MB deflated member declaring 3 GB took 23 s and 3.2 GB; here 100 MB."""
    path, _, _ = _small(tmp_path)
    _deflated_member(path, "leaf1/m.npy", 100 << 20)
    assert path.stat().st_size < 1 << 20
    assert _peak_bytes_refusing(path) < 8 << 20
    with pytest.raises(
        CheckpointError, match=r"leaf1/m \(params\['b'\]\): the zip member declares"
    ):
        adamnp.load_state(path)


def test_compressed_checkpoint_loads_identically(tmp_path):
    path, _, state = _small(tmp_path)
    _forge(path, compression=zipfile.ZIP_DEFLATED)
    loaded = adamnp.load_state(path)
    assert all(
        a.tobytes() == b.tobytes()
        for s, t in zip(state.slots, loaded.slots)
        for a, b in zip(s, t)
        if isinstance(a, np.ndarray)
    )


def test_backend_auto(tmp_path):
    path, _, _ = _small(tmp_path)
    assert adamnp.load_state(path, backend="auto").backend == backends.resolve("auto")


def test_unknown_backend_is_an_argument_error(tmp_path):
    path = tmp_path / "damaged.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"backend must be one of .* or 'auto', got 'evil'") as e:
        adamnp.load_state(path, backend="evil")
    assert not isinstance(e.value, CheckpointError)


def test_save_into_missing_folder_names_the_target(tmp_path):
    _, _, state = _small(tmp_path)
    target = tmp_path / "no such folder" / "opt.npz"
    with pytest.raises(FileNotFoundError) as caught:
        adamnp.save_state(target, state)
    assert caught.value.filename == str(target)
    assert "adamnp-tmp" not in str(caught.value)


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_file_mode_follows_the_umask(tmp_path, umask):
    _, _, state = _small(tmp_path)
    old = os.umask(umask)
    try:
        adamnp.save_state(tmp_path / "new.npz", state)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.npz").stat().st_mode) == 0o666 & ~umask


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600])
def test_overwriting_keeps_the_mode(tmp_path, mode):
    path, _, state = _small(tmp_path)
    os.chmod(path, mode)
    old = os.umask(0o077)
    try:
        adamnp.save_state(path, state)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


TEMP = re.compile(r"\.opt\.npz\.adamnp-tmp-[0-9a-f]{16}")


def test_temporary_file_is_named_after_the_target(tmp_path, monkeypatch):
    _, _, state = _small(tmp_path)
    seen = []
    savez = np.savez

    def spy(f, **arrays):
        seen.extend(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
        savez(f, **arrays)

    monkeypatch.setattr(np, "savez", spy)
    adamnp.save_state(tmp_path / "opt.npz", state)
    assert len(seen) == 1 and TEMP.fullmatch(seen[0])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.skipif(os.name == "nt", reason="flock")
def test_stale_temporary_files_of_the_target_are_removed(tmp_path):
    """Crashed saves (kill -9) left temporaries that piled up. A save removes its target's
    temporaries untouched for ten minutes and not locked by a live save; nothing else."""
    import fcntl

    _, _, state = _small(tmp_path)
    hour_ago = time.time() - 3600
    names = {
        "stale": ".opt.npz.adamnp-tmp-0123456789abcdef",
        "stale too": ".opt.npz.adamnp-tmp-fedcba9876543210",
        "fresh": ".opt.npz.adamnp-tmp-00000000000000ff",
        "locked": ".opt.npz.adamnp-tmp-0000000000000a0c",
        "other target": ".other.npz.adamnp-tmp-0123456789abcdef",
        "prefix of another": ".opt.npz.adamnp-tmp-0123456789abcdef0",
        "not random": ".opt.npz.adamnp-tmp-notes",
        "user file": "opt.npz.adamnp-tmp-0123456789abcdef",
        "old style": ".adamnp-abcd1234.tmp",
    }
    for case, name in names.items():
        (tmp_path / name).write_bytes(b"partial")
        if case != "fresh":
            os.utime(tmp_path / name, (hour_ago, hour_ago))
    with open(tmp_path / names["locked"], "rb") as held:  # a live save of the same target
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        adamnp.save_state(tmp_path / "opt.npz", state)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"small.npz", "opt.npz", *names.values()} - {names["stale"], names["stale too"]}


def test_long_target_name_keeps_temporary_names_short(tmp_path):
    _, _, state = _small(tmp_path)
    target = tmp_path / ("x" * 250)
    adamnp.save_state(target, state)
    assert adamnp.load_state(target).step == 1


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_files_from_before_state_format_resume_as_bnb(rounding, backend):
    """Files written before the "sqrt" format existed hold bitsandbytes-format state: they
    load as state_format="bnb" and step on exactly as the code that wrote them did
    (vectors from tools/make_old_checkpoints.py, run on that code)."""
    import importlib.util

    if backend == "numba" and importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed")
    spec = importlib.util.spec_from_file_location(
        "make_old_checkpoints", ROOT / "tools" / "make_old_checkpoints.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    vectors = ROOT / "tests" / "vectors"
    state = adamnp.load_state(vectors / f"checkpoint_v1_bnb_{rounding}.npz", backend=backend)
    assert (state.state_format, state.v_rounding, state.step) == ("bnb", rounding, 5)
    with np.load(vectors / f"checkpoint_v1_bnb_{rounding}_params.npz") as saved:
        p = {k: saved[f"start_{k}"].copy() for k in ("w", "b")}  # the tool's order
        for k in range(5, 10):
            adamnp.step(p, tool.grads(p, k), state)
        for key in p:
            assert p[key].tobytes() == saved[f"end_{key}"].tobytes()


def test_sqrt_state_written_before_the_wide_map_loads_as_it_is():
    """``"sqrt"`` files written before 2026-12-06 name the map of ``s``
    ``"sqrt-graded-8bit"``: every block on the narrow map, absmax non-negative, which means
    the same in the current format. Such a state (a narrow-only state renamed) loads bit for
    bit and steps on as the state it was taken from; another unknown map name is refused."""
    rng = np.random.default_rng(3)
    p = {"w": rng.standard_normal(5000).astype(np.float32)}
    state = adamnp.init(p, adamnp.adamw(), backend="numpy", state_bits=8)

    def grad():  # sizes within one binade: every block stays on the narrow map
        return {"w": (rng.uniform(0.5, 1, 5000) * rng.choice([-1, 1], 5000)).astype(np.float32)}

    adamnp.step(p, grad(), state)
    assert np.all(state.slots[0].absmax_v >= 0)
    d = adamnp.state_dict(state)
    old = json.loads(json.dumps(d["header"]))
    assert old["leaves"][0]["map_v"] == "sqrt-graded-8bit-2"
    old["leaves"][0]["map_v"] = "sqrt-graded-8bit"
    loaded = adamnp.load_state_dict({"header": old, "arrays": d["arrays"]})
    g = grad()
    p2 = {"w": p["w"].copy()}
    adamnp.step(p, g, state)
    adamnp.step(p2, g, loaded)
    np.testing.assert_array_equal(p["w"], p2["w"])
    old["leaves"][0]["map_v"] = "sqrt-graded-8bit-3"
    with pytest.raises(CheckpointError, match="maps"):
        adamnp.load_state_dict({"header": old, "arrays": d["arrays"]})
