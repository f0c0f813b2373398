"""Resumable results of ``tokprune-quality``: one JSON record per line, appended atomically.

Each finished unit of work (a row's plan, a row's measured MACs, a row's metrics on one chunk of
captions) is one line written with a single ``write`` on an ``O_APPEND`` descriptor and fsync'd,
so an interrupt leaves at most one truncated last line, which :meth:`RunStore.records` skips.
A rerun with the same settings reads what is done and skips it; with other settings it refuses
(the first line holds the settings' fingerprint).

Example::

    store = RunStore(Path("results/quality/.work"), settings={"steps": 28, ...})
    if not store.has("chunk", row="cat@0.3", start=0):
        store.append({"kind": "chunk", "row": "cat@0.3", "start": 0, ...})
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from tokprune.errors import ConfigError
from tokprune.fsutil import atomic_output
from tokprune.hashing import sha256_bytes

logger = logging.getLogger(__name__)

__all__ = ["RunStore", "fingerprint"]


def fingerprint(settings: dict[str, Any]) -> str:
    """Stable short hash of JSON-able settings."""
    return sha256_bytes(json.dumps(settings, sort_keys=True, default=str))[:16]  # this form keys existing work folders


class RunStore:
    """The work folder of one comparison: ``records.jsonl`` plus saved dense references (``.npy``)."""

    FILE = "records.jsonl"

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / self.FILE
        self.key = fingerprint(settings)
        recs = self.records()
        if not recs:
            self.append({"kind": "settings", "fingerprint": self.key, "settings": settings})
        elif recs[0].get("fingerprint") != self.key:
            raise ConfigError(
                f"{self.path} holds results of other settings (fingerprint {recs[0].get('fingerprint')}, this run "
                f"{self.key}); pass another --out, or --fresh to discard them"
            )

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, in order (a truncated last line from an interrupt is skipped)."""
        if not self.path.is_file():
            return []
        out = []
        for i, line in enumerate(self.path.read_text().splitlines()):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s line %d is incomplete (interrupted write); ignored", self.path, i + 1)
        return out

    def append(self, record: dict[str, Any]) -> None:
        """Append one record atomically (single write on O_APPEND, then fsync)."""
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # an interrupted write left a partial line: end it,
                data = b"\n" + data  # or this record would be glued onto it and lost too
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def find(self, kind: str, **match: Any) -> dict[str, Any] | None:
        """The last record of ``kind`` whose fields equal ``match``."""
        hit = None
        for r in self.records():
            if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items()):
                hit = r
        return hit

    def has(self, kind: str, **match: Any) -> bool:
        return self.find(kind, **match) is not None

    # ---- dense references of a chunk (images and latents), reused on resume ----
    def _array_path(self, name: str) -> Path:
        return self.folder / f"{name}.npy"

    def save_array(self, name: str, array: np.ndarray) -> None:
        """Write ``name.npy`` atomically (temporary file, then rename)."""
        with atomic_output(self._array_path(name)) as tmp:  # the temporary name keeps .npy: np.save adds none
            np.save(tmp, array)

    def load_array(self, name: str) -> np.ndarray | None:
        path = self._array_path(name)
        return np.load(path) if path.is_file() else None
