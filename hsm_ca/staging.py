"""Homes built beside their final place and renamed in: nothing half-made, nothing left over.

``init`` and ``hsm restore`` build a whole home (database, keystore, partition
key) in a staging directory next to it and rename it into place at the end,
so a run killed half-way never leaves a half-made home. What it may leave is
the staging directory itself - a full copy of a CA's secrets - so each one
records its owner: a file holding the owner's pid, on which the owner keeps
an exclusive ``flock`` for as long as it runs. The kernel drops that lock when
the process dies, however it dies, so a staging directory whose owner file
can be locked is stale, and :func:`sweep` (run by every command on the parent
directory of its home, and before each new staging) removes it. A live run's
staging is never touched: its lock is held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

OWNER = ".staging-owner"
KINDS = ("init", "restore")
# between creating the directory and its owner file there is no lock to test; a directory
# without an owner file is taken for stale only once it is clearly older than that moment
ORPHAN_AGE = 60.0
_NAME = re.compile(r"^\..+\.(?:init|restore)-[A-Za-z0-9_-]+$")
_PID = re.compile(r"\.(?:init|restore)-(\d+)-")
_LEGACY = re.compile(r"^\.restore-[A-Za-z0-9_]+$")  # mkdtemp names of earlier versions


class Staging:
    """A staging directory owned (locked) by this process until committed or aborted."""

    def __init__(self, final: Path, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(kind)
        self.final = Path(final)
        parent = self.final.parent
        parent.mkdir(parents=True, exist_ok=True)
        sweep(parent)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.{kind}-{os.getpid()}-",
                                          dir=parent))
        self._fd: int | None = None
        try:
            os.chmod(self.path, 0o700)
            self._fd = os.open(self.path / OWNER, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            os.write(self._fd, f"{os.getpid()}\n".encode())
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        """Rename the staging directory to its final name (which must not exist)."""
        os.replace(self.path, self.final)
        # the owner file came along; a kill right here leaves only this small file behind
        with contextlib.suppress(OSError):
            (self.final / OWNER).unlink()
        self._release()

    def abort(self) -> None:
        """Remove the staging directory and everything in it."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _stale(entry: Path) -> bool:
    """Whether the process that made this staging directory is gone."""
    try:
        fd = os.open(entry / OWNER, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        try:
            age = time.time() - entry.lstat().st_mtime
        except OSError:
            return False
        legacy = _LEGACY.match(entry.name) is not None
        if legacy and not (entry / "hsm-ca.toml").exists():
            return False  # not ours to judge
        return age > ORPHAN_AGE or _owner_gone(entry.name)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: a live init or restore
    finally:
        os.close(fd)  # closing drops a lock we took; the owner is gone anyway
    return True


def _owner_gone(name: str) -> bool:
    """Killed between creating the directory and its owner file: the pid in its name is gone."""
    match = _PID.search(name)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return False  # alive (or its pid reused): wait for ORPHAN_AGE


def sweep(parent: Path) -> list[Path]:
    """Remove stale init/restore staging directories in ``parent``; returns what was removed.

    Best effort and quiet: a directory that cannot be read, or an entry that
    cannot be removed, is left for the next run.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        if not (_NAME.match(entry.name) or _LEGACY.match(entry.name)):
            continue
        with contextlib.suppress(OSError):
            if not entry.is_dir(follow_symlinks=False):
                continue
        path = Path(entry.path)
        if _stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
