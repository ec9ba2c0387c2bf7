"""Helpers shared by ``python -m adamnp demo | verify | bench``.

Backend selection through the registry (so backends that land later are picked up), moving
trees between host and a backend's memory, and plain-text tables.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np

from .. import backends
from .._tree import flatten, unflatten

CHOICES = ("auto", "all", *backends.NAMES)
EIGHT_BIT_ERRORS = (ImportError, NotImplementedError)  # 8-bit state not built into this copy
#: Seconds a first call may take before :func:`compile_notice` speaks.
NOTICE_AFTER_S = 1.0


@contextlib.contextmanager
def compile_notice(what: str, out=None):
    """Say that kernels are compiling if the block (a first step) is still running after
    :data:`NOTICE_AFTER_S` seconds: Numba compiles each kernel once per machine (seconds for
    float32, tens of seconds for 8-bit state; docs/backends.md) and caches it on disk.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> with compile_notice("float32 step", out):
    ...     pass
    >>> out.getvalue()
    ''
    """
    out = sys.stderr if out is None else out

    def speak():
        print(f"(compiling kernels for this machine: {what}; first run only, cached on disk)",
              file=out, flush=True)  # fmt: skip

    timer = threading.Timer(NOTICE_AFTER_S, speak)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def host_auto() -> str:
    """The backend ``adamnp.init(backend="auto")`` picks for host (NumPy) arrays."""
    return backends.resolve("auto")


def select(spec: str, *, with_reference: bool = True) -> tuple[list[str], dict[str, str]]:
    """Resolve a ``--backend`` value to ``(backends to run, {skipped backend: reason})``.

    ``"all"`` means every registered backend that runs here, ``"auto"`` what
    :func:`adamnp.init` picks for host arrays. With ``with_reference`` the NumPy reference is
    always run first (the others are compared with it). A backend named explicitly that
    cannot run is in the skipped ones too; :func:`refuse_unavailable` turns that into an error.

    Examples
    --------
    >>> select("numpy")
    (['numpy'], {})
    """
    if spec not in CHOICES:
        raise ValueError(f"unknown backend {spec!r}; choose one of {', '.join(CHOICES)}")
    wanted = {"all": list(backends.NAMES), "auto": [host_auto()]}.get(spec, [spec])
    run, skipped = [], {}
    for name in wanted:
        why = backends.why_unavailable(name)
        if why is None:
            run.append(name)
        else:
            skipped[name] = why
    if with_reference and run and "numpy" not in run:
        run.insert(0, "numpy")
    return run, skipped


def refuse_unavailable(spec: str, skipped: dict[str, str], out) -> bool:
    """Print an error and return True when ``spec`` names one backend that cannot run here.

    ``all`` and ``auto`` mean "what runs here": their unavailable backends are only listed.
    A backend asked for by name is different: running without it would report success
    having done nothing of what was asked.
    """
    if spec not in skipped:
        return False
    print(
        f"error: backend {spec!r} was requested but cannot run here (reason above); "
        "--backend all runs every backend that can",
        file=out,
    )
    return True


class Mover:
    """Copies trees between the host and a backend's memory (no-ops for host backends)."""

    def __init__(self, name: str):
        self.name = name
        self.module = backends.get(name)
        self.on_host = bool(self.module.owns(np.zeros(1, np.float32)))

    def to_backend(self, tree):
        """``tree`` with every leaf in the backend's memory (the same tree on the host)."""
        if self.on_host:
            return tree
        leaves, treedef, _ = flatten(tree)
        return unflatten(treedef, [self.module.from_host(np.ascontiguousarray(a)) for a in leaves])

    def to_host(self, tree, copy: bool = False):
        """``tree`` with every leaf a host ndarray (copied if ``copy`` or not on the host)."""
        if self.on_host and not copy:
            return tree
        leaves, treedef, _ = flatten(tree)
        return unflatten(treedef, [np.array(self.module.to_host(a)) for a in leaves])

    def array_to_host(self, a) -> np.ndarray:
        """One backend array as a host ndarray (a copy)."""
        return np.array(self.module.to_host(a))

    def sync(self) -> None:
        """Wait for queued device work (CUDA), so that timings are honest."""
        if self.on_host:
            return
        sync = getattr(self.module, "synchronize", None)  # the CUDA backend has one
        if sync is not None:
            sync()


def table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """Format ``rows`` under ``headers`` as aligned plain text.

    Columns listed in ``right`` are right-aligned (default: all but the first three).

    Examples
    --------
    >>> print(table(["name", "n"], [["a", 1], ["bb", 22]], right={1}))
    name   n
    ----  --
    a      1
    bb    22
    """
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    if right is None:
        right = set(range(3, len(headers)))
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        parts = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        ]
        return "  ".join(parts).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def bits_list(spec: str) -> list[int]:
    """``"32"``, ``"8"`` or ``"both"`` as a list of ``state_bits`` values."""
    return {"32": [32], "8": [8], "both": [32, 8]}[spec]


def describe_skips(skipped: dict[str, str]) -> list[str]:
    """One line per backend that does not run here."""
    return [f"  {name}: not available: {why}" for name, why in skipped.items()]


def print_backends(backends: list[str], skipped: dict[str, str], bits: list[int], out) -> None:
    """The backends that run, the numba 8-bit kernel when it is used, and those skipped."""
    print(f"backends: {', '.join(backends) or 'none'}", file=out)
    if "numba" in backends and 8 in bits:
        from ..backends import numba as numba_cpu

        print(f"numba 8-bit kernel: {numba_cpu.q8_kernel_description()}", file=out)
    for line in describe_skips(skipped):
        print(line, file=out)
