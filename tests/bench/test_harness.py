"""The bench harness: repeats and warm-ups, summaries, step timers, isolated runs; scenario checks."""

from __future__ import annotations

import pytest
import torch

from tokprune.bench.harness import (
    CallTimer,
    PeakMemory,
    StepTimer,
    Summary,
    device_sync,
    quantile,
    run_isolated,
    time_repeats,
)
from tokprune.bench.scenario import GridScenario, LoopScenario
from tokprune.errors import ConfigError, TokpruneError


def test_time_repeats_runs_warmup_then_measures_each_repeat():
    calls = []
    secs = time_repeats(lambda: calls.append(1), sync=device_sync("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and len(secs) == 3 and all(s >= 0 for s in secs)
    with pytest.raises(ConfigError, match="--repeats"):
        time_repeats(lambda: None, sync=lambda: None, repeats=0)


def test_sync_is_called_around_every_measured_call():
    marks = []
    time_repeats(lambda: marks.append("call"), sync=lambda: marks.append("sync"), warmup=1, repeats=2)
    assert marks == ["call", "sync", "call", "sync", "sync", "call", "sync"]


def test_summary_statistics():
    s = Summary.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s.n, s.median_s, s.p25_s, s.p75_s, s.min_s, s.max_s) == (5, 3.0, 2.0, 4.0, 1.0, 5.0)
    assert s.spread_pct == pytest.approx(100 * 2.0 / 3.0)
    assert quantile([0.0, 10.0], 0.3) == pytest.approx(3.0)
    with pytest.raises(ConfigError, match="--runs"):
        Summary.of([])


def test_step_timer_times_every_call_and_removes_its_hooks():
    lin = torch.nn.Linear(4, 4)
    with StepTimer(lin, lambda: None) as t:
        for _ in range(3):
            lin(torch.randn(2, 4))
    assert len(t.steps) == 3 and t.first is not None
    lin(torch.randn(2, 4))
    assert len(t.steps) == 3 and not lin._forward_hooks and not lin._forward_pre_hooks


def test_call_timer_keys_and_peak_memory_sees_an_allocation():
    timer = CallTimer(lambda: None)
    timer.begin("k0064")
    timer.end()
    assert [k for k, _ in timer.calls] == ["k0064"]
    mem = PeakMemory("cpu")
    mem.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = mem.stop()
    del block
    if PeakMemory.status("VmHWM") == 0:
        pytest.skip("no /proc/self/status on this platform: peak memory reads 0 by design")
    assert peak >= 32 * 2**20


def test_run_isolated_gets_its_own_thread_count():
    out = run_isolated("tests.bench.isolated_child", [], threads=2, timeout=120)  # this process runs with 1
    assert out == {"omp": "2", "threads": 2}
    with pytest.raises(TokpruneError, match="exited"):
        run_isolated("tests.bench.no_such_module", [], timeout=60)


@pytest.mark.parametrize("kwargs, needle", [
    ({"backends": ("eager", "bogus")}, "--backends bogus"),
    ({"runs": 0}, "--runs 0"),
    ({"prompts": (" ",)}, "no prompts"),
    ({"threads": 0}, "--threads 0"),
])
def test_grid_scenario_refuses_bad_settings(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        GridScenario(engines="x", **kwargs)


@pytest.mark.parametrize("kwargs, needle", [
    ({"skip": {"nope"}}, "--skip nope"),
    ({"budgets": (1.5,)}, "--budgets 1.5"),
    ({"dtype": "int8"}, "--dtype int8"),
    ({"steps": 1}, "--steps 1"),
])
def test_loop_scenario_refuses_bad_settings(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        LoopScenario(**kwargs)
