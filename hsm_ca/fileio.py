"""Durable, atomic file writes: a reader sees the old file or the whole new one, never half."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def atomic_write(path: str | Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Write via a temporary file and rename; devices and FIFOs are written through instead.

    Renaming over ``/dev/null`` as root would replace the device with a file,
    so anything that exists and is not a regular file is opened and written.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        with open(path, "wb") as fh:
            fh.write(data)
        return
    parent = path.parent if str(path.parent) else Path(".")
    tmp = parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def sync_directory(path: Path) -> None:
    """Flush the files and renames in a directory written with ``durable=False``.

    One ``sync()`` writes every dirty page out (and waits, on Linux), which for
    a thousand files is far cheaper than a thousand ``fsync()`` calls.
    """
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
