"""Atomic writes: a failed run never leaves a half-written output, and a finished one never replaces a file or
folder it was not asked to replace.

* :func:`atomic_file` writes one file through a temporary sibling renamed into place.
* :func:`make_temp_dir` / :func:`publish_dir` assemble a whole folder beside its destination and rename it in:
  without ``overwrite`` the rename never replaces anything that appeared meanwhile (``renameat2(RENAME_NOREPLACE)``
  where the kernel has it, else a ``mkdir`` claim); with ``overwrite`` the old folder is renamed aside, the new one
  renamed in, then the old one deleted.
* Creating a temporary folder and taking charge of removing it happen with SIGINT/SIGTERM deferred
  (:func:`deferred_signals`, :func:`temp_dir`): a signal that arrives just after ``mkdir`` cannot leave the folder
  behind with nobody holding its name.
* Temporary folders are named ``.catmerge-tmp-<name>-<random>`` and hold a marker file naming the process that
  made them; :func:`clean_stale_temp_dirs` removes those whose process is gone (a run killed by SIGKILL), and
  nothing else.
* Files and folders are created with mode ``0o666`` / ``0o777`` minus the umask, like any other tool.

>>> import os, tempfile
>>> from catmerge_jax.atomic import atomic_file
>>> path = os.path.join(tempfile.mkdtemp(), "out.txt")
>>> with atomic_file(path, "w") as f:
...     _ = f.write("done")
>>> open(path).read()
'done'
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import threading
from typing import IO, Iterator

__all__ = ["atomic_file", "make_temp_dir", "temp_dir", "deferred_signals", "remove_temp_dir", "publish_dir",
           "clean_stale_temp_dirs", "PublishConflict", "TEMP_PREFIX", "MARKER", "dir_identity", "rename_noreplace"]

TEMP_PREFIX = ".catmerge-tmp-"
"""Name prefix of the temporary folders this package makes (``.catmerge-tmp-<out name>-<random>``)."""
MARKER = ".catmerge-partial"
"""Marker file inside each temporary folder: JSON ``{"tool", "pid", "start", "host"}`` of the process writing it."""
_OLD_PREFIX = ".catmerge-old-"


class PublishConflict(FileExistsError):
    """The destination of :func:`publish_dir` exists (or appeared) and may not be replaced."""


def _random_name(prefix: str, suffix: str = "") -> str:
    return f"{prefix}{secrets.token_hex(4)}{suffix}"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it onto ``path``, on any error delete it.

    The file is created with mode ``0o666`` minus the umask (``tempfile.mkstemp`` would make it 0600)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        with deferred_signals():  # a signal right after the open is raised once `tmp` names the file
            while True:
                candidate = os.path.join(folder, _random_name(".tmp-", "-" + os.path.basename(path)))
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                try:
                    fd = os.open(candidate, flags, 0o666)
                except FileExistsError:
                    continue
                tmp = candidate
                break
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------- process identity

def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (``/proc/<pid>/stat`` field 22), so a reused PID is not mistaken for the
    process that wrote a marker; ``None`` where ``/proc`` is not available."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) is parenthesised and may contain spaces: split after its closing parenthesis.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, start: str | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start is not None:
        now = _start_time(pid)
        if now is not None and now != start:
            return False  # the PID was reused by another process
    return True


# ----------------------------------------------------------------------------------------------- folders

def dir_identity(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of a real (non-symlink) folder, else ``None``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    import stat as _stat

    return (st.st_dev, st.st_ino) if _stat.S_ISDIR(st.st_mode) else None


@contextlib.contextmanager
def deferred_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold back SIGINT/SIGTERM for the block, then hand each one that arrived to the handler installed before.

    Python raises a signal's exception at whatever bytecode the main thread is on, so between ``os.mkdir`` returning
    and the caller's ``try`` taking charge of the folder a Ctrl-C or SIGTERM would leave the folder behind with no
    one holding its name. Inside this block the handlers only record the signal; on leaving it the previous
    handler is called (``KeyboardInterrupt`` / the CLI's ``Terminated`` are raised there, where the caller's
    clean-up already covers the folder), or the signal is re-sent when that handler is the system default.
    Outside the main thread (where Python never runs signal handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous: dict[int, object] = {}
    try:
        for signum in signums:
            if signal.getsignal(signum) is None:  # a handler installed outside Python: not ours to swap
                continue
            previous[signum] = signal.signal(signum, lambda s, frame: arrived.append(s))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in arrived:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def make_temp_dir(parent: str, name: str) -> str:
    """Create ``parent/.catmerge-tmp-<name>-<random>`` (mode 0o777 minus the umask) holding the :data:`MARKER`
    file of this process. Returns its path.

    The caller must take charge of removing it; :func:`temp_dir` does so with no gap a signal could fall into.
    """
    with deferred_signals():
        while True:
            path = os.path.join(parent, _random_name(f"{TEMP_PREFIX}{name}-"))
            try:
                os.mkdir(path, 0o777)
                break
            except FileExistsError:
                continue
        try:
            pid = os.getpid()
            with open(os.path.join(path, MARKER), "w") as f:
                json.dump({"tool": "catmerge", "pid": pid, "start": _start_time(pid), "host": socket.gethostname()},
                          f)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
    return path


@contextlib.contextmanager
def temp_dir(parent: str, name: str) -> Iterator[str]:
    """A :func:`make_temp_dir` folder for the block, removed if the block raises (Ctrl-C and SIGTERM included).

    A block that publishes the folder (:func:`publish_dir`) renames it away; nothing is removed on success. A
    signal that arrives while the folder is being made is raised once the folder is under this block's clean-up,
    so it is removed too.

    >>> import os, tempfile
    >>> parent = tempfile.mkdtemp()
    >>> with temp_dir(parent, "out") as tmp:
    ...     publish_dir(tmp, os.path.join(parent, "out"))
    >>> os.listdir(parent)
    ['out']
    """
    path = None
    try:
        with deferred_signals():
            path = make_temp_dir(parent, name)
        yield path
    except BaseException:
        if path is not None:
            remove_temp_dir(path)
        raise


def remove_temp_dir(path: str) -> None:
    """Delete a folder made by :func:`make_temp_dir` (quietly, whatever state it is in)."""
    shutil.rmtree(path, ignore_errors=True)


def _read_marker(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("tool") != "catmerge" or type(marker.get("pid")) is not int:
        return None
    return marker


def clean_stale_temp_dirs(parent: str) -> list[str]:
    """Remove the temporary folders of earlier runs that died (SIGKILL, power loss) in ``parent``.

    Only folders whose name starts with :data:`TEMP_PREFIX`, that are real folders (not symlinks), hold a valid
    :data:`MARKER` written on this host, and whose writing process no longer exists are removed; a folder of a
    run still in progress, or anything this package did not make, is left alone. Returns the removed paths.
    """
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    host = socket.gethostname()
    for name in names:
        if not name.startswith(TEMP_PREFIX):
            continue
        path = os.path.join(parent, name)
        if dir_identity(path) is None:
            continue
        marker = _read_marker(path)
        if marker is None or marker.get("host") != host or _alive(marker["pid"], marker.get("start")):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (even as an empty folder): :class:`PublishConflict` then.

    Atomic with ``renameat2(RENAME_NOREPLACE)``; where the kernel or file system lacks it, ``dst`` is first
    claimed with ``mkdir`` (which fails if anything is there) and the folder renamed onto that empty claim.
    """
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST or err == errno.ENOTEMPTY:
            raise PublishConflict(errno.EEXIST, "exists", dst)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    try:
        os.mkdir(dst, 0o700)
    except FileExistsError:
        raise PublishConflict(errno.EEXIST, "exists", dst) from None
    try:
        os.rename(src, dst)
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        raise


def publish_dir(tmp: str, out: str, *, overwrite: bool = False, accept: tuple[int, int] | None = None) -> None:
    """Rename the finished folder ``tmp`` (from :func:`make_temp_dir`, same parent) to ``out``.

    Without ``overwrite``, ``out`` must not exist, except the empty folder whose :func:`dir_identity` is
    ``accept`` (what the caller saw, and agreed to fill, at the start); anything else at ``out`` — a folder that
    appeared meanwhile, even an empty one, or another run's result — raises :class:`PublishConflict` and is left
    untouched (so is ``tmp``, marker removed). With ``overwrite`` an existing folder ``out`` is renamed aside, ``tmp``
    renamed in, and the old folder deleted; a symlink or file at ``out`` is never replaced.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(tmp, MARKER))
    if os.path.islink(out) or (os.path.lexists(out) and dir_identity(out) is None):
        raise PublishConflict(errno.EEXIST, "exists and is not a folder", out)
    ident = dir_identity(out)
    if ident is None:
        rename_noreplace(tmp, out)
        return
    if not overwrite:
        if accept is None or ident != accept:
            raise PublishConflict(errno.EEXIST, "appeared while merging", out)
        try:
            os.rename(tmp, out)  # replaces only an empty folder; one that got files meanwhile fails here
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise PublishConflict(errno.EEXIST, "is no longer empty", out) from None
            raise
        return
    parent = os.path.dirname(out)
    old = os.path.join(parent, _random_name(f"{_OLD_PREFIX}{os.path.basename(out)}-"))
    os.rename(out, old)
    try:
        rename_noreplace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            rename_noreplace(old, out)  # put the user's folder back if nothing took its place
        raise
    shutil.rmtree(old, ignore_errors=True)
