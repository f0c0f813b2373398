"""What an export is asked for and how its call settings are resolved.

:class:`ExportConfig` is the request (``tokprune-export``'s flags); :func:`call_settings` turns it, the
pipeline and an optional schedule into the one :class:`~tokprune.pruning.family.CallSettings` every
later stage uses; :class:`ExportResult` is what an export reports back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokprune.errors import ConfigError, ScheduleError
from tokprune.export.onnx_export import OPSET
from tokprune.export.spec import EXPORT_BACKENDS, Backend, Precision
from tokprune.pruning.family import family_for

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_STEPS", "ExportConfig", "ExportResult", "call_settings", "load_schedule_file", "max_sequence_length", "policy_for", "settle"]

DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 7.0


@dataclass(frozen=True)
class ExportConfig:
    """What ``tokprune-export`` was asked for. ``None`` means "the default" (or the schedule's value).

    Args that matter: ``model``, ``budget`` (fraction of dense MACs in (0, 1]), ``height`` /
    ``width`` / ``steps`` / ``guidance`` exactly as the runtime will sample, ``precision``.
    Args to tinker with: ``max_buckets`` (3-4 recommended), ``policy``, ``prompts_file``,
    ``num_prompts``, ``schedule_file`` (skip calibration), ``backend``.
    """

    model: str
    budget: float | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    prompts_file: str | None = None
    num_prompts: int | None = 4  # as calibrate(): 4 measured + 2 held-out prompts
    max_buckets: int = 4
    policy: str | None = None  # None: the model family's default (cat; dynamics for U-Nets)
    allow_reuse: bool = True  # False: calibration prunes tokens only, never reuses a whole step
    precision: Precision = Precision.FP32
    backend: Backend = Backend.AUTO
    schedule_file: str | None = None
    max_sequence_length: int | None = None  # None: the model's call default (tokprune.models.call_defaults), else 256
    opset: int = OPSET
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        object.__setattr__(self, "backend", Backend.parse(self.backend, choices=EXPORT_BACKENDS))
        if self.budget is None and self.schedule_file is None:
            raise ConfigError("--budget is required (a fraction of dense MACs in (0, 1], e.g. --budget 0.5) unless --schedule is given")
        if self.budget is not None:
            b = self.budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < float(b) <= 1.0:
                raise ConfigError(f"--budget {b!r} is out of range; expected a fraction of dense MACs in (0, 1], e.g. 0.5")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 2):
            raise ConfigError(f"--steps {self.steps!r}; expected an int >= 2")
        if not isinstance(self.max_buckets, int) or self.max_buckets < 1:
            raise ConfigError(f"--max-buckets {self.max_buckets!r}; expected an int >= 1 (the dense bucket takes one)")
        if self.opset < 18:
            raise ConfigError(f"opset {self.opset}; the dynamo exporter needs >= 18")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ConfigError(f"--{name} {v!r}; expected a positive int (pixels)")


@dataclass
class ExportResult:
    """What an export produced. ``message`` is the user-facing summary of the engine situation."""

    directory: Path
    manifest: dict[str, Any]
    engines_built: bool
    message: str
    exported: list[str] = field(default_factory=list)  # bucket keys traced in this run
    reused: list[str] = field(default_factory=list)  # bucket keys taken from an interrupted run
    up_to_date: bool = False  # the directory already held this export; nothing was done
    seconds: float = 0.0


def load_schedule_file(config: ExportConfig, pipe: Any, fp: str):
    from tokprune.calibrate.schedule import Schedule

    sched = Schedule.load(
        config.schedule_file, expect_fingerprint=fp, expect_height=config.height, expect_width=config.width,
        expect_steps=config.steps,
    )
    problems = []
    if config.guidance is not None and float(config.guidance) != sched.guidance:
        problems.append(f"guidance: schedule has {sched.guidance:g}, --guidance {config.guidance:g}")
    if config.budget is not None and abs(float(config.budget) - sched.budget) > 1e-9:
        problems.append(f"budget: schedule has {sched.budget:g}, --budget {config.budget:g}")
    if problems:
        raise ScheduleError(f"{config.schedule_file} does not match: " + "; ".join(problems) + "; drop the flag or recalibrate")
    return sched


def call_settings(config: ExportConfig, pipe: Any, schedule: Any = None) -> Any:
    """The export's :class:`~tokprune.pruning.family.CallSettings`, resolved once: a schedule's size, steps
    and guidance, else the flags, else the model's call defaults, else the family's defaults."""
    family = family_for(pipe)
    if schedule is not None:
        settings = family.settings(
            pipe, height=schedule.height, width=schedule.width, steps=schedule.steps, guidance=schedule.guidance,
            max_sequence_length=family.max_sequence_length_for(pipe, schedule.text_tokens),
            precision=Precision.parse(config.precision).value,
        )
        if config.max_sequence_length is not None and config.max_sequence_length != settings.max_sequence_length:
            raise ScheduleError(
                f"--max-sequence-length {config.max_sequence_length}: the schedule was calibrated for "
                f"{settings.max_sequence_length} ({schedule.text_tokens} text rows); drop the flag or recalibrate"
            )
        return settings
    return family.settings(
        pipe, height=config.height, width=config.width, steps=config.steps, guidance=config.guidance,
        max_sequence_length=config.max_sequence_length, precision=Precision.parse(config.precision).value,
        default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE,
    )


def settle(config: ExportConfig, pipe: Any, schedule: Any) -> dict[str, Any]:
    """Height, width, steps, guidance, budget (:func:`call_settings`; the budget: the schedule's, else the flag)."""
    s = call_settings(config, pipe, schedule)
    budget = schedule.budget if schedule is not None else float(config.budget)
    return {"height": s.height, "width": s.width, "steps": s.steps, "guidance": s.guidance, "budget": budget}


def policy_for(config: ExportConfig, pipe: Any) -> str:
    """The selection policy calibration uses: ``--policy``, else the model family's default."""
    return config.policy or family_for(pipe).default_policy


def max_sequence_length(config: ExportConfig, pipe: Any, schedule: Any = None) -> int | None:
    return call_settings(config, pipe, schedule).max_sequence_length


