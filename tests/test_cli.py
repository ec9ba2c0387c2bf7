"""``python -m adamnp demo | verify | bench``: tables, exit codes, help, missing features.

Most tests call ``main([...])`` in-process with tiny sizes on the NumPy backend. A stand-in
backend (the NumPy module registered under another name, optionally made slightly wrong)
exercises the cross-backend comparisons whichever real backends are installed.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import adamnp
from adamnp import backends
from adamnp.backends import numpy as numpy_backend
from adamnp.cli import main

DEMO_HEADER = ["problem", "backend", "bits", "final loss", "steps/s", "state MB", "max |dp| vs"]
VERIFY_HEADER = ["backend", "bits", "dtype", "hyperparameters", "params [u]", "codes differing"]
ROOT = Path(__file__).resolve().parent.parent  # run the checkout's adamnp, not an installed one
BENCH_HEADER = ["backend", "bits", "size", "us/step", "ns/elem", "GB/s", "% traffic"]


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().out


def fake_backend(monkeypatch, name="numba", nudge=False, code_shift=0):
    """Register the NumPy reference as backend ``name``.

    ``nudge``: move params by 1000 ulps per step; ``code_shift``: move the first 8-bit code of
    the first moment by this much after every step.
    """
    attrs = {k: getattr(numpy_backend, k) for k in dir(numpy_backend) if not k.startswith("__")}
    fake = types.SimpleNamespace(**attrs)
    fake.NAME = name

    def step_group(group, params, grads, scalars):
        numpy_backend.step_group(group, params, grads, scalars)
        if nudge:
            for i in group.leaf_ids:
                p = params[i]
                p[...] = p + 1000 * np.spacing(p)
        if code_shift and group.kind == "q8":
            codes = group.buffers["codes_m"]
            c = int(codes[0])
            codes[0] = c + code_shift if c + code_shift <= 255 else c - code_shift

    fake.step_group = step_group
    real_get = backends.get
    monkeypatch.setattr(backends, "get", lambda n: fake if n == name else real_get(n))


def no_eight_bit(monkeypatch):
    """Make 8-bit state fail as it does in a build without the quantization module."""
    real_init = adamnp.init

    def init(*args, state_bits=32, **kwargs):
        if state_bits == 8:
            raise ImportError("No module named 'adamnp.quant' (simulated)")
        return real_init(*args, state_bits=state_bits, **kwargs)

    monkeypatch.setattr(adamnp, "init", init)


@pytest.mark.parametrize("argv", [[], ["demo"], ["verify"], ["bench"]])
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m adamnp")
    if argv:
        assert "--backend" in out and "{auto,all,numpy,numba,cuda}" in out
    else:
        assert "demo" in out and "verify" in out and "bench" in out


def test_bad_arguments_exit_2(capsys):
    for argv in (["demo", "--problem", "mnist"], ["bench", "--sizes", "0"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


def test_demo_numpy_table(capsys):
    code, out = run(capsys, "demo", "--problem", "rosenbrock", "--steps", "20",
                    "--backend", "numpy", "--bits", "32")  # fmt: skip
    assert code == 0
    assert all(h in out for h in DEMO_HEADER)
    assert "[1/1] rosenbrock  numpy  32-bit  loss 9 ->" in out
    row = next(line for line in out.splitlines() if line.startswith("rosenbrock  numpy"))
    assert row.split()[-1] == "reference"


def test_demo_all_problems_with_stand_in_backend(capsys, monkeypatch):
    fake_backend(monkeypatch)
    code, out = run(capsys, "demo", "--steps", "6", "--backend", "numba", "--bits", "32")
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.split()[1:2] == ["numba"]]
    assert {r[0] for r in rows} == {"logistic", "rosenbrock", "mlp"}
    assert all(r[-1] == "0" for r in rows)  # identical to the reference run


def test_demo_reports_missing_eight_bit(capsys, monkeypatch):
    no_eight_bit(monkeypatch)
    code, out = run(capsys, "demo", "--problem", "mlp", "--steps", "3", "--backend", "numpy")
    assert code == 0
    assert "8-bit state not available" in out
    assert any(line.split()[:4] == ["mlp", "numpy", "8", "n/a"] for line in out.splitlines())


def test_demo_eight_bit_when_available(capsys):
    code, out = run(capsys, "demo", "--problem", "mlp", "--steps", "3", "--backend", "numpy",
                    "--bits", "8")  # fmt: skip
    assert code == 0
    row = next(line.split() for line in out.splitlines() if line.startswith("mlp "))
    if row[3] != "n/a":  # the 8-bit state is built in: W1 is quantized, the state shrinks
        assert float(row[5]) < 0.0881


def test_verify_without_other_backends(capsys, monkeypatch):
    code, out = run(capsys, "verify", "--backend", "numpy")
    assert code == 0
    assert "nothing to compare" in out


def test_verify_passes_for_identical_backend(capsys, monkeypatch):
    fake_backend(monkeypatch)
    code, out = run(capsys, "verify", "--backend", "numba", "--size", "300", "--steps", "2")
    assert code == 0, out
    assert all(h in out for h in VERIFY_HEADER)
    assert "FAIL" not in out and " failed" in out
    fp32 = [line.split() for line in out.splitlines() if line.startswith("numba      32")]
    assert len(fp32) == 8 and all(r[-1] == "pass" and r[-4:-2] == ["0.00", "0.00"] for r in fp32)


def test_verify_fails_for_wrong_backend(capsys, monkeypatch):
    fake_backend(monkeypatch, nudge=True)
    code, out = run(capsys, "verify", "--backend", "numba", "--size", "300", "--steps", "2",
                    "--bits", "32")  # fmt: skip
    assert code == 1
    assert "FAIL" in out and "0 passed" in out


def test_verify_skips_missing_eight_bit(capsys, monkeypatch):
    fake_backend(monkeypatch)
    no_eight_bit(monkeypatch)
    code, out = run(capsys, "verify", "--backend", "numba", "--size", "300", "--steps", "1",
                    "--bits", "8")  # fmt: skip
    assert code == 0
    # 4 configs + the bnb format with nearest and stochastic rounding of v
    assert "skip: 8-bit state not available" in out and "6 skipped" in out


def eight_bit_works() -> bool:
    try:
        p = np.zeros(4096, np.float32)
        adamnp.step(
            p, np.ones_like(p), adamnp.init(p, adamnp.adamw(), backend="numpy", state_bits=8)
        )
    except (ImportError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("shift, verdict, code", [(0, "pass", 0), (1, "pass", 0), (3, "FAIL", 1)])
def test_verify_counts_eight_bit_codes(capsys, monkeypatch, shift, verdict, code):
    if not eight_bit_works():
        pytest.skip("8-bit state is not built into this installation")
    fake_backend(monkeypatch, code_shift=shift)
    code_got, out = run(capsys, "verify", "--backend", "numba", "--size", "300", "--steps", "1",
                        "--bits", "8")  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.startswith("numba       8")]
    assert len(rows) == 6 and all(r[-1] == verdict for r in rows)  # 4 configs + 2 bnb
    assert "adamw, bnb, v stochastic" in out
    # the shifted code is the one counted (the last step's shift; earlier ones are overwritten)
    assert all(r[-2].startswith(f"{int(shift > 0)}/") for r in rows)
    assert code_got == code


def test_bench_table(capsys):
    code, out = run(capsys, "bench", "--backend", "numpy", "--bits", "32", "--sizes", "64,1000",
                    "--repeats", "1", "--torch", "no")  # fmt: skip
    assert code == 0
    assert all(h in out for h in BENCH_HEADER)
    assert "28 B" in out and "16.0625 B" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("numpy ")]
    assert [r[2] for r in rows] == ["64", "1,000"]


def test_bench_reports_missing_eight_bit(capsys, monkeypatch):
    no_eight_bit(monkeypatch)
    code, out = run(capsys, "bench", "--backend", "numpy", "--bits", "8", "--sizes", "5000",
                    "--repeats", "1", "--torch", "no")  # fmt: skip
    assert code == 0
    assert "note: 8-bit state not available" in out


def test_unavailable_backend_is_explained(capsys, monkeypatch):
    def get(name):
        raise ImportError(f"no module for {name}")

    monkeypatch.setattr(backends, "get", get)
    code, out = run(capsys, "demo", "--backend", "cuda", "--steps", "1")
    assert code == 1
    assert "cuda: not available" in out


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "adamnp", "demo", "--problem", "rosenbrock", "--steps", "3",
         "--backend", "numpy", "--bits", "32"],
        capture_output=True, text=True, check=False, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "final loss" in done.stdout


@pytest.mark.skipif(not backends.available("numba"), reason="needs numba")
def test_bench_names_the_numba_8bit_kernel(capsys):
    code, out = run(capsys, "bench", "--backend", "numba", "--bits", "8", "--sizes", "5000",
                    "--repeats", "1", "--torch", "no")  # fmt: skip
    assert code == 0
    assert "numba 8-bit kernel: " in out and ("in-register" in out or "gathers" in out)


def unavailable(monkeypatch, **reasons):
    """Make the named backends unavailable here, with these reasons."""
    real = backends.why_unavailable
    monkeypatch.setattr(backends, "why_unavailable", lambda n: reasons.get(n) or real(n))


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "--size", "300", "--steps", "1"],
        ["demo", "--problem", "rosenbrock", "--steps", "2"],
        ["bench", "--sizes", "64", "--repeats", "1", "--torch", "no"],
    ],
)
def test_requested_backend_that_cannot_run_is_an_error(capsys, monkeypatch, argv):
    # `verify --backend cuda` on a machine without a GPU used to compare nothing and exit 0
    unavailable(monkeypatch, cuda="no CUDA GPU or driver was found")
    code, out = run(capsys, *argv, "--backend", "cuda", "--bits", "32")
    assert code == 1, out
    assert "cuda: not available: no CUDA GPU or driver was found" in out
    assert "error: backend 'cuda' was requested but cannot run here" in out


def test_all_and_auto_skip_unavailable_backends(capsys, monkeypatch):
    fake_backend(monkeypatch)  # numba: the reference under another name
    unavailable(monkeypatch, cuda="no CUDA GPU or driver was found")
    code, out = run(capsys, "verify", "--backend", "all", "--size", "300", "--steps", "1",
                    "--bits", "32")  # fmt: skip
    assert code == 0, out
    assert "cuda: not available" in out and "error" not in out
    assert "8 checks, 8 passed" in out
    unavailable(monkeypatch, numba="no numba here", cuda="no CUDA GPU or driver was found")
    for spec in ("auto", "all"):  # only the reference is left: nothing to compare, not an error
        code, out = run(capsys, "verify", "--backend", spec, "--size", "300", "--steps", "1")
        assert code == 0, out
        assert "nothing to compare" in out and "error" not in out


def test_cuda_install_hint_works_from_a_checkout_and_from_an_index(capsys, monkeypatch):
    from adamnp.backends import cuda

    assert 'pip install "adamnp[cuda]"' in cuda.INSTALL  # an installed distribution
    assert 'pip install -e ".[cuda]"' in cuda.INSTALL  # a source checkout
    unavailable(monkeypatch, numba="no numba here", cuda="no GPU")
    code, out = run(capsys, "verify", "--backend", "auto")
    assert code == 0
    assert f"cuda: a CUDA GPU and {cuda.INSTALL})" in out


def test_a_slow_first_step_says_it_is_compiling(monkeypatch):
    import io
    import time

    from adamnp.cli import common

    monkeypatch.setattr(common, "NOTICE_AFTER_S", 0.01)
    out = io.StringIO()
    with common.compile_notice("numba, 8-bit state", out):
        time.sleep(0.3)
    assert "compiling kernels for this machine: numba, 8-bit state" in out.getvalue()
    quiet = io.StringIO()
    with common.compile_notice("numba, 32-bit state", quiet):
        pass
    time.sleep(0.05)
    assert quiet.getvalue() == ""


def test_bench_marks_unstable_rows_instead_of_printing_a_ratio():
    from adamnp.cli import bench

    steady, data = bench._row("numba", 32, 1000, 1e-6, 28.0, (1e-6, "numba"), spread=0.05)
    assert steady[-1] == "100%" and not data["unstable"]
    noisy, data = bench._row("numba", 32, 1000, 1e-6, 28.0, (1e-6, "numba"), spread=0.5)
    assert noisy[-1] == "?" and noisy[3].endswith("?") and data["unstable"]
    too_fast, data = bench._row("numba", 32, 1000, 1e-7, 28.0, (1e-5, "numba"), spread=0.0)
    assert too_fast[-1] == "?" and data["unstable"]  # 10000% of the traffic kernel: noise
    assert ">999%" not in "".join(map(str, too_fast))
