"""tokprune.bench: benchmarks of pruned vs dense runs, written once.

- :mod:`~tokprune.bench.scenario`: what to run, as dataclasses (:class:`GridScenario` for an export,
  :class:`LoopScenario` for a bare transformer in a denoising loop);
- :mod:`~tokprune.bench.harness`: the one harness (sync, warm-up, repeats, step/call timers, peak memory,
  process isolation for thread counts; the environment record is :mod:`tokprune.environment`);
- :mod:`~tokprune.bench.metrics`: fidelity vs the reference run (PSNR / SSIM from :mod:`tokprune.fidelity`);
- :mod:`~tokprune.bench.grid` / :mod:`~tokprune.bench.arms`: ``tokprune-bench``'s backend x dense/pruned grid;
- :mod:`~tokprune.bench.report`: markdown tables and plots; :mod:`~tokprune.bench.cli`: ``tokprune-bench``;
- :mod:`~tokprune.bench.loop`: loop scenarios' model, inputs and loops (diffusers' forward, the runtime's step loop);
- :mod:`~tokprune.bench.models`: random-weight benchmark models; :mod:`~tokprune.bench.scenarios`: scenario
  programs (the GPU benchmark, the CPU layout measurement).

Schedules come from :mod:`tokprune.calibrate` and MACs from :mod:`tokprune.pruning.macs`; nothing here
re-derives them.

Example::

    from tokprune.bench import GridScenario, run_bench
    result = run_bench(GridScenario(engines="engines/sd3-tiny-64x64-s8-b0.5", backends=("eager", "onnxruntime")))
"""

from __future__ import annotations

from typing import Any

__all__ = ["GridScenario", "LoopScenario", "run_bench"]


def __getattr__(name: str) -> Any:  # lazy: `import tokprune.bench` stays light
    if name in ("GridScenario", "LoopScenario"):
        from tokprune.bench import scenario

        return getattr(scenario, name)
    if name == "run_bench":
        from tokprune.bench.grid import run_bench

        return run_bench
    raise AttributeError(f"module 'tokprune.bench' has no attribute {name!r}")
