"""The GPU scenario imports and dry-runs on a CPU (tiny model): every mode that can run here runs, and says why not otherwise."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from tokprune.bench.scenario import LoopScenario
from tokprune.bench.scenarios.gpu_ready import main, run_scenario

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_measures_every_cpu_mode(tmp_path):
    from tokprune.calibrate.baselines import cat_schedule, derive_align
    from tokprune.pruning.macs import mac_fraction

    result = run_scenario(LoopScenario.tiny(skip={"compiled", "ort"}), tmp_path)
    assert json.loads((tmp_path / "gpu_ready.json").read_text())["rows"] == result["rows"]
    rows = {r["mode"].split(" (")[0]: r for r in result["rows"]}
    assert rows["eager dense"]["speedup"] == 1.0 and rows["eager dense"]["loop_ms"] > 0
    pruned = rows["pruned eager, CAT b=0.5"]
    assert pruned["loop_ms"] > 0 and "diffusers first-block cache" in rows
    # the schedule is calibrate's CAT baseline and its fraction pruning.macs' count, not re-derived here
    from tokprune.bench.loop import Loop

    g = Loop(LoopScenario.tiny()).g
    plan = cat_schedule(g, 10, 0.5, align=derive_align(g.num_tokens))
    assert pruned["mac_fraction"] == pytest.approx(mac_fraction(g, plan), abs=1e-4)
    assert result["schedules"][0]["buckets_k"] == sorted({plan.image_k(s, g.num_tokens) for s in range(10)}, reverse=True)
    assert result["checks"]["keep_all_vs_diffusers_rel_error"] <= 1e-3  # keep-all pruned == diffusers dense
    buckets = [b for b in result["buckets"] if b["mode"].startswith("pruned eager")]
    assert [b["mac_ratio"] for b in buckets][0] == 1.0 and 0 < buckets[1]["mac_ratio"] < 1
    assert result["errors"]["pruned CUDA graphs, CAT b=0.5"] == "not measured: no CUDA device"
    assert result["errors"]["pruned compiled, CAT b=0.5"] == "not measured: --skip"


def test_dry_run_command_prints_the_tables_last(tmp_path, capsys):
    assert main(["--dry-run", "--out", str(tmp_path), "--skip", "fbc", "--quiet"]) == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("| onnxruntime pruned, CAT b=0.5 |") and "| eager dense (diffusers) | 1.000 |" in "\n".join(out)
    data = json.loads((tmp_path / "gpu_ready.json").read_text())
    assert data["memory"]["buckets"] == 2 and {b["mode"] for b in data["buckets"]} >= {"onnxruntime"}


def test_bad_flags_exit_2(tmp_path, capsys):
    assert main(["--dry-run", "--out", str(tmp_path), "--skip", "warp"]) == 2
    assert "--skip warp" in capsys.readouterr().err


def test_the_results_command_runs_the_scenario(tmp_path, monkeypatch, capsys):
    """``python3 results/gpu/scenario_gpu_ready.py`` (the README's command) is the package's scenario."""
    import tokprune.bench.scenarios.gpu_ready as scenario

    monkeypatch.setattr(scenario, "run_scenario", lambda sc, out, command="": pytest.fail(f"ran {sc.arch}"))
    monkeypatch.setattr(sys, "argv", ["scenario_gpu_ready.py", "--dry-run", "--out", str(tmp_path), "--skip", "nope"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "results" / "gpu" / "scenario_gpu_ready.py"), run_name="__main__")
    assert done.value.code == 2 and "--skip nope" in capsys.readouterr().err


def test_the_results_command_runs_from_an_uninstalled_checkout(tmp_path):
    """A GPU host gets the working tree, not an install: the launcher maps the top-level folders itself."""
    import subprocess

    code = (
        "import sys, runpy\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', type(f).__name__)]\n"
        "try:\n    import tokprune\n    raise SystemExit('tokprune is still importable: the test proves nothing')\n"
        "except ImportError:\n    pass\n"
        f"sys.argv = ['x', '--dry-run', '--out', {str(tmp_path)!r}, '--skip', 'fbc,ort', '--quiet']\n"
        f"runpy.run_path({str(ROOT / 'results' / 'gpu' / 'scenario_gpu_ready.py')!r}, run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip().splitlines()[-1].startswith("| pruned eager, CAT b=0.5 |")
    assert json.loads((tmp_path / "gpu_ready.json").read_text())["checks"]["keep_all_vs_diffusers_rel_error"] <= 1e-3


def test_targets_are_unmeasured_without_cuda_graph_rows(tmp_path):
    result = run_scenario(LoopScenario.tiny(skip={"compiled", "ort", "fbc"}), tmp_path)
    assert result["targets"] == {"graphs_speedup_ge_3.5x": None, "graph_buckets_within_10pct": None}
