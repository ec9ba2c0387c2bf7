"""The public surface: every exported name is documented, with a runnable example."""

import inspect

import pytest

import adamnp

CALLABLES = [n for n in adamnp.__all__ if callable(getattr(adamnp, n))]


@pytest.mark.parametrize("name", sorted(adamnp.__all__))
def test_exported_name_has_a_docstring(name):
    doc = inspect.getdoc(getattr(adamnp, name))
    assert doc and len(doc.splitlines()) >= 3, f"adamnp.{name} is undocumented"


@pytest.mark.parametrize(
    "name", sorted(n for n in CALLABLES if inspect.isfunction(getattr(adamnp, n)))
)
def test_public_function_has_example_or_reference(name):
    doc = inspect.getdoc(getattr(adamnp, name))
    assert ">>>" in doc or "See :func:" in doc, f"adamnp.{name} has no example"


def test_import_is_light():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(adamnp.__file__)))
    code = "import sys, adamnp; print([m for m in ('numba', 'scipy') if m in sys.modules])"
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]"
