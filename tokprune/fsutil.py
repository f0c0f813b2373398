"""Safe file-system operations for every command: nothing half-written, nothing deleted by mistake.

- :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json` and the
  :func:`atomic_output` context manager: write a temporary file beside the target, ``fsync`` it,
  then ``os.replace`` it into place. A failure (full disk, interrupt) leaves the old file as it
  was and no temporary file behind.
- :func:`check_output_file` / :func:`check_output_dir`: refuse an output path before any work
  starts (a directory where a file is wanted, an unknown image extension, a parent that cannot
  be created or written).
- :func:`replace_dir`: move a finished directory into place, replacing an old one atomically
  (rename beside, swap, remove the old); for the current directory (``--out .``), which cannot be
  renamed, the entries are swapped one by one.
- :func:`describe_dir`: "what is in it" for refusal messages.
- :class:`DirLock`: an output-directory lock (a file created with ``O_EXCL`` holding pid, host,
  time); a stale lock of a dead process on this host is taken over with a note.

Example::

    from tokprune.fsutil import atomic_output, check_output_file

    out = check_output_file("fox.png", flag="--out", extensions=IMAGE_EXTENSIONS)
    with atomic_output(out) as tmp:
        image.save(tmp)
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokprune.errors import ConfigError, TokpruneError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DirLock",
    "LockedError",
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "check_output_file",
    "describe_dir",
    "read_text_input",
    "replace_dir",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class LockedError(TokpruneError):
    """Another live process holds the output directory's lock."""


# ---- atomic files -----------------------------------------------------------------------------
def _tmp_beside(path: Path) -> Path:
    # The suffix is kept so that writers which pick a format from the name (PIL) still work.
    return path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception (``KeyboardInterrupt`` included) the temporary file is removed and ``path``
    keeps its old content (or stays absent).
    """
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        yield tmp
        if not tmp.exists():
            raise OSError(errno.ENOENT, "the writer produced no file", str(path))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + ``os.replace``)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 1, **kwargs: Any) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (``kwargs`` go to ``json.dumps``)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, **kwargs) + "\n")


# ---- checks before any work --------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_parent_writable(path: Path, flag: str, what: str) -> None:
    anchor = _nearest_existing(path.parent if path.name else path)
    if not anchor.is_dir():
        raise ConfigError(f"{flag} {path}: {anchor} is a file, so the {what} cannot be created under it; choose another {flag}")
    if not _can_create_in(anchor):
        raise ConfigError(
            f"{flag} {path}: cannot write there ({anchor} is read-only or not writable by this user); choose a "
            f"writable {flag}"
        )


def _can_create_in(directory: Path) -> bool:
    """Try it: create (O_EXCL) and remove a probe file. ``os.access`` alone says yes to root on a
    read-only mount."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    probe = directory / f".tokprune-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return True


def check_output_file(
    path: str | os.PathLike, *, flag: str, extensions: tuple[str, ...] | None = None
) -> Path:
    """Refuse an output file path before any work: a directory, a wrong or missing extension, an
    unwritable place. Returns the path. Raises :class:`ConfigError` naming ``flag``."""
    path = Path(path)
    if path.is_dir() or str(path).endswith(os.sep):
        raise ConfigError(f"{flag} {path} is a directory; give a file name, e.g. {flag} {path / ('out' + (extensions or ('.json',))[0])}")
    if extensions is not None and path.suffix.lower() not in extensions:
        got = f"extension {path.suffix!r}" if path.suffix else "no extension"
        raise ConfigError(
            f"{flag} {path} has {got}; expected one of {', '.join(extensions)} (e.g. {flag} {path.with_suffix(extensions[0])})"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path} exists and is read-only; choose another {flag} or make it writable")
    _check_parent_writable(path, flag, "file")
    return path


def check_output_dir(path: str | os.PathLike, *, flag: str) -> Path:
    """Refuse an output directory path that is a file or whose place is not writable. Returns it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; choose a directory path")
    _check_parent_writable(path.absolute(), flag, "directory")
    return path


def read_text_input(path: str | os.PathLike, *, flag: str, what: str = "line") -> list[str]:
    """The non-blank, non-``#`` lines of a UTF-8 text input file; :class:`ConfigError` naming ``flag``
    for a missing file, a directory, an unreadable or binary file, or one with no lines."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; expected a text file with one {what} per line")
    if not path.exists():
        raise ConfigError(f"{flag} {path}: no such file; expected a text file with one {what} per line")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror}); check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise ConfigError(f"{flag} {path} is not a text file (binary content); expected UTF-8 text with one {what} per line")
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ConfigError(f"{flag} {path} holds no {what}s; expected one {what} per line")
    return lines


def describe_dir(path: Path, limit: int = 4) -> str:
    """``"3 entries: notes.txt, sub/, x.png"`` (sorted, at most ``limit`` names)."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}"


# ---- directory replacement ---------------------------------------------------------------------
def _is_cwd(path: Path) -> bool:
    try:
        return path.exists() and os.path.samefile(path, os.getcwd())
    except OSError:
        return False


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished directory ``new`` to ``target``.

    ``target`` absent or empty: one rename. ``target`` holding the old content (the caller has
    checked that it may be replaced): rename it beside, rename ``new`` into place, then remove
    the old one — at every moment ``target`` is either the old or the new content. The current
    working directory cannot be renamed, so there the entries are swapped one by one: the old
    entries move into a hidden folder inside it first, the new ones in, then the folder goes.
    """
    new, target = Path(new), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True) if target.name else None
    if _is_cwd(target) or (target.exists() and os.path.ismount(target)):
        _replace_entries(new, target)
        return
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(new, target)  # rename(2) replaces an empty directory
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)  # put the old content back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _replace_entries(new: Path, target: Path) -> None:
    old = target / f".tokprune-old-{os.getpid()}"
    old.mkdir()
    moved: list[str] = []
    try:
        for entry in sorted(target.iterdir()):
            if entry.name != old.name:
                os.replace(entry, old / entry.name)
                moved.append(entry.name)
        for entry in sorted(new.iterdir()):
            os.replace(entry, target / entry.name)
    except BaseException:
        for name in moved:  # put the old entries back where no new one took their place
            if not (target / name).exists():
                os.replace(old / name, target / name)
        raise
    shutil.rmtree(old, ignore_errors=True)
    new.rmdir()


# ---- lock ---------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirLock:
    """An exclusive lock on an output directory: the file ``lock_path`` created with ``O_EXCL``.

    It holds ``{"pid", "host", "time", "command"}``. A lock left by a dead process on this host is
    taken over (with a log note); a live one, or one from another host, raises
    :class:`LockedError` naming the holder and the lock file. Use as a context manager.

    Example::

        with DirLock(Path("engines/.sd3.lock"), what="engines/sd3", command="tokprune-export"):
            ...
    """

    def __init__(self, lock_path: str | os.PathLike, *, what: str, command: str = "") -> None:
        self.path = Path(lock_path)
        self.what = what
        self.command = command
        self._held = False

    def _content(self) -> bytes:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "command": self.command}
        return (json.dumps(info) + "\n").encode()

    def acquire(self) -> "DirLock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            try:
                os.write(fd, self._content())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._held = True
            return self
        raise LockedError(f"could not take the lock {self.path} for {self.what}; try again")

    def _handle_existing(self) -> None:
        try:
            raw = self.path.read_text(encoding="utf-8")
            info = json.loads(raw)
            pid, host, since = int(info["pid"]), str(info["host"]), float(info["time"])
        except FileNotFoundError:
            return  # released meanwhile: retry
        except (OSError, ValueError, KeyError, TypeError):
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0.0
            if age < 30:  # being written right now by its holder
                raise LockedError(
                    f"{self.what} is being written by another process (lock {self.path}); wait for it to finish"
                ) from None
            logger.warning("taking over the unreadable lock %s (%.0f s old)", self.path, age)
            self.path.unlink(missing_ok=True)
            return
        when = time.strftime("%H:%M:%S", time.localtime(since))
        if host == socket.gethostname() and not _pid_alive(pid):
            logger.warning("taking over the stale lock %s (its process %d on %s, started %s, is gone)",
                           self.path, pid, host, when)
            self.path.unlink(missing_ok=True)
            return
        raise LockedError(
            f"{self.what} is being written by another process (pid {pid} on {host}, since {when}"
            + (f": {info.get('command')}" if info.get("command") else "")
            + f"); wait for it to finish, or choose another output. If that process is gone, delete {self.path}"
        )

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            if int(info.get("pid", -1)) == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
