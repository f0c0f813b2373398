"""Calibration prompts: the built-in set, user files, and deterministic picks from them."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Sequence

from tokprune.errors import ConfigError

__all__ = ["load_prompts", "pick_prompts", "split_prompts"]


def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts, one per line (blank lines and ``#`` comments skipped).

    ``path=None`` reads the calibration set shipped with the package (``prompts.txt``:
    objects, scenes, text rendering, counting, spatial relations, styles, short and long).
    """
    if path is None:
        text = importlib.resources.files("tokprune.calibrate").joinpath("prompts.txt").read_text(encoding="utf-8")
        source = "the built-in calibration prompts"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"prompt file {str(p)!r} does not exist; pass --prompts FILE with one prompt per line")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompt file {str(p)!r} is not UTF-8 text ({e})") from None
        source = repr(str(p))
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if not prompts:
        raise ConfigError(f"{source} holds no prompts; expected one prompt per line")
    return prompts


def pick_prompts(prompts: Sequence[str], num: int | None) -> list[str]:
    """``num`` prompts spread evenly over the list (all when None or >= len), deterministic."""
    if num is None or num >= len(prompts):
        return list(prompts)
    if num < 1:
        raise ConfigError(f"--num-prompts {num}; expected >= 1")
    return [prompts[(i * len(prompts)) // num] for i in range(num)]


def split_prompts(prompts: Sequence[str], num: int | None, holdout: int) -> tuple[list[str], list[str]]:
    """(calibration, held-out): ``num`` evenly spread prompts, then ``holdout`` evenly spread among the rest.

    The held-out prompts never overlap the calibration ones; fewer are returned when the set is small.
    """
    calib = pick_prompts(prompts, num)
    chosen = set(calib)
    rest = [p for p in prompts if p not in chosen]
    if holdout < 0:
        raise ConfigError(f"--holdout-prompts {holdout}; expected >= 0")
    held = pick_prompts(rest, holdout) if holdout and rest else []
    return calib, held
