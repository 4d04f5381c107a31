"""Atomic file writes that never replace a file silently, and cleaning of what killed writers
leave behind.

:func:`write_atomic` writes to a temporary file in the target's folder, named
``.sparse-atoms-<host>-<pid>-<16 hex>.tmp`` whatever the final name (at most 62 characters, so any
legal final name works), syncs it, then gives it the final name: ``os.replace`` when overwriting,
otherwise a hard link that fails if the name exists (race-free: a file that appears during the
write is never replaced), after which the temporary name is removed. A writer killed in between
leaves only its temporary file, which :func:`clean_temp_files` removes once it can prove the writer
gone. ``<host>`` (16 hex) tells writers apart that share a folder but not a process table: its
first half is a hash of the host name, its second of the pid namespace (another container on the
same kernel), so a pid is only ever judged where it means the same process.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import socket
import stat
import time

__all__ = ["write_atomic", "clean_temp_files", "check_folder_path", "exists_error"]

_TEMP_NAME = re.compile(r"\.sparse-atoms-([0-9a-f]{8})([0-9a-f]{8})-([1-9][0-9]{0,9})-[0-9a-f]{16}\.tmp")
# Written by versions before the host part: the writer may be on any host, so only age tells.
_OLD_TEMP_NAME = re.compile(r"\.sparse-atoms-([1-9][0-9]{0,9})-[0-9a-f]{16}\.tmp")
_TEMP_MAX_AGE_S = 24 * 3600  # no write takes a day: a temporary file this old is abandoned
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
    _make_folder(folder)
    if os.path.isdir(path) and not os.path.islink(path):
        raise IsADirectoryError(errno.EISDIR, "a folder has this name, and a file never replaces a "
                                "folder (choose another name)", path)
    if not overwrite and os.path.lexists(path):
        raise exists_error(path)
    name = temp_name()
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


def temp_name(pid: int | None = None, host: str | None = None) -> str:
    """The temporary name a writer ``pid`` (default: this process) on ``host`` (16 hex, default:
    this host and pid namespace, :func:`host_tag`) gives a file it is writing."""
    return f".sparse-atoms-{host or host_tag()}-{pid or os.getpid()}-{secrets.token_hex(8)}.tmp"


def host_tag() -> str:
    """16 hex: a hash of the host name, then one of the pid namespace (``/proc/self/ns/pid`` on
    Linux; the same for every process elsewhere)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""

    def digest(text: str) -> str:
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()

    return digest(socket.gethostname()) + digest(namespace)


def check_folder_path(folder: str | os.PathLike) -> None:
    """``NotADirectoryError`` naming the part of ``folder`` that exists as a file (so the folder
    cannot be created); nothing when ``folder`` exists or can be created."""
    folder = os.fspath(folder)
    part = folder
    while part and not os.path.lexists(part):
        part = os.path.dirname(part)
    if part and not os.path.isdir(part):
        raise NotADirectoryError(errno.ENOTDIR, f"cannot create the folder {folder}: {part} is a "
                                 "file, not a folder", folder)


def _make_folder(folder: str) -> None:
    check_folder_path(folder)
    os.makedirs(folder, exist_ok=True)


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

    Only regular files named like :func:`temp_name` are considered, and one is removed only when
    its writer is provably gone:

    - it is this process's own and not a write in progress (a previous process with our pid);
    - it comes from this host and pid namespace and (POSIX) no process has its pid;
    - it comes from this host (any namespace: a restarted container, a reboot) and is more than a
      day old.

    A file of another host is never removed (a live writer there cannot be told from a dead
    one); nor, under the names of older versions (no host part), one less than a day old.
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
    ours = host_tag()
    for entry in entries:
        match, old = _TEMP_NAME.fullmatch(entry.name), _OLD_TEMP_NAME.fullmatch(entry.name)
        if match is None and old is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        stale = now - info.st_mtime > _TEMP_MAX_AGE_S
        if match is None:
            abandoned = stale
        elif match[1] != ours[:8]:
            abandoned = False
        elif match[2] != ours[8:]:
            abandoned = stale
        else:
            abandoned = stale or not _writer_alive(int(match[3]), entry.name)
        if not abandoned:
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(entry.path)
    return removed


def _writer_alive(pid: int, name: str) -> bool:
    """Whether the writer ``pid`` of this host and pid namespace may still be writing ``name``."""
    if pid == os.getpid():
        return name in _IN_FLIGHT  # else a previous process with our pid (a restarted container)
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
