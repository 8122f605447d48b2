"""Crash-safe file primitives: atomic replace, durable directories, destroying secrets.

``atomic_write`` is the one way device state reaches the disk: write a temp
file in the same directory, fsync it, rename it over the target, fsync the
directory. A crash at any step leaves either the old file or the new one,
never a torn one. Every step is a :mod:`device_client.faults` point.

This module knows nothing of certificates or keys.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from . import faults

__all__ = ["atomic_write", "destroy_file", "fsync_directory"]


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so a rename or unlink in it survives a power cut."""
    fd = os.open(os.fspath(directory), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the file gets ``mode``.

    The temp file is created with ``mode`` from the start (``O_EXCL``), so a
    private key is never readable by others, not even for a moment.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed or widened what O_CREAT gave
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            faults.point("atomic_write.written")
            os.fsync(fd)
        finally:
            os.close(fd)
        faults.point("atomic_write.synced")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    faults.point("atomic_write.renamed")
    fsync_directory(target.parent)
    faults.point("atomic_write.dir_synced")


def destroy_file(path: str | os.PathLike[str]) -> bool:
    """Overwrite ``path`` with random bytes, fsync, unlink, fsync the directory.

    Returns ``False`` when there was no such file. On flash with wear levelling
    or a copy-on-write file system the old blocks may survive the overwrite:
    this is best effort, which is why key stores on such media should be a
    secure element (PKCS#11) instead.
    """
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        written = 0
        while written < size:
            written += os.write(fd, secrets.token_bytes(min(65536, size - written)))
        os.fsync(fd)
    finally:
        os.close(fd)
    target.unlink()
    fsync_directory(target.parent)
    return True
