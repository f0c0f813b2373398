"""One error base class for everything tokprune raises on purpose.

Every message names the thing, shows what was got versus expected, and says the flag or
command that fixes it. Catch :class:`TokpruneError` to handle all of them.
"""

from __future__ import annotations


class TokpruneError(Exception):
    """Base class of every error tokprune raises deliberately."""


class ConfigError(TokpruneError, ValueError):
    """A user-facing argument or configuration value is out of range or inconsistent."""


class ModelNotFoundError(TokpruneError):
    """A model name, hub id or local path could not be resolved (offline, typo, missing files)."""


class ShapeError(TokpruneError, ValueError):
    """A tensor or resolution does not fit the model, plan, schedule or engine."""


class ScheduleError(TokpruneError):
    """A schedule file is invalid or does not match the model / resolution / steps it is used with."""


class ManifestError(TokpruneError):
    """An engine directory's manifest is invalid, mismatched, or its files are missing/corrupted."""


class BackendUnavailableError(TokpruneError):
    """A backend (TensorRT, CUDA) is not installed or no suitable device is present."""
