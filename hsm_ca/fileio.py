"""Every file a user names goes through here: bounded reads, checked and atomic writes.

Reads: an input that must be a regular file is checked with ``stat`` before
it is opened (and again with ``fstat`` after, opened non-blocking), so a FIFO
or ``/dev/zero`` is refused at once instead of blocking or streaming forever;
every kind of input has a size limit, named below. Writes: a destination is
checked before the work that produces its content (a certificate, a CRL, a
backup), and a regular file is replaced atomically, so a reader sees the old
file or the whole new one, never half.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from hsm_ca.errors import HsmCaError

# ------------------------------------------------------------- input limits
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CSR_BYTES = 1 * MiB  # equal to policy.MAX_CSR_BYTES, which also bounds CSRs given as bytes
PIN_FILE_BYTES = 4 * KiB
CONFIG_BYTES = 1 * MiB  # TOML: the home's hsm-ca.toml, profiles, bootstrap files
PEM_BYTES = 4 * MiB  # certificates and trust bundles
KEY_FILE_BYTES = 1 * MiB  # private keys bootstrap wrote before
CRL_BYTES = 256 * MiB  # a CRL of a few million entries
SIGNATURE_BYTES = 16 * MiB  # a detached CMS signature: certificates, a time stamp, a signature
BACKUP_BYTES = 1 * GiB  # read whole: authenticated encryption opens the whole file at once
AUDIT_LINE_BYTES = 1 * MiB  # one exported audit record
AUDIT_EXPORT_BYTES = 64 * GiB  # read line by line, never whole; checked with fstat first
BLANK_LINE_BYTES = 64 * KiB  # whitespace-only lines of a line-by-line input, all together
KEYSTORE_BYTES = 64 * MiB  # the built-in engine's keystore: thousands of wrapped keys
MAX_PATH_SHOWN = 64


class InputError(HsmCaError):
    """A named input file is missing, unreadable, not a regular file or over its limit.

    ``reason`` is the message without the file's name, for callers whose
    errors start with the file name themselves (``path:line: ...``).
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class OutputError(HsmCaError):
    """A named output file cannot be written."""


def show_path(path: str | os.PathLike[str]) -> str:
    """A path for an error message: at most ~64 characters, control characters escaped."""
    text = os.fsdecode(path)
    if len(text) > MAX_PATH_SHOWN:
        text = f"{text[:30]}...{text[-30:]}"
    return text if text.isprintable() else repr(text)


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], what: str = "file") -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file; never blocks on a FIFO.

    ``stat`` first, so a device or FIFO is not even opened (opening some
    devices has effects); then a non-blocking open and ``fstat`` of what was
    actually opened, in case the path was swapped in between.
    """
    shown = show_path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"cannot read {what} {shown}: {_reason(e)}",
                         f"cannot read: {_reason(e)}") from None
    except ValueError:  # an embedded NUL
        raise InputError(f"cannot read {what} {shown}: invalid path",
                         "cannot read: invalid path") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {shown} is {_kind(st.st_mode)}, not a regular file",
                         f"is {_kind(st.st_mode)}, not a regular file")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise InputError(f"cannot read {what} {shown}: {_reason(e)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{what} {shown} is {_kind(st.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str | os.PathLike[str], limit: int, what: str = "file") -> bytes:
    """The whole of a regular file of at most ``limit`` bytes (checked before reading)."""
    with open_regular(path, what) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise InputError(
                f"{what} {show_path(path)} is too large ({size} bytes; the limit is {limit})",
                f"is too large ({size} bytes; the limit is {limit})",
            )
        try:
            data = fh.read(limit + 1)
        except OSError as e:
            raise InputError(f"cannot read {what} {show_path(path)}: {_reason(e)}") from None
    if len(data) > limit:  # it grew while we read
        raise InputError(f"{what} {show_path(path)} is too large (the limit is {limit} bytes)")
    return data


def read_text_file(path: str | os.PathLike[str], limit: int, what: str = "file") -> str:
    """A regular file of at most ``limit`` bytes, as UTF-8 text."""
    data = read_regular_file(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{what} {show_path(path)} is not UTF-8 text (byte {e.start})",
            f"is not UTF-8 text (byte {e.start})",
        ) from None


class LineReader:
    """A regular text file as an iterator of lines, each and all of them bounded.

    For inputs that may be large (an exported audit trail): memory stays at
    one line, and a line over ``line_limit``, a file over ``total_limit`` (its
    size is checked before reading) or blank lines over ``blank_limit`` bytes
    in all raise ``InputError`` naming the line instead of reading on. Blank
    lines have their own small budget because a reader skips them for almost
    nothing per line, yet each costs a round of this loop: 64 MiB of newlines
    took 14 s, so 64 GiB would take hours, where 64 GiB of real records is
    what a very large CA exports. An export hsm-ca writes has no blank line.
    """

    def __init__(self, path: str | os.PathLike[str], *, line_limit: int, total_limit: int,
                 blank_limit: int = BLANK_LINE_BYTES, what: str = "file") -> None:
        self.path, self.what = path, what
        self.line_limit, self.total_limit, self.blank_limit = line_limit, total_limit, blank_limit
        self._fh = open_regular(path, what)
        size = os.fstat(self._fh.fileno()).st_size
        if size > total_limit:
            self._fh.close()
            raise InputError(
                f"{what} {show_path(path)} is too large ({size} bytes; the limit is {total_limit})",
                f"is too large ({size} bytes; the limit is {total_limit})",
            )
        self.total = 0
        self.blank = 0
        self.line_number = 0

    def __iter__(self) -> Iterator[str]:
        shown = show_path(self.path)
        while True:
            try:
                raw = self._fh.readline(self.line_limit + 1)
            except OSError as e:
                raise InputError(f"cannot read {self.what} {shown}: {_reason(e)}") from None
            if not raw:
                return
            self.line_number += 1
            self.total += len(raw)
            if len(raw) > self.line_limit:
                raise InputError(f"{self.what} {shown}: line {self.line_number} is longer "
                                 f"than {self.line_limit} bytes")
            if self.total > self.total_limit:
                raise InputError(f"{self.what} {shown} is larger than {self.total_limit} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{self.what} {shown}: line {self.line_number} "
                                 "is not UTF-8 text") from None
            if not line.strip():  # what a reader skips as blank (str.strip: any Unicode space)
                self.blank += len(raw)
                if self.blank > self.blank_limit:
                    raise InputError(f"{self.what} {shown}: more than {self.blank_limit} bytes "
                                     f"of blank lines (at line {self.line_number})")
            yield line

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> LineReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ outputs
class OutputFile:
    """A destination checked before the work whose result it will receive.

    A command that signs something first makes one of these, so a missing
    directory, a directory given as the file, a read-only place or a FIFO
    nobody reads is refused before a serial is spent. A regular file (or a
    new one) is later replaced atomically, through a symbolic link to where
    it points; a FIFO or character device (``/dev/stdout``, ``/dev/null``) is
    opened now, non-blocking, kept open and written through that descriptor,
    never reopened: closing a FIFO tells its reader the output has ended, and a
    reopen would wait (or fail) with nobody reading. So the work's result must
    be written through this object, the one that was checked.
    """

    def __init__(self, path: str | os.PathLike[str], mode: int = 0o644,
                 what: str = "output file") -> None:
        self.path = os.fspath(path)
        self.mode = mode
        self.what = what
        self._fd: int | None = None
        self._through = False  # a FIFO or device: written through the descriptor opened here
        shown = show_path(self.path)
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except (OSError, ValueError) as e:
            reason = _reason(e) if isinstance(e, OSError) else "invalid path"
            raise OutputError(f"cannot write {what} {shown}: {reason}") from None
        if st is not None and (stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            try:  # kept open until written: closing it would tell a reader the output ended
                self._fd = _open_write_through(self.path)
            except OSError as e:
                raise OutputError(f"cannot write {what} {shown}: {_write_reason(e)}") from None
            self._through = True
            self.target = Path(self.path)
            return
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise OutputError(f"cannot write {what} {shown}: it is {_kind(st.st_mode)}")
        self.target = Path(os.path.realpath(self.path))
        parent = self.target.parent
        if not parent.is_dir():
            raise OutputError(
                f"cannot write {what} {shown}: directory {show_path(parent)} does not exist"
            )
        if not os.access(parent, os.W_OK | os.X_OK) or (
            st is not None and not os.access(self.target, os.W_OK)
        ):
            reason = "read-only file system" if _read_only(parent) else "permission denied"
            raise OutputError(f"cannot write {what} {shown}: {reason}")

    def write(self, data: bytes, *, durable: bool = True, done: str | None = None) -> None:
        """Write ``data``; a failure's error also says what was already ``done`` (a serial)."""
        try:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
            elif self._through:  # never reopened: the reader saw the end when it was closed
                raise OSError(errno.EBADF, "already written or closed")
            else:
                atomic_write(self.target, data, self.mode, durable=durable)
        except OSError as e:
            message = f"cannot write {self.what} {show_path(self.path)}: {_reason(e)}"
            raise OutputError(f"{message}; {done}" if done else message) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _open_write_through(path: str | os.PathLike[str]) -> int:
    """Open a FIFO or character device for writing, never waiting for a reader.

    A blocking open of a FIFO nobody reads waits forever; non-blocking, it
    fails at once with ENXIO. Writes are then blocking, so a slow reader
    gets everything.
    """
    flags = os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_reason(e: OSError) -> str:
    return "no process is reading it" if e.errno == errno.ENXIO else _reason(e)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_output_dir(path: str | os.PathLike[str], what: str = "output directory") -> Path:
    """Make (if needed) and check a directory that will receive files, before the work."""
    shown = show_path(path)
    target = Path(path)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot write {what} {shown}: it is not a directory") from None
    except OSError as e:
        raise OutputError(f"cannot create {what} {shown}: {_reason(e)}") from None
    if not target.is_dir():
        raise OutputError(f"cannot write {what} {shown}: it is not a directory")
    if not os.access(target, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(target) else "permission denied"
        raise OutputError(f"cannot write in {what} {shown}: {reason}")
    return target


def atomic_write(path: str | Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Write via a temporary file and rename; devices and FIFOs are written through instead.

    Renaming over ``/dev/null`` as root would replace the device with a file,
    so anything that exists and is not a regular file is opened and written,
    without waiting for a reader (ENXIO). A destination a command checked
    before its work is written through that ``OutputFile``, not reopened here:
    a FIFO opened and closed once has already told its reader the output ended.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        fd = _open_write_through(path)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
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
