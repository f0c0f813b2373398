"""The export's output directory: what may be replaced, the lock, the work directory, the swap.

Rules (issue 11, "nothing lost"):

- ``--out`` may be replaced (with ``force``) only when it is empty or a tokprune export (its
  ``manifest.json`` says ``"format": "tokprune-export"``) holding no files the export did not
  write; anything else is refused with the path and a few of its entries, ``force`` or not.
- One export at a time per ``--out``: :func:`lock` takes ``.<name>.lock`` beside it.
- The export is built in ``.<name>.partial`` beside it and swapped in at the end
  (:func:`tokprune.fsutil.replace_dir`), which also works for ``--out .``.
- A work directory is discarded only when its state file says an export made it.

Example::

    out = resolve_out("engines/x")
    check_replaceable(out, force=True)          # ConfigError when it holds anything else
    with lock(out, command="tokprune-export ..."):
        ...
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from tokprune.errors import ConfigError
from tokprune.fsutil import DirLock, describe_dir

logger = logging.getLogger(__name__)

__all__ = ["check_replaceable", "discard_work", "is_export", "lock", "lock_path", "resolve_out", "user_files"]

MANIFEST = "manifest.json"
FORMAT = "tokprune-export"


def resolve_out(out: str | os.PathLike) -> Path:
    """``out`` as given, made absolute only where its name is empty or ``..`` (``--out .``), so the
    siblings (``.<name>.partial``, ``.<name>.lock``) land beside it, not inside it."""
    out = Path(out)
    return out.resolve() if out.name in ("", ".", "..") else out


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def lock(out: Path, *, command: str = "") -> DirLock:
    """The output-directory lock (a context manager); a second export into ``out`` is refused."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return DirLock(lock_path(out), what=f"--out {out}", command=command)


def is_export(out: Path) -> bool:
    """True when ``out/manifest.json`` is a JSON object whose ``format`` is ``tokprune-export``."""
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _tokprune_own(name: str) -> bool:
    """Hidden names tokprune itself writes inside an export (state, temporary and swap files)."""
    return name == ".export-state.json" or name.startswith((".tokprune-", ".manifest.")) or ".tmp" in name


def user_files(out: Path) -> list[str]:
    """Entries of an export directory its manifest does not vouch for (hidden ones included: a
    ``.git`` or ``.notes`` there is the user's; tokprune's own temporary names excepted)."""
    from tokprune.export.manifest import load_manifest

    try:
        known = {e["path"] for e in load_manifest(out).files()} | {MANIFEST}
    except Exception:  # noqa: BLE001 - an unreadable manifest vouches for nothing but itself
        known = {MANIFEST}
    dirs = {str(Path(k).parent) for k in known if "/" in k}
    extra = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if _tokprune_own(p.name) or rel in known or (p.is_dir() and rel in dirs):
            continue
        if p.is_dir() and any(k.startswith(rel + "/") for k in known):
            continue
        extra.append(rel + ("/" if p.is_dir() else ""))
    return extra


def check_replaceable(out: Path, *, force: bool, flag: str = "--out") -> str:
    """What ``out`` is: ``"absent"``, ``"empty"`` or ``"export"``. Raises :class:`ConfigError` for
    anything this export must not replace (a file, a non-export directory, user files in an export)."""
    if not out.exists():
        return "absent"
    if not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file; choose a directory path")
    if not any(out.iterdir()):
        return "empty"
    if not is_export(out):
        raise ConfigError(
            f"{flag} {out} exists and is not a tokprune export ({describe_dir(out)}); tokprune never replaces it, "
            f"--force or not: choose another {flag} (a new or empty directory)"
        )
    if force:
        extra = user_files(out)
        if extra:
            shown = ", ".join(extra[:4]) + (", ..." if len(extra) > 4 else "")
            raise ConfigError(
                f"{flag} {out} is a tokprune export but also holds {len(extra)} file(s) it did not write ({shown}); "
                f"--force would delete them: move them away or choose another {flag}"
            )
    return "export"


def discard_work(work: Path, state_file: str) -> None:
    """Remove an export's work directory, but only one that an export made (its state file is there)."""
    if not work.exists():
        return
    if not (work / state_file).is_file():
        raise ConfigError(
            f"{work} exists but was not made by tokprune-export ({describe_dir(work)}); move it away and re-run"
        )
    shutil.rmtree(work)
