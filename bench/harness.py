"""The one timing harness every benchmark uses: sync, warm-up, repeats, timers, memory, isolation.

- :func:`device_sync`: the synchronisation a timing needs on a device (CUDA: ``torch.cuda.synchronize``;
  CPU: nothing), taken before a clock starts and before it stops;
- :func:`time_repeats`: ``warmup`` unmeasured calls, then ``repeats`` measured ones (seconds);
- :class:`Summary`: median, quartiles, min/max and spread of measured seconds;
- :class:`StepTimer`: per-call seconds of a module (``forward`` pre/post hooks), the loop's first and last mark;
- :class:`CallTimer`: the runtime executor's ``timer`` hook (``begin(key)`` / ``end()`` around each engine call);
- :class:`PeakMemory`: peak memory of one run (CUDA allocator peak, or Linux ``VmHWM`` above the start);
- :func:`run_isolated`: one measurement in a fresh Python process with its own thread count
  (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` are read once, at import: a process cannot change them later),
  returning the JSON object the child prints last;

Example::

    import torch
    from tokprune.bench.harness import Summary, device_sync, time_repeats
    x = torch.randn(256, 256)
    secs = time_repeats(lambda: x @ x, sync=device_sync(x.device), warmup=1, repeats=5)
    print(Summary.of(secs).median)
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tokprune.errors import ConfigError, TokpruneError

logger = logging.getLogger(__name__)

__all__ = [
    "CallTimer", "PeakMemory", "StepTimer", "Summary", "device_sync", "median", "quantile", "run_isolated",
    "time_repeats",
]


def device_sync(device: torch.device | str) -> Callable[[], None]:
    """The call that waits for ``device``'s queued work (a no-op on CPU, where ops are synchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_repeats(fn: Callable[[], Any], *, sync: Callable[[], None], warmup: int = 1, repeats: int = 3) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` unmeasured ones, each bracketed by ``sync``."""
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats {repeats} / warmup {warmup}; expected repeats >= 1 and warmup >= 0 (--repeats/--warmup)")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float | None:
    """Median of ``xs``; None when empty."""
    return float(statistics.median(xs)) if xs else None


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1] of a non-empty sequence."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


@dataclass(frozen=True)
class Summary:
    """Measured seconds summarised: median, quartiles, extremes and the IQR as a percent of the median."""

    n: int
    median_s: float
    p25_s: float
    p75_s: float
    min_s: float
    max_s: float
    spread_pct: float

    @classmethod
    def of(cls, xs: Sequence[float]) -> Summary:
        if not xs:
            raise ConfigError("no measured runs to summarise; expected at least one (--runs >= 1)")
        med = float(statistics.median(xs))
        p25, p75 = quantile(xs, 0.25), quantile(xs, 0.75)
        return cls(len(xs), med, p25, p75, float(min(xs)), float(max(xs)), 100.0 * (p75 - p25) / med if med else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepTimer:
    """Seconds of every call of ``module`` (forward pre/post hooks, synchronised), as a context manager.

    ``steps`` holds one entry per call; ``first`` is when the first call started (the loop's start).
    """

    def __init__(self, module: torch.nn.Module, sync: Callable[[], None]) -> None:
        self.module, self.sync = module, sync
        self.steps: list[float] = []
        self.first: float | None = None
        self._t0 = 0.0
        self._handles: list[Any] = []

    def _pre(self, *_: Any) -> None:
        self.sync()
        self._t0 = time.perf_counter()
        if self.first is None:
            self.first = self._t0

    def _post(self, *_: Any) -> None:
        self.sync()
        self.steps.append(time.perf_counter() - self._t0)

    def __enter__(self) -> StepTimer:
        self._handles = [self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.module.register_forward_hook(self._post, with_kwargs=True)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class CallTimer:
    """``EngineExecutor.timer``: wall time of each engine call by bucket key (synchronised)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.calls: list[tuple[str, float]] = []
        self._key = ""
        self._t0 = 0.0

    def begin(self, key: str) -> None:
        self.sync()
        self._key, self._t0 = key, time.perf_counter()

    def end(self) -> None:
        self.sync()
        self.calls.append((self._key, time.perf_counter() - self._t0))


class PeakMemory:
    """Peak memory of one run in bytes: the CUDA allocator's peak, or Linux VmHWM after resetting it (0 elsewhere)."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._base = 0
        self._can_reset = True

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self._can_reset = False
        self._base = self.status("VmRSS")

    def stop(self) -> int:
        if self.cuda:
            return max(0, torch.cuda.max_memory_allocated() - self._base)
        if not self._can_reset:
            return 0
        return max(0, self.status("VmHWM") - self._base)

    @staticmethod
    def status(field_name: str) -> int:
        """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes; 0 where there is none."""
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(field_name + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0


def run_isolated(module: str, args: Sequence[str], *, threads: int | None = None, timeout: float | None = None) -> Any:
    """``python -m module *args`` in a fresh process with ``threads`` intra-op threads; its last stdout line as JSON.

    Use it wherever a thread count or a process's resident memory is part of what is measured:
    both are fixed per process.
    """
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", module, *map(str, args)]
    logger.info("isolated run: %s (threads %s)", " ".join(cmd), threads)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise TokpruneError(f"isolated run {' '.join(cmd)} exited {done.returncode}: {tail}; run it by hand to see why")
    return json.loads(lines[-1])
