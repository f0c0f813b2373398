"""The GPU scenario's PixArt-Σ-XL model: its dry run (tiny PixArt, CPU) runs every row's code path, the time budget
skips what is left and still writes the files, and the XL run's geometry and schedule are the architecture's."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tokprune.bench.scenarios import gpu_ready
from tokprune.bench.scenarios.gpu_ready import main, run_scenario
from tokprune.bench.scenarios.gpu_ready_models import EventTimed, PixArtLoop, make_loop, scenario_for

ROWS = ["eager dense (diffusers)", "pruned eager, CAT b=0.5", "pruned compiled, CAT b=0.5", "compiled dense"]


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with dynamo's ``eager`` backend: the compiled rows are traced as on a GPU, without C++ codegen
    (inductor on this 2-core CPU takes minutes); records what was compiled."""
    compiled = []
    real = torch.compile

    def fake(model, **kw):
        compiled.append(type(model).__name__)
        return real(model, **{**kw, "backend": "eager"})
    monkeypatch.setattr(torch, "compile", fake)
    yield compiled
    torch._dynamo.reset()


def test_dry_run_measures_every_row(tmp_path, eager_compile):
    from tokprune.calibrate.baselines import cat_schedule, derive_align
    from tokprune.pruning.macs import dense_macs, mac_fraction, step_macs

    result = run_scenario(scenario_for("pixart-sigma-xl", dry_run=True, skip=frozenset()), tmp_path)
    assert [r["mode"] for r in result["rows"]] == ROWS and all(r["loop_ms"] > 0 for r in result["rows"])
    assert eager_compile == ["BucketModule", "BucketModule", "PixArtTransformer2DModel"]  # each bucket, then dense
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_ready.json", "gpu_ready.log", "gpu_ready.md"]
    assert json.loads((tmp_path / "gpu_ready.json").read_text())["rows"] == result["rows"]
    assert "| pruned compiled, CAT b=0.5 | 0.513 |" in (tmp_path / "gpu_ready.md").read_text()
    assert "pruned compiled, CAT b=0.5:" in (tmp_path / "gpu_ready.log").read_text()
    # every check ran and passed (fp32: the pruned path is the diffusers forward)
    checks = result["checks"]
    assert set(checks) == {"keep_all_vs_diffusers_rel_error", "bucket_k0080-t0020_same_input_vs_dense_rel_error",
                           "compiled_dense_vs_eager_dense_rel_error", "compiled_keep_all_vs_diffusers_rel_error"}
    assert max(checks.values()) <= 1e-4
    # schedule and MACs are calibrate's CAT baseline and the PixArt family's count
    g = make_loop(scenario_for("pixart-sigma-xl", dry_run=True)).g
    plan = cat_schedule(g, 28, 0.5, align=derive_align(g.num_tokens))
    assert result["geometry"]["family"] == "pixart-sigma" and result["geometry"]["N"] == 256
    assert result["rows"][1]["mac_fraction"] == pytest.approx(mac_fraction(g, plan), abs=1e-4)
    buckets = {(b["mode"], b["bucket"]): b for b in result["buckets"]}
    assert buckets["pruned compiled, CAT b=0.5", "k0080-t0020"]["mac_ratio"] == pytest.approx(
        step_macs(g, 80) / dense_macs(g), abs=1e-4)
    assert result["errors"]["fbc"] == result["errors"]["ort"] == "not measured: not built for pixart-tiny"
    assert result["errors"]["pruned CUDA graphs, CAT b=0.5"] == "not measured: no CUDA device"


def test_a_wrong_bucket_fails_its_check(tmp_path, monkeypatch):
    """The same-input check sees a pruned bucket that ignores its caches (it would time a wrong forward)."""
    from tokprune.export.runners import TorchRunner

    real = TorchRunner.infer_impl

    def no_caches(self, feed):
        return real(self, {n: x * 0 if n.startswith("cache.") else x for n, x in feed.items()})
    monkeypatch.setattr(TorchRunner, "infer_impl", no_caches)
    result = run_scenario(scenario_for("pixart-sigma-xl", dry_run=True, skip=frozenset({"compiled"})), tmp_path)
    assert result["checks"]["keep_all_vs_diffusers_rel_error"] <= 1e-4  # dense buckets read no caches
    assert result["errors"]["correctness"].startswith("RuntimeError: bucket_k0080-t0020_same_input_vs_dense_rel_error")


def test_time_budget_skips_the_rest_and_writes_the_files(tmp_path, monkeypatch, eager_compile):
    clock = {"t": 0.0}
    monkeypatch.setattr(gpu_ready.time, "monotonic", lambda: clock["t"])
    real = EventTimed.timed

    def slow(self, fn):  # every timed loop "takes" 100 s
        clock["t"] += 100.0
        return real(self, fn)
    monkeypatch.setattr(EventTimed, "timed", slow)
    result = run_scenario(scenario_for("pixart-sigma-xl", dry_run=True, skip=frozenset()), tmp_path, time_budget=150)
    assert [r["mode"] for r in result["rows"]] == ROWS[:2]  # pruned eager starts at 100 s, pruned compiled at 400 s
    for mode in ROWS[2:]:
        assert result["errors"][mode] == "not measured: --time-budget 150 s spent (400 s elapsed)"
    assert eager_compile == ["PixArtTransformer2DModel"]  # wrapped lazily, never run
    assert json.loads((tmp_path / "gpu_ready.json").read_text())["errors"] == result["errors"]
    assert "pruned compiled, CAT b=0.5: skipped" in (tmp_path / "gpu_ready.log").read_text()


def test_the_command_prints_the_tables_last_and_refuses_bad_flags(tmp_path, capsys):
    assert main(["--dry-run", "--model", "pixart-sigma-xl", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("| pruned eager, CAT b=0.5 |") and "pixart-tiny, N=256, T=20, batch 2, 28 steps" in out[0]
    assert main(["--dry-run", "--model", "flux", "--out", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["--dry-run", "--model", "pixart-sigma-xl", "--out", str(tmp_path), "--time-budget", "0"]) == 2
    assert "--time-budget 0" in capsys.readouterr().err


def test_the_gpu_run_is_the_xl_architecture():
    """What the H100 run builds: PixArt-Σ-XL-2-1024-MS at 1024² (N = 4096), T5's 300 tokens, CFG, 28 steps, bf16;
    CAT b=0.5 is 8 dense steps then K = 1216 (MAC fraction 0.498)."""
    from tokprune.families.pixart.models import PIXART_SIGMA_XL_CONFIG
    from tokprune.pruning.family import get_family

    sc = scenario_for("pixart-sigma-xl")
    assert (sc.arch, sc.steps, sc.batch, sc.dtype, sc.device, sc.warmup) == ("pixart-sigma-xl", 28, 2, "bf16", "cuda", 1)
    g = get_family("pixart-sigma").geometry(PIXART_SIGMA_XL_CONFIG, batch=2, latent_hw=(128, 128), text_tokens=300)
    assert (g.num_tokens, g.text_tokens, g.num_layers, g.heads, g.head_dim, g.caption_channels) == (4096, 300, 28, 16, 72, 4096)
    assert g.learned_sigma and g.text_kv_inputs
    (s,) = gpu_ready._schedules(SimpleNamespace(g=g, sc=sc))
    assert s["keeps"] == [4096, 1216] and s["fraction"] == pytest.approx(0.4978, abs=1e-4)
    assert make_loop.__doc__ and PixArtLoop.__mro__[1] is EventTimed


def test_sd3_dry_run_is_unchanged_by_the_model_flag(tmp_path, capsys):
    assert main(["--dry-run", "--model", "sd3-medium", "--out", str(tmp_path), "--skip", "fbc,ort", "--quiet"]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("| pruned eager, CAT b=0.5 |")
    data = json.loads((tmp_path / "gpu_ready.json").read_text())
    assert data["scenario"]["arch"] == "tiny" and data["geometry"]["family"] == "sd3"
    assert data["checks"]["keep_all_vs_diffusers_rel_error"] <= 1e-3



def test_cuda_timing_is_event_time_and_memory_above_the_weights(monkeypatch):
    """The GPU branch of ``timed`` (run here with stand-ins for torch.cuda): median of the repeats' event times
    after the warm-up, peak of one more loop minus the weights."""
    loop = make_loop(scenario_for("pixart-sigma-xl", dry_run=True, repeats=3, warmup=2))
    loop.device = torch.device("cuda")
    clock, calls, peak = {"ms": 0.0}, [], {"now": 0}
    durations = iter([5.0, 5.0, 30.0, 10.0, 20.0, 7.0])  # 2 warm-up, 3 timed, 1 memory loop

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            self.t = None

        def record(self) -> None:
            self.t = clock["ms"]

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, other: "Event") -> float:
            return other.t - self.t

    def fn():
        clock["ms"] += next(durations)
        calls.append(clock["ms"])
        peak["now"] = 3 * 2**30 if len(calls) == 6 else 10 * 2**30  # only the memory loop after the reset counts
    weights = sum(t.numel() * t.element_size() for t in (*loop.model.parameters(), *loop.model.buffers()))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peak.update(now=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["now"])
    secs, mem = loop.timed(fn)
    assert len(calls) == 6 and secs == pytest.approx(0.020) and mem == 3 * 2**30 - weights


@pytest.mark.parametrize("export_attention", [False, True])
def test_bucket_attention_is_torch_sdpa_unless_asked(tmp_path, monkeypatch, export_attention):
    """bf16 bucket runners time torch's SDPA, as diffusers' dense baseline, by default; ``--export-attention`` the
    export's fp32-softmax attention (which materialises every score matrix)."""
    import tokprune.export.onnx_export as onnx_export

    calls = []
    real = onnx_export._sdpa_fp32_softmax
    monkeypatch.setattr(onnx_export, "_sdpa_fp32_softmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    sc = scenario_for("pixart-sigma-xl", dry_run=True, dtype="bf16", tolerance=5e-2, skip=frozenset({"compiled"}))
    result = run_scenario(sc, tmp_path, export_attention=export_attention)
    assert result["checks"]["keep_all_vs_diffusers_rel_error"] <= 5e-2 and result["rows"][1]["loop_ms"] > 0
    assert bool(calls) is export_attention
    assert result["bucket_attention"] == ("export fp32-softmax" if export_attention else "torch sdpa")
