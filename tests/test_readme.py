"""The Python examples of the front pages run as written.

Every ```python block of README.md is self-contained (it is what a newcomer copies) and runs on
its own, in a fresh namespace. docs/index.md is a tutorial read top to bottom: its blocks build
on each other (the 8-bit and checkpoint blocks reuse ``params``, ``opt``, ``state``), so they
run in order in one namespace. Each runs in a temporary working directory (the examples write
checkpoints); tracebacks point at the line of the Markdown file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(name: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every ```python block of ``ROOT / name``."""
    text = (ROOT / name).read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def run_block(name: str, line: int, code: str, namespace: dict) -> None:
    """Execute ``code`` so that tracebacks name ``name`` and its line numbers."""
    exec(compile("\n" * (line - 1) + code, str(ROOT / name), "exec"), namespace)


README_BLOCKS = python_blocks("README.md")


def test_the_pages_have_python_examples():
    # guards the extraction itself: a changed fence must not make the tests below vacuous
    assert len(README_BLOCKS) >= 2
    assert len(python_blocks("docs/index.md")) >= 4


@pytest.mark.parametrize(
    "line, code", README_BLOCKS, ids=[f"README.md:{line}" for line, _ in README_BLOCKS]
)
def test_readme_block_runs_on_its_own(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_block("README.md", line, code, {"__name__": "__readme__"})


def test_readme_shell_commands_are_unchanged():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "```bash\npip install . && python -m adamnp demo\n```" in text
    assert '```bash\npip install -e ".[test,cuda]" && python -m pytest\n```' in text


def test_docs_index_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs_index__"}
    for line, code in python_blocks("docs/index.md"):
        run_block("docs/index.md", line, code, namespace)
    assert (tmp_path / "opt.npz").is_file()


@pytest.mark.parametrize(
    "page", ["docs/frameworks.md", "docs/mixed_precision.md", "docs/distributed.md"]
)
def test_guide_blocks_run_in_order(page, tmp_path, monkeypatch):
    """Each block of a guide runs, in order in one namespace; a block that imports torch or
    ml_dtypes is skipped where they are not installed (CI installs ml_dtypes, not torch)."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__guide__"}
    blocks = python_blocks(page)
    assert blocks
    ran = 0
    for line, code in blocks:
        needs = [m for m in ("torch", "ml_dtypes") if re.search(rf"^import {m}\b", code, re.M)]
        if any(_missing(m) for m in needs):
            continue
        run_block(page, line, code, namespace)
        ran += 1
    if not ran:
        pytest.skip(f"every block of {page} needs a package that is not installed")


def _missing(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return True
    return False
