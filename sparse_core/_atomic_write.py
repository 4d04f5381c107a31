"""Atomic file writes that never replace a file silently, and cleaning of what killed writers
leave behind.

:func:`write_atomic` writes to a temporary file in the target's folder, named
``.sparse-atoms-<pid>-<16 hex>.tmp`` whatever the final name (at most 45 characters, so any legal
final name works), syncs it, then gives it the final name: ``os.replace`` when overwriting,
otherwise a hard link that fails if the name exists (race-free: a file that appears during the
write is never replaced), after which the temporary name is removed. A writer killed in between
leaves only its temporary file, which :func:`clean_temp_files` removes once the writer is gone.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import time

__all__ = ["write_atomic", "clean_temp_files", "exists_error"]

_TEMP_NAME = re.compile(r"\.sparse-atoms-([1-9][0-9]{0,9})-[0-9a-f]{16}\.tmp")
_TEMP_MAX_AGE_S = 24 * 3600
_IN_FLIGHT: set[str] = set()  # names of the temporary files this process is writing now
# errno of os.link on file systems without hard links (FAT, exFAT, some network shares)
_NO_HARD_LINKS = {errno.EPERM, errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def write_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder: readers see no
    file, the old one or the new one, never a part; a failed write leaves no file behind.

    With ``overwrite=False`` (the default) an existing ``path`` raises ``FileExistsError``, also
    when it appears during the write: the last step links the finished file to ``path``, which
    fails if the name is taken. With ``overwrite=True`` it replaces ``path`` (``os.replace``).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if not overwrite and os.path.lexists(path):
        raise exists_error(path)
    name = f".sparse-atoms-{os.getpid()}-{secrets.token_hex(8)}.tmp"  # <= 45 characters
    temporary = os.path.join(folder, name)
    _IN_FLIGHT.add(name)
    try:
        # A fresh name opened exclusively, not mkstemp: the file gets the usual umask permissions.
        with open(temporary, "xb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            _link_new(temporary, path)
    finally:
        try:
            os.unlink(temporary)  # still there after a link or a failure
        except FileNotFoundError:
            pass
        _IN_FLIGHT.discard(name)


def _link_new(temporary: str, path: str) -> None:
    """Give the finished ``temporary`` the name ``path`` only if that name is free."""
    try:
        os.link(temporary, path)
        return
    except FileExistsError:
        raise exists_error(path) from None
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
    # No hard links on this file system: claim the name with an empty file created exclusively
    # (still race-free between writers), then move the data over it.
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        raise exists_error(path) from None
    try:
        os.replace(temporary, path)
    except BaseException:
        os.unlink(path)
        raise


def exists_error(path: str) -> FileExistsError:
    return FileExistsError(errno.EEXIST, "file exists and is not overwritten (pass overwrite=True "
                           "to replace it, or choose another name)", path)


def clean_temp_files(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files that writers killed mid-write (``kill -9``, power loss) left in
    ``folder``; returns their paths.

    Only names of the form ``.sparse-atoms-<pid>-<16 hex>.tmp`` that are regular files are
    considered, and one is removed when its writer is gone: its pid is this process but not a
    write in progress, or (POSIX) no process has that pid, or the file is more than a day old.
    (Windows has no harmless liveness probe, so there only the first and last rules apply.)
    A missing folder has nothing to clean.
    """
    folder = os.fspath(folder)
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        if now - info.st_mtime <= _TEMP_MAX_AGE_S and _writer_alive(int(match[1]), entry.name):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(entry.path)
    return removed


def _writer_alive(pid: int, name: str) -> bool:
    if pid == os.getpid():
        return name in _IN_FLIGHT  # a previous process with our pid (a restarted container)
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)  # signal 0: a liveness check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OverflowError:
        return False
    return True
