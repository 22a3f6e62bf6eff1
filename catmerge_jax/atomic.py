"""Atomic writes: a failed run never leaves a half-written output, and a finished one never replaces a file or
folder it was not asked to replace.

* :func:`atomic_file` writes one file through a temporary sibling renamed into place.
* :func:`make_temp_dir` / :func:`publish_dir` assemble a whole folder beside its destination and rename it in:
  without ``overwrite`` the rename never replaces anything that appeared meanwhile (``renameat2(RENAME_NOREPLACE)``
  where the kernel has it, else a ``mkdir`` claim); with ``overwrite`` the old folder is renamed aside, the new one
  renamed in, then the old one deleted.
* Creating a temporary folder and taking charge of removing it happen with SIGINT/SIGTERM deferred
  (:func:`deferred_signals`, :func:`temp_dir`): a signal that arrives just after ``mkdir`` cannot leave the folder
  behind with nobody holding its name. :func:`publish_dir` runs with them deferred too.
* Temporary folders are named ``.catmerge-tmp-<name>-<random>``; BESIDE each one lies its marker file
  ``.catmerge-tmp-<name>-<random>.catmerge-partial`` (:func:`marker_path`) naming the process that made it. The
  marker is made before the folder and removed after it is gone (published or deleted), so no instant exists at
  which the folder is there without its marker, and the published folder never holds one.
  :func:`clean_stale_temp_dirs` (run by :func:`make_temp_dir`, so by the next run into the same parent) finishes
  or undoes the work of runs whose process is gone (SIGKILL, power loss), and touches nothing else.
* Files and folders are created with mode ``0o666`` / ``0o777`` minus the umask, like any other tool.

The publish sequence, and what the next run's clean-up does if the process is killed after each step
(``T`` the temporary folder, ``M`` its marker, ``O`` the old folder set aside, ``out`` the destination)::

    make_temp_dir   1. create M (O_EXCL) and write it     killed: an empty or complete M, no T: M removed
                    2. mkdir T                            killed: T and M: T removed, then M
    (caller)        3. write the files into T             killed: as 2
    publish_dir     new out (or an empty one the caller accepted):
                    4. rename T -> out (no replace)       killed: M alone: removed
                    5. unlink M
                    existing out with overwrite:
                    4. M += {"out", "old": O}             killed: as 2 (O does not exist yet)
                    5. rename out -> O                    killed: O put back at out, T removed
                    6. rename T -> out (no replace)       killed: T is gone, so the new out is whole: O removed
                    7. rmtree O                           killed: as 6
                    8. unlink M

So after the clean-up ``out`` is either the complete new folder or what it was before the run (on kernels without
``RENAME_NOREPLACE`` a kill between the ``mkdir`` claim and the rename may also leave ``out`` an empty folder, which
the next run accepts), and no ``.catmerge-tmp-`` or ``.catmerge-old-`` entry of the dead run is left.

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
from typing import IO, Any, Iterator, Mapping

__all__ = ["atomic_file", "make_temp_dir", "temp_dir", "deferred_signals", "remove_temp_dir", "publish_dir",
           "clean_stale_temp_dirs", "PublishConflict", "TEMP_PREFIX", "MARKER", "dir_identity", "rename_noreplace",
           "marker_path"]

TEMP_PREFIX = ".catmerge-tmp-"
"""Name prefix of the temporary folders this package makes (``.catmerge-tmp-<out name>-<random>``)."""
MARKER = ".catmerge-partial"
"""Name suffix of the marker file beside each temporary folder (``<folder>.catmerge-partial``): JSON
``{"tool", "pid", "start", "host"}`` of the process writing it, plus ``"out"`` and ``"old"`` (names in the same
parent) while an ``overwrite`` publish has the old folder set aside. (Earlier versions kept it inside the folder;
:func:`clean_stale_temp_dirs` still reads those.)"""
_OLD_PREFIX = ".catmerge-old-"
_NEW = ".new"  # suffix of the marker's next version, renamed over it
_PREVIOUS = ".catmerge-previous-"  # a set-aside folder that could not be put back at its place gets this visible name


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


def marker_path(tmp: str) -> str:
    """The marker file of the temporary folder ``tmp``: ``<tmp>.catmerge-partial``, beside it, so it outlives the
    folder's rename and the published folder never carries it."""
    return os.fspath(tmp).rstrip(os.sep) + MARKER


def _identity() -> dict:
    pid = os.getpid()
    return {"tool": "catmerge", "pid": pid, "start": _start_time(pid), "host": socket.gethostname()}


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_fd(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _create_marker(marker: str) -> None:
    """Create ``marker`` (``FileExistsError`` if it exists) holding this process's identity. One small ``write``:
    a kill can leave it empty (between the open and the write) but never half-written."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(marker, flags, 0o666)
    try:
        _write_fd(fd, json.dumps(_identity()).encode())
    except BaseException:
        _unlink_quietly(marker)
        raise


def _rewrite_marker(marker: str, content: dict) -> None:
    """Replace ``marker``'s content atomically (written to ``<marker>.new``, renamed over it)."""
    new = marker + _NEW
    try:
        _write_fd(os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666),
                  json.dumps(content).encode())
        os.replace(new, marker)
    except BaseException:
        _unlink_quietly(new)
        raise


def make_temp_dir(parent: str, name: str) -> str:
    """Create ``parent/.catmerge-tmp-<name>-<random>`` (mode 0o777 minus the umask) and, first, its marker file
    beside it (:func:`marker_path`). Returns the folder's path.

    The leftovers of dead runs in ``parent`` are removed first (:func:`clean_stale_temp_dirs`). The caller must
    take charge of removing the folder (:func:`remove_temp_dir`); :func:`temp_dir` does so with no gap a signal
    could fall into.
    """
    clean_stale_temp_dirs(parent)
    with deferred_signals():
        while True:
            path = os.path.join(parent, _random_name(f"{TEMP_PREFIX}{name}-"))
            marker = marker_path(path)
            try:
                _create_marker(marker)
            except FileExistsError:
                continue
            try:
                os.mkdir(path, 0o777)
            except FileExistsError:
                _unlink_quietly(marker)
                continue
            except BaseException:
                _unlink_quietly(marker)
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
    """Delete a folder made by :func:`make_temp_dir` and then its marker (quietly, whatever state they are in; a
    folder already published or renamed elsewhere is not followed)."""
    shutil.rmtree(path, ignore_errors=True)
    marker = marker_path(path)
    _unlink_quietly(marker + _NEW)
    _unlink_quietly(marker)


def _read_marker(path: str) -> dict | None:
    """The content of the marker file ``path`` if it is one of ours, else ``None``."""
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("tool") != "catmerge" or type(marker.get("pid")) is not int:
        return None
    return marker


def _is_plain_name(name: Any, prefix: str = "") -> bool:
    """A name inside the marker's own folder (markers are read from disk: no separators, no ``..``)."""
    return (isinstance(name, str) and name.startswith(prefix) and name not in ("", ".", "..") and os.sep not in name
            and (os.altsep is None or os.altsep not in name) and "\0" not in name)


def _put_back(old: str, out: str) -> None:
    """Rename the set-aside folder ``old`` back to ``out``; if something took ``out`` meanwhile, give ``old`` a
    visible name beside it (``<out>.catmerge-previous-<random>``) rather than leave it hidden."""
    try:
        rename_noreplace(old, out)
    except OSError:
        with contextlib.suppress(OSError):
            rename_noreplace(old, _random_name(f"{out}{_PREVIOUS}"))


def _finish_or_undo(parent: str, tmp: str, marker: Mapping) -> None:
    """Complete what a dead run's ``overwrite`` publish left (its marker names ``out`` and ``old``): with the new
    folder still at ``tmp`` nothing was published, so the old folder goes back to ``out``; with ``tmp`` gone the new
    folder is in place and the old one is deleted."""
    old, out = marker.get("old"), marker.get("out")
    if not (_is_plain_name(old, _OLD_PREFIX) and _is_plain_name(out)):
        return
    old, out = os.path.join(parent, old), os.path.join(parent, out)
    if dir_identity(old) is None:
        return
    if dir_identity(tmp) is None:
        shutil.rmtree(old, ignore_errors=True)
        return
    if dir_identity(out) is not None:
        with contextlib.suppress(OSError):
            os.rmdir(out)  # only an empty folder: the run's own mkdir claim (kernels without RENAME_NOREPLACE)
    _put_back(old, out)


def _stale(marker: dict | None, host: str) -> bool:
    return marker is not None and marker.get("host") == host and not _alive(marker["pid"], marker.get("start"))


def clean_stale_temp_dirs(parent: str) -> list[str]:
    """Remove what runs that died (SIGKILL, power loss) left in ``parent``; returns the temporary folders removed.

    Only ``.catmerge-tmp-*`` folders and their markers whose marker (valid JSON, written on this host) names a
    process that no longer exists are touched: an ``overwrite`` publish the run had started is finished or undone
    (see the module docstring), then the folder and the marker are removed. A marker left empty by a kill between
    its creation and its write, with no folder beside it, is removed too. A folder of a run still in progress, one
    without a marker, or anything this package did not make, is left alone.
    """
    removed: list[str] = []
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return removed
    host = socket.gethostname()
    for name in names:
        if not name.startswith(TEMP_PREFIX):
            continue
        path = os.path.join(parent, name)
        if name.endswith(MARKER):
            tmp = path[:-len(MARKER)]
            marker = _read_marker(path)
            if marker is None:
                with contextlib.suppress(OSError):
                    if os.lstat(path).st_size == 0 and not os.path.lexists(tmp):
                        os.unlink(path)
                continue
            if not _stale(marker, host):
                continue
            _finish_or_undo(parent, tmp, marker)
            if dir_identity(tmp) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
            _unlink_quietly(path + _NEW)
            _unlink_quietly(path)
        elif dir_identity(path) is not None and not os.path.lexists(marker_path(path)):
            # A folder of an older catmerge, which kept the marker inside.
            if _stale(_read_marker(os.path.join(path, MARKER)), host):
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
    """Rename the finished folder ``tmp`` (from :func:`make_temp_dir`, same parent) to ``out``, then remove its
    marker.

    Without ``overwrite``, ``out`` must not exist, except the empty folder whose :func:`dir_identity` is
    ``accept`` (what the caller saw, and agreed to fill, at the start); anything else at ``out`` — a folder that
    appeared meanwhile, even an empty one, or another run's result — raises :class:`PublishConflict` and is left
    untouched (so are ``tmp`` and its marker: rename ``tmp`` elsewhere or not, then :func:`remove_temp_dir`). With
    ``overwrite`` an existing folder ``out`` is renamed aside, ``tmp`` renamed in, and the old folder deleted, the
    marker recording the step (see the module docstring); a symlink or file at ``out`` is never replaced. Runs with
    SIGINT/SIGTERM deferred, so an interrupt cannot stop it between two of its renames.
    """
    with deferred_signals():
        if os.path.islink(out) or (os.path.lexists(out) and dir_identity(out) is None):
            raise PublishConflict(errno.EEXIST, "exists and is not a folder", out)
        ident = dir_identity(out)
        if ident is None:
            rename_noreplace(tmp, out)
        elif not overwrite:
            if accept is None or ident != accept:
                raise PublishConflict(errno.EEXIST, "appeared while merging", out)
            try:
                os.rename(tmp, out)  # replaces only an empty folder; one that got files meanwhile fails here
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise PublishConflict(errno.EEXIST, "is no longer empty", out) from None
                raise
        else:
            _replace_dir(tmp, out)
        _unlink_quietly(marker_path(tmp))


def _replace_dir(tmp: str, out: str) -> None:
    """Steps 4-7 of the overwrite publish (module docstring)."""
    marker = marker_path(tmp)
    before = _read_marker(marker) or _identity()
    old = os.path.join(os.path.dirname(out), _random_name(f"{_OLD_PREFIX}{os.path.basename(out)}-"))
    _rewrite_marker(marker, {**before, "out": os.path.basename(out), "old": os.path.basename(old)})
    os.rename(out, old)
    try:
        rename_noreplace(tmp, out)
    except BaseException:
        _put_back(old, out)  # the user's folder back, if nothing took its place
        with contextlib.suppress(OSError):
            _rewrite_marker(marker, before)  # nothing set aside any more: a later clean-up must not look for it
        raise
    shutil.rmtree(old, ignore_errors=True)
