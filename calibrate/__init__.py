"""tokprune.calibrate: per-step keep schedules under a MAC budget, frozen into static-shape buckets.

- :func:`calibrate` (``pipe, budget, steps, ...) -> Schedule``): measured whole-run search, held-out
  validation, frozen into buckets.
- :class:`Schedule` / :class:`Bucket`: the frozen result; ``save`` / ``Schedule.load`` / ``to_plan``.
- :mod:`~tokprune.calibrate.rollout`: whole sampling runs of a plan vs dense (shared prefixes);
  :mod:`~tokprune.calibrate.search`: schedule structures solved to the budget, seeds and measured moves;
  :mod:`~tokprune.calibrate.baselines`: CAT, RAS-style and dense/reuse schedules at a budget;
  :mod:`~tokprune.calibrate.checkpoint`: measurements on disk so calibration resumes.

Example::

    from tokprune.calibrate import Schedule, calibrate
    from tokprune.models import load_pipeline
    sched = calibrate(load_pipeline("sd3-tiny"), budget=0.5, steps=28, model="sd3-tiny")
    sched.save("schedule.json")
    Schedule.load("schedule.json", expect_steps=28).to_plan()
"""

from __future__ import annotations

from typing import Any

from tokprune.calibrate.schedule import REUSE, SCHEMA_VERSION, Bucket, Schedule

__all__ = ["REUSE", "SCHEMA_VERSION", "Bucket", "Schedule", "calibrate", "cat_schedule"]


def __getattr__(name: str) -> Any:  # lazy: keep `import tokprune.calibrate` light
    if name == "calibrate":
        from tokprune.calibrate.api import calibrate

        return calibrate
    if name == "cat_schedule":
        from tokprune.calibrate.baselines import cat_schedule

        return cat_schedule
    raise AttributeError(f"module 'tokprune.calibrate' has no attribute {name!r}")
