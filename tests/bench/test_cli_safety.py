"""Issue 11 for tokprune-bench: bad input refused before work in flag words, nothing half-written; acceptance exit codes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tokprune.bench.cli import main as bench_main

from tests.export.test_safety import one_line_error


# ---- tokprune-bench -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, needle", [
    (["--prompts", "BINARY"], "--prompts"),
    (["--prompts", "MISSING"], "--prompts"),
    (["--runs", "0"], "--runs 0"),
    (["--warmup", "-1"], "--warmup -1"),
    (["--json", "DIR"], "--json"),
    (["--plot", "NOEXT"], "--plot"),
    (["--markdown", "DIR"], "--markdown"),
    (["--threads", "0"], "--threads 0"),
    (["--threads", "1,x"], "--threads 1,x"),
    (["--threads", "1,2", "--plot", "PNG"], "one plot per run"),
])
def test_bench_refuses_bad_input_before_the_model_loads(flags, needle, pruned_export, tmp_path, capsys, monkeypatch):
    import tokprune.bench.grid as bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("the benchmark ran"))
    (tmp_path / "bin").write_bytes(b"\x00\x9f\x92\x96")
    files = {"BINARY": str(tmp_path / "bin"), "MISSING": str(tmp_path / "none"), "DIR": str(tmp_path),
             "NOEXT": str(tmp_path / "plot"), "PNG": str(tmp_path / "plot.png")}
    assert bench_main(["--engines", str(pruned_export), "--quiet", *[files.get(f, f) for f in flags]]) == 2
    one_line_error(capsys.readouterr().err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


def _fake_bench(monkeypatch, ok: bool) -> None:
    import tokprune.bench.grid as bench
    import tokprune.bench.report as report

    acceptance = {"ort_pruned_speedup_min": 1.8, "bucket_mac_tolerance_pct": 15.0, "ort_pruned_speedup": 2.0 if ok else 1.1,
                  "ort_pruned_speedup_ok": ok, "buckets_within_tolerance": True}
    result = SimpleNamespace(acceptance=acceptance, to_json=lambda: {"acceptance": acceptance})
    monkeypatch.setattr(bench, "run_bench", lambda cfg, command=None: result)
    monkeypatch.setattr(report, "markdown", lambda r: "| table |")


@pytest.mark.parametrize("require, ok, code", [(True, False, 1), (True, True, 0), (False, False, 0)])
def test_bench_failed_acceptance_exits_1_when_required(require, ok, code, pruned_export, tmp_path, capsys, monkeypatch):
    _fake_bench(monkeypatch, ok)
    flags = ["--require-acceptance"] if require else []
    assert bench_main(["--engines", str(pruned_export), "--json", str(tmp_path / "b.json"), *flags]) == code
    captured = capsys.readouterr()
    assert captured.out.strip().endswith("| table |") and (tmp_path / "b.json").is_file()
    if code == 1:
        one_line_error(captured.err, "acceptance failed (--require-acceptance)", "1.10x < 1.8x")
    elif not ok:
        assert "--require-acceptance makes it exit 1" in captured.err
