"""``tokprune-quality``: bad input, a tiny end-to-end run, resuming, and findings computed from records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokprune.yardstick import quality, report
from tokprune.yardstick.store import RunStore

TINY = ["--model", "sd3-tiny", "--steps", "4", "--max-sequence-length", "16", "--calib-prompts", "2", "--quiet"]


def test_bad_cli_values_exit_2(capsys, tmp_path):
    assert quality.main(["--budgets", "0.5,1.5", "--out", str(tmp_path)]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert quality.main(["--methods", "calibrated,tome", "--out", str(tmp_path)]) == 2
    assert "tome" in capsys.readouterr().err
    assert quality.main(["--caches", "teacache:threshold=0.1", "--out", str(tmp_path)]) == 2
    assert "teacache" in capsys.readouterr().err
    assert quality.main(["--caches", "fbc:threshold", "--out", str(tmp_path)]) == 2
    assert "key=value" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_end_to_end_resumes_and_extends(tmp_path, capsys):
    out = tmp_path / "q"
    args = [*TINY, "--budgets", "0.5", "--methods", "cat,interleaved", "--caches", "fbc:threshold=5",
            "--chunk", "2", "--noise-n", "1", "--out", str(out)]
    assert quality.main([*args, "--n", "2"]) == 0
    doc = json.loads((out / "quality.json").read_text())
    md = (out / "quality.md").read_text()
    assert (out / "quality.png").stat().st_size > 10_000
    assert "tokprune-quality --model sd3-tiny" in md and "## Findings" in md and "| cat@0.5 |" in md
    rows = {r["row"]: r for r in doc["aggregate"]["rows"]}
    assert set(rows) == {"cat@0.5", "interleaved@0.5", "fbc(threshold=5)", "dense-rerun"}
    for name in ("cat@0.5", "interleaved@0.5"):
        r = rows[name]
        assert r["n"] == 2 and abs(r["mac_fraction"] - 0.5) <= 0.05  # 4 steps: few reachable fractions
        assert r["psnr"]["lo"] <= r["psnr"]["mean"] <= r["psnr"]["hi"] < 100
    assert rows["fbc(threshold=5)"]["mac_fraction"] < 1.0  # it skipped blocks, counted
    assert rows["dense-rerun"]["psnr"]["mean"] > 60  # another batch split: (nearly) identical
    assert doc["versions"]["diffusers"] and doc["wall_time_s"] > 0 and "--n 2" in doc["command"]
    records = (out / ".work" / "records.jsonl").read_text().splitlines()
    # Interrupted write: a truncated last line is ignored, and a rerun measures nothing again.
    (out / ".work" / "records.jsonl").write_text("\n".join(records) + '\n{"kind": "chunk", "row": "cat@0.5", "st')
    assert quality.main([*args, "--n", "2"]) == 0
    again = RunStore(out / ".work", json.loads(records[0])["settings"]).records()  # the truncated line skipped
    assert sum(r["kind"] == "chunk" for r in again) == sum(json.loads(x)["kind"] == "chunk" for x in records)
    # A larger --n only runs the new chunk.
    assert quality.main([*args, "--n", "3"]) == 0
    final = RunStore(out / ".work", json.loads(records[0])["settings"]).records()
    starts = sorted((r["row"], r["start"]) for r in final if r["kind"] == "chunk" and r["row"] != "dense-rerun")
    assert starts == sorted((row, s) for row in ("cat@0.5", "interleaved@0.5", "fbc(threshold=5)") for s in (0, 2))
    assert json.loads((out / "quality.json").read_text())["aggregate"]["rows"][0]["n"] == 3
    # Other settings in the same folder are refused, with the flag that fixes it.
    assert quality.main([*args, "--n", "2", "--seed", "7"]) == 2
    assert "--fresh" in capsys.readouterr().err


def _chunk(row: str, method: str, budget, psnr, iou, start=0, **extra):
    n = len(psnr)
    return {"kind": "chunk", "row": row, "method": method, "budget": budget, "start": start, "stop": start + n,
            "psnr": list(psnr), "iou": list(iou), "ssim": [0.99] * n, "acc": [1.0] * n, "latent_err": [0.01] * n,
            "seconds": 1.0, **extra}


def test_findings_are_computed_from_the_records():
    rng = np.random.default_rng(0)
    n = 16
    cal_p, cat_p = 40 + rng.normal(0, 0.5, n), 36 + rng.normal(0, 0.5, n)
    recs = [
        {"kind": "plan", "row": "calibrated@0.3", "plan": {"image_keep": [-1] * 6 + [256] * 20 + [0] * 2,
                                                            "text_keep": None}, "policy": "cat", "info": {}},
        {"kind": "macs", "row": "calibrated@0.3", "fraction": 0.305, "analytic": 0.30},
        {"kind": "macs", "row": "cat@0.3", "fraction": 0.32, "analytic": 0.30},
        _chunk("calibrated@0.3", "calibrated", 0.3, cal_p, [0.98] * n),
        _chunk("cat@0.3", "cat", 0.3, cat_p, [0.80] * n),
        _chunk("interleaved@0.3", "interleaved", 0.3, cal_p + 1.0, [0.99] * n),
        _chunk("dense-rerun", "dense-rerun", None, [100.0] * 4, [0.998] * 4),
        _chunk("fbc(threshold=0.1)", "fbc", None, cal_p - 3, [0.9] * n, mac_fraction=[0.41] * n),
    ]
    recs[-1]["budget"] = None
    recs.append({"kind": "unreachable", "row": "ras@0.3", "method": "ras", "budget": 0.3, "reason": "floor 0.36"})
    agg = report.aggregate(recs, n)
    by = {r["row"]: r for r in agg["rows"]}
    assert by["cat@0.3"]["calibrated_minus_this"]["psnr"]["lo"] > 3.0  # paired difference ~ +4 dB
    assert by["interleaved@0.3"]["calibrated_minus_this"]["psnr"]["mean"] == pytest.approx(-1.0)
    text = "\n".join(report.findings(agg))
    assert "Budget 0.3: calibrated PSNR: LOSES to interleaved@0.3" in text
    assert "object IoU: LOSES to interleaved@0.3" in text
    assert "Target PSNR >= 32 dB at 0.3: calibrated" in text and "met" in text
    assert "cat@0.3 (0.320)" in text  # off the budget by more than 0.01, counted
    # CAT at 0.3 vs dense, in units of the re-run noise (IoU 0.998 -> noise 0.002): gap 0.2 = 100x.
    sep = next(f for f in report.findings(agg) if f.startswith("Separation, cat@0.3"))
    assert "is 0.2 from dense = 100x the re-run noise 0.002" in sep and "outside the noise band" in sep
    assert "fbc(threshold=0.1): counted MAC fraction 0.410" in text
    assert by["fbc(threshold=0.1)"]["mac_fraction"] == pytest.approx(0.41)
    assert "ras@0.3: no plan at this budget: floor 0.36" in text
    md_table = report.table(agg)
    assert "| cat@0.3 | 0.320 |" in md_table
