"""Checkpoints: paths and file objects, and writing a checkpoint to either.

A path is written atomically: a temporary file next to the target
(``.<name>.adamnp-tmp-<16 hex digits>``), flushed, ``fsync``-ed and renamed over it; see
docs/checkpoints.md for the file mode and the removal of temporary files that crashed saves
left behind. A binary file object is written in place, from its current position, with no
rename and no ``fsync`` (its owner decides about durability).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import stat
import time

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


# -- paths and file objects


def resolve(file, func: str, writing: bool):
    """``(path, None)`` for a path, ``(None, file)`` for a usable binary file object.

    A file object must have ``read`` and, for saving, ``write`` (``np.savez`` takes an object
    for a file when it has ``read``: every :mod:`io` object has, even one open only for
    writing), be open in binary mode, open and (where it says so) open in that direction;
    loading also needs ``seek``, since a zip archive is read from its end. Anything else is
    a ``TypeError`` (not a path or a file, a text file) or a ``ValueError`` (closed, the
    wrong direction, not seekable) saying what to pass instead.
    """
    if isinstance(file, str | bytes | os.PathLike):
        return os.fspath(file), None
    want = "'wb' (or 'r+b')" if writing else "'rb'"
    method, direction = ("write", "writing") if writing else ("read", "reading")
    if not (hasattr(file, "read") and callable(getattr(file, method, None))):
        hint = "; for a state_dict use adamnp.load_state_dict" if isinstance(file, dict) else ""
        raise TypeError(
            f"{func}: file must be a path or a binary file object (such as io.BytesIO() or "
            f"open(path, {want})), got {type(file).__name__}{hint}"
        )
    name = describe(file)
    if isinstance(file, io.TextIOBase) or (not writing and _reads_text(file)):
        raise TypeError(
            f"{func}: {name} is open in text mode; open it in binary mode ({want}), or pass a path"
        )
    if getattr(file, "closed", False) is True:
        raise ValueError(f"{func}: {name} is closed; pass an open file or a path")
    able = getattr(file, "writable" if writing else "readable", None)
    if callable(able) and not able():
        raise ValueError(
            f"{func}: {name} is not open for {direction}; open it with {want}, or pass a path"
        )
    if not writing and not _seekable(file):
        raise ValueError(
            f"{func}: {name} is not seekable, and a checkpoint (a zip archive) is read from "
            "its end; read the stream into io.BytesIO(stream.read()) first, or pass a path"
        )
    return None, file


def _reads_text(file) -> bool:
    """Whether a file object that is no :mod:`io` object reads ``str`` (probed with
    ``read(0)``, which consumes nothing)."""
    if isinstance(file, io.IOBase):
        return False
    try:
        return isinstance(file.read(0), str)
    except Exception:  # a failed probe tells nothing; reading will tell
        return False


def _seekable(file) -> bool:
    seekable = getattr(file, "seekable", None)
    if callable(seekable):
        return bool(seekable())
    return callable(getattr(file, "seek", None)) and callable(getattr(file, "tell", None))


def describe(file) -> str:
    """How messages name a file object: its ``name`` when that is a str, else its type."""
    name = getattr(file, "name", None)
    return name if isinstance(name, str) else f"<{type(file).__name__}>"


# -- writing


def write(path: str | None, file, arrays: dict) -> None:
    """Write ``arrays`` as an ``.npz``: atomically to ``path``, or else into ``file``."""
    if path is not None:
        _write_atomically(path, arrays)
        return
    np.savez(file, **arrays)
    flush = getattr(file, "flush", None)
    if callable(flush):
        flush()


_TEMP_MARK = ".adamnp-tmp-"
_TEMP_TOKEN = re.compile("[0-9a-f]{16}")  # the random part of a temporary file's name
_STALE_AFTER_S = 600.0  # a temporary file untouched this long is a crashed save's ...
_LONG_NAME = 160  # ... and a target name of more bytes is shortened in its temporaries' names


def _temp_prefix(name: str) -> str:
    """``.<name>.adamnp-tmp-``: how the temporary files of target ``name`` begin.

    A long name is cut short and made unique again by a hash of it, so that the temporary
    file's name stays within file system limits.

    Examples
    --------
    >>> _temp_prefix("opt.npz")
    '.opt.npz.adamnp-tmp-'
    """
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) > _LONG_NAME:
        name = f"{name[:40]}~{hashlib.sha256(raw).hexdigest()[:16]}"
    return f".{name}{_TEMP_MARK}"


def _write_atomically(path: str, arrays: dict) -> None:
    """Write ``arrays`` as an ``.npz`` to a temporary file, fsync it and rename it to ``path``.

    The temporary file is locked (``flock``) until it is renamed, so that a concurrent save
    of the same target never takes it for a crashed save's leftover.
    """
    folder, name = os.path.split(os.path.abspath(path))
    _remove_stale_temps(folder, name)
    fd, tmp = _create_temp(path, folder, name)
    try:
        with os.fdopen(fd, "wb") as f:
            _hold_lock(f)
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
            if os.name != "nt":  # rename while the lock is held
                os.replace(tmp, path)
        if os.name == "nt":  # pragma: no cover - Windows cannot rename an open file
            os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    _fsync_folder(folder)


def _create_temp(path: str, folder: str, name: str) -> tuple[int, str]:
    """Create the temporary file for ``path``: ``(descriptor, its path)``.

    Its mode is what ``path`` will keep: that of the file it replaces, else ``0o666`` less
    the umask (as ``open()`` gives). Errors name ``path``, the file the caller asked for.
    """
    tmp = os.path.join(folder, _temp_prefix(name) + secrets.token_hex(8))
    mode = _kept_mode(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(tmp, flags, 0o666)  # the umask applies
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, path) from None
    if mode is not None and hasattr(os, "fchmod"):
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            _discard(tmp)
            raise
    return fd, tmp


def _kept_mode(path: str) -> int | None:
    """The permission bits of the regular file at ``path``, or None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else None


def _hold_lock(f) -> None:
    """Lock our temporary file while it is written (where ``flock`` exists and works)."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _remove_stale_temps(folder: str, name: str) -> None:
    """Remove the temporary files of target ``name`` in ``folder`` that crashed saves left:
    named as :func:`_temp_prefix` says plus 16 hex digits, and stale (:func:`_is_stale`).
    Nothing else is touched, and nothing here raises."""
    prefix = _temp_prefix(name)
    try:
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if e.name.startswith(prefix)]
    except OSError:
        return
    now = time.time()
    for n in names:
        candidate = os.path.join(folder, n)
        if _TEMP_TOKEN.fullmatch(n[len(prefix) :]) and _is_stale(candidate, now):
            _discard(candidate)


def _is_stale(tmp: str, now: float) -> bool:
    """Whether temporary file ``tmp`` is a crashed save's: a regular file not modified for
    ``_STALE_AFTER_S`` seconds that no live save holds locked."""
    try:
        st = os.lstat(tmp)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < _STALE_AFTER_S:
        return False
    return not _locked(tmp)


def _locked(tmp: str) -> bool:
    """Whether a live save holds ``tmp`` locked; True when that cannot be told (a file we
    cannot open), False where the platform or file system has no ``flock``."""
    if fcntl is None:  # pragma: no cover - Windows: the file's age alone decides
        return False
    try:
        fd = os.open(tmp, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # pragma: no cover - no locks on this file system
        return False
    finally:
        os.close(fd)
    return False


def _discard(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable where the platform allows it."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - e.g. Windows
        pass
