"""Homes built beside their final place and renamed in: nothing half-made, nothing left over.

``init`` and ``hsm restore`` build a whole home (database, keystore, partition
key) in a staging directory next to it and rename it into place at the end,
so a run killed half-way never leaves a half-made home. What it may leave is
the staging directory itself - a full copy of a CA's secrets - so each one
records its owner: a file holding the owner's pid, on which the owner keeps
an exclusive ``flock`` for as long as it runs. The kernel drops that lock when
the process dies, however it dies, so a staging directory whose owner file
can be locked is stale, and :func:`sweep` removes it.

What sweep may remove is narrow on purpose, because it runs on every command
in the home's parent directory - for the default ``~/.hsm-ca`` that is the
user's own ``$HOME``:

* only names in the exact form Staging makes,
  ``.{home}.{init|restore}-{pid}-{16 hex digits}``;
* with its whole tree only when it holds an owner file that is a regular file
  naming that pid and can be locked (its owner is gone) - for any home in
  the parent, since a killed ``hsm restore`` into a new home leaves its copy
  of the CA beside homes that go on being used, and no directory hsm-ca did
  not make has such a name *and* such an owner file;
* without an owner file only for *this* home's names, when the pid in its
  name is gone and the directory is empty but for the owner file being made:
  nothing of a CA's is ever written before the owner file is in place, so
  this is only an empty directory.

The owner file is made under a temporary name, locked, written and synced,
and only then renamed into place, so no sweep ever sees an owner file that is
not already locked by a live owner.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

OWNER = ".staging-owner"
OWNER_TMP = ".staging-owner.new"
KINDS = ("init", "restore")
_OWNER_BYTES = 32  # a pid and a newline


def _prefix(final: Path) -> str | None:
    """The start of every staging name for the home ``final``; None for names like ``..``."""
    name = final.name
    return None if name in ("", ".", "..") else f".{name}."


class Staging:
    """A staging directory owned (locked) by this process until committed or aborted."""

    def __init__(self, final: Path, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(kind)
        self.final = Path(final)
        prefix = _prefix(self.final)
        if prefix is None:
            raise ValueError(f"no home can be built at {self.final}")
        parent = self.final.parent
        parent.mkdir(parents=True, exist_ok=True)
        sweep(self.final)
        while True:
            path = parent / f"{prefix}{kind}-{os.getpid()}-{secrets.token_hex(8)}"
            try:
                os.mkdir(path, 0o700)
                break
            except FileExistsError:
                continue
        self.path = path
        self._fd: int | None = None
        try:
            os.chmod(self.path, 0o700)
            # made, locked, written and synced under another name; only then renamed into
            # place, so an owner file a sweep can see is always locked while its owner lives
            fd = os.open(self.path / OWNER_TMP,
                         os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            self._fd = fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
            os.rename(self.path / OWNER_TMP, self.path / OWNER)
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


def _pid_gone(pid: int) -> bool:
    """Whether no process has this pid (a process we may not signal is alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        return False
    return False


def _owner_released(path: Path, pid: int) -> bool | None:
    """For a staging with an owner file: True if its owner is gone, False if it lives.

    None when there is no owner file. Anything unexpected (a symlink, not a
    regular file, another pid inside) is no staging of ours: False.
    """
    try:
        fd = os.open(path / OWNER, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held: a live init or restore
        return os.read(fd, _OWNER_BYTES + 1) == f"{pid}\n".encode()
    except OSError:
        return False
    finally:
        os.close(fd)  # drops a lock we took; the owner is gone anyway


def _remove_unowned(path: Path, pid: int) -> bool:
    """A staging killed before its owner file was in place: an empty directory, removed
    only when the pid in its name is gone and nothing but the owner file being made is in it."""
    if not _pid_gone(pid):
        return False
    try:
        names = os.listdir(path)
    except OSError:
        return False
    if any(n != OWNER_TMP for n in names):
        return False
    with contextlib.suppress(OSError):
        st = os.lstat(path / OWNER_TMP)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _OWNER_BYTES:
            return False
        os.unlink(path / OWNER_TMP)
    try:
        os.rmdir(path)  # fails, leaving it, if anything appeared meanwhile
    except OSError:
        return False
    return True


_FORM = re.compile(r"\.(.+)\.(?:init|restore)-([0-9]{1,10})-[0-9a-f]{16}", re.DOTALL)


def sweep(home: Path) -> list[Path]:
    """Remove stale staging directories in ``home``'s parent; returns what was removed.

    Stagings of any home there whose owner is provably gone, and this home's
    own ones killed before they had an owner (see the module docstring).
    Best effort and quiet: a directory that cannot be read, or an entry that
    cannot be removed, is left for the next run.
    """
    home = Path(home)
    removed: list[Path] = []
    if _prefix(home) is None:
        return removed
    try:
        entries = list(os.scandir(home.parent))
    except OSError:
        return removed
    for entry in entries:
        match = _FORM.fullmatch(entry.name)
        if match is None:
            continue
        with contextlib.suppress(OSError):
            if not entry.is_dir(follow_symlinks=False):
                continue
        path, pid = Path(entry.path), int(match.group(2))
        released = _owner_released(path, pid)
        if released is None:
            if match.group(1) == home.name and _remove_unowned(path, pid):
                removed.append(path)
        elif released:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
