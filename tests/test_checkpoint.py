"""Checkpoints: bit-exact resume across processes, atomic writes, loud failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import adamnp
from adamnp import CheckpointError

# A training script run in fresh processes: `run(state_or_none, first, last)` takes steps
# first..last-1 with gradients that depend only on the step index.
SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, adamnp
    mode, backend, bits, path, out, n, m = sys.argv[1:8]
    n, m = int(n), int(m)
    bits, rounding = (8, "stochastic") if bits == "8s" else (int(bits), "nearest")
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((64, 80)).astype(np.float32),
              "b": rng.standard_normal(17).astype(np.float64), "s": np.float32([0.5])}
    def grads(k):
        r = np.random.default_rng(100 + k)
        return {key: r.standard_normal(a.shape).astype(a.dtype) for key, a in params.items()}
    cfg = adamnp.adamw(lr=1e-2, amsgrad=True, nonfinite="skip")
    if mode == "all":
        state = adamnp.init(params, cfg, backend=backend, state_bits=bits, v_rounding=rounding)
        steps = range(n + m)
    elif mode == "first":
        state = adamnp.init(params, cfg, backend=backend, state_bits=bits, v_rounding=rounding)
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


@pytest.mark.parametrize("bits", [32, 8, "8s"])  # 8s: 8-bit, stochastic rounding of v
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
    state = adamnp.init(p, adamnp.adamw(), backend="numpy", state_bits=8, v_rounding="stochastic")
    path = tmp_path / "sr.npz"
    adamnp.save_state(path, state)
    assert adamnp.load_state(path).v_rounding == "stochastic"
    assert all(g.v_rounding == "stochastic" for g in adamnp.load_state(path).groups)
    # files written before the option existed hold nearest-rounded state
    _rewrite_header(path, lambda h, a: h.pop("v_rounding"))
    assert adamnp.load_state(path).v_rounding == "nearest"
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
    "min 100 + keep": dict(state_bits=8, min_8bit_size=100, keep_fp32=lambda p, a: a.ndim == 2),
    "huge min": dict(state_bits=8, min_8bit_size=10**9),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_layout_round_trip(tmp_path, case):
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
    if case in ("32-bit", "defaults", "keep"):
        assert old.layout == state.layout
    for a, b in zip(old.slots, state.slots):
        assert all(np.array_equal(x, y) for x, y in zip(a, b) if isinstance(x, np.ndarray))


def test_header_format_is_unchanged_but_for_two_layout_keys(tmp_path):
    state = adamnp.init(_layout_tree(), adamnp.adam(), backend="numpy", **LAYOUTS["keep"])
    path = tmp_path / "s.npz"
    adamnp.save_state(path, state)
    with np.load(path) as npz:
        header = json.loads(str(npz["__adamnp__"][()]))
    assert header["version"] == 1
    assert list(header) == ["format", "version", "config", "backend", "step", "skipped_steps",
                            "state_bits", "block_size", "min_8bit_size", "v_rounding",
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
