"""tokprune.calibrate: per-step keep schedules under a MAC budget, frozen into static-shape buckets.

- :func:`calibrate` (``pipe, budget, steps, ...) -> Schedule``): profile, optimise, freeze.
- :class:`Schedule` / :class:`Bucket`: the frozen result; ``save`` / ``Schedule.load`` / ``to_plan``.
- :mod:`~tokprune.calibrate.profile`: per-step error measurements; :mod:`~tokprune.calibrate.optimize`:
  budget -> allocation -> buckets, and the CAT reference schedule.

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
        from tokprune.calibrate.optimize import cat_schedule

        return cat_schedule
    raise AttributeError(f"module 'tokprune.calibrate' has no attribute {name!r}")
