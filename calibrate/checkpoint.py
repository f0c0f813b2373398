"""Measured rollouts checkpointed on disk, so an interrupted calibration resumes where it stopped.

One JSON line per measurement, appended and fsynced as soon as it is known; its key is a hash of
everything the measurement depends on (model fingerprint, prompts, seed, call settings, policy,
reuse mode and the plan). A re-run with the same directory reads the file back and measures only
what is missing; since the search is deterministic it then takes the same decisions and writes
the same schedule. A truncated last line (a kill mid-write) is ignored.

Example::

    store = RolloutStore("schedule.calibration", identity={"fingerprint": "...", "steps": 28})
    errs = store.get("calib", plan, "cat")      # None when not measured yet
    store.put("calib", plan, "cat", [0.01, 0.02])
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from tokprune.errors import ConfigError
from tokprune.hashing import json_sha256
from tokprune.pruning.plan import PrunePlan

logger = logging.getLogger(__name__)

__all__ = ["RolloutStore"]

FILE = "rollouts.jsonl"


def _key(identity: dict[str, Any], group: str, plan: PrunePlan, policy: str) -> str:
    body = {"identity": identity, "group": group, "policy": policy, "image": list(plan.image_keep),
            "text": None if plan.text_keep is None else list(plan.text_keep)}
    if plan.step_cache is not None:  # only plans with cached steps: keys of other plans stay as they were
        body["cache"] = list(plan.step_cache)
    return json_sha256(body, allow_nan=True)


class RolloutStore:
    """Per-prompt errors of measured plans; in memory only when ``directory`` is None."""

    def __init__(self, directory: str | os.PathLike | None, identity: dict[str, Any]) -> None:
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        self.directory = None if directory is None else Path(directory)
        self._data: dict[str, list[float]] = {}
        self.loaded = 0  # measurements read back from disk
        self.reused = 0  # of those, how many were asked for again
        if self.directory is not None:
            self._load()

    def _load(self) -> None:
        path = self.directory / FILE
        if not path.exists():
            return
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    self._data[str(rec["key"])] = [float(v) for v in rec["errors"]]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by an interrupt
        self.loaded = len(self._data)
        if self.loaded:
            logger.info("calibration checkpoint %s: %d measured runs found", path, self.loaded)

    def has(self, group: str, plan: PrunePlan, policy: str) -> bool:
        """Whether ``plan`` is measured already (a look-up that does not count as reused)."""
        return _key(self.identity, group, plan, policy) in self._data

    def get(self, group: str, plan: PrunePlan, policy: str) -> list[float] | None:
        errs = self._data.get(_key(self.identity, group, plan, policy))
        if errs is not None:
            self.reused += 1
        return errs

    def put(self, group: str, plan: PrunePlan, policy: str, errors: Sequence[float]) -> None:
        key = _key(self.identity, group, plan, policy)
        values = [float(v) for v in errors]
        self._data[key] = values
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "group": group, "errors": values}, separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise ConfigError(
                f"cannot write the calibration checkpoint in {str(self.directory)!r}: {exc.strerror or exc}; "
                "pass a writable --checkpoint-dir"
            ) from None
