"""``tokprune-quality``'s work order (phases), ``--device``, metric workers, and reports of a cut-off run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokprune.yardstick import quality, report
from tokprune.yardstick.driver import phases
from tokprune.yardstick.rows import PLAN_METHODS

TINY = ["--model", "sd3-tiny", "--steps", "4", "--max-sequence-length", "16", "--calib-prompts", "2", "--quiet"]


def test_phases_put_the_key_rows_first_and_cover_every_row_once():
    ph = phases((0.3, 0.4, 0.5, 0.6, 0.75), PLAN_METHODS, ["fbc:threshold=0.1"])
    assert [p.name for p in ph] == ["dense references, noise row, cat@0.3", "budget 0.5", "budget 0.4",
                                    "budget 0.6", "budget 0.75", "budget 0.3", "diffusers caches"]
    assert ph[0].noise and ph[0].rows == ((0.3, "cat"),) and not any(p.noise for p in ph[1:])
    assert ph[1].rows == tuple((0.5, m) for m in PLAN_METHODS)  # calibrated before random (it reuses its plan)
    assert ph[5].rows == tuple((0.3, m) for m in PLAN_METHODS if m != "cat")
    assert ph[-1].caches and not ph[-1].rows and not any(p.caches for p in ph[:-1])
    pairs = [pair for p in ph for pair in p.rows]
    assert sorted(pairs) == sorted((b, m) for b in (0.3, 0.4, 0.5, 0.6, 0.75) for m in PLAN_METHODS)
    # No 0.3 or no CAT: the first phase is the dense references and the noise row only; other budgets follow.
    ph = phases((0.45, 0.5), ("calibrated",), [])
    assert [(p.name, p.rows) for p in ph] == [("dense references, noise row", ()), ("budget 0.5", ((0.5, "calibrated"),)),
                                              ("budget 0.45", ((0.45, "calibrated"),))]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_a_gpu_exits_2_naming_the_fix(capsys, tmp_path):
    assert quality.main([*TINY, "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--device 'cuda'" in err and "--device cpu" in err
    assert quality.main([*TINY, "--device", "tpu", "--out", str(tmp_path)]) == 2
    assert quality.main([*TINY, "--metric-workers", "-1", "--out", str(tmp_path)]) == 2


def _records(path):
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the cut-off line (kept, ended by the next append)
            assert line.startswith('{"kind": "chunk", "row": "ras@0') and not line.endswith("}")
    return out


@pytest.mark.slow
def test_device_cpu_with_a_metric_worker_runs_in_phase_order_and_a_cut_off_run_reports(tmp_path):
    out = tmp_path / "q"
    args = [*TINY, "--device", "cpu", "--metric-workers", "1", "--steps", "8", "--budgets", "0.3,0.5", "--methods", "cat,ras",
            "--caches", "fbc:threshold=5", "--n", "4", "--chunk", "2", "--noise-n", "1", "--out", str(out)]
    assert quality.main(args) == 0
    recs = _records(out / ".work" / "records.jsonl")
    assert "device" not in recs[0]["settings"]  # cpu: the fingerprint of earlier CPU work folders is unchanged
    doc = json.loads((out / "quality.json").read_text())
    assert doc["versions"]["device"].startswith("cpu")
    chunks = [(r["row"], r["start"]) for r in recs if r["kind"] == "chunk"]
    # Phase order: the noise row and CAT@0.3 on every chunk, then budget 0.5's rows, then the rest of 0.3, then caches.
    assert chunks == [("dense-rerun", 0), ("cat@0.3", 0), ("cat@0.3", 2), ("cat@0.5", 0), ("ras@0.5", 0),
                      ("cat@0.5", 2), ("ras@0.5", 2), ("ras@0.3", 0), ("ras@0.3", 2),
                      ("fbc(threshold=5)", 0), ("fbc(threshold=5)", 2)]
    dense = [r["start"] for r in recs if r["kind"] == "dense"]
    first_plan_05 = next(i for i, r in enumerate(recs) if r.get("row") == "cat@0.5")
    assert dense == [0, 2] and all(i < first_plan_05 for i, r in enumerate(recs) if r["kind"] == "dense")
    full = {r["row"]: r for r in doc["aggregate"]["rows"]}
    assert all(r["n"] == 4 for name, r in full.items() if name != "dense-rerun") and full["dense-rerun"]["n"] == 1
    assert not any(f.startswith("Incomplete run") for f in doc["findings"])

    # Cut off during budget 0.5's second chunk (what `timeout` leaves): the report of the records so far.
    cut = next(i for i, r in enumerate(recs) if r.get("kind") == "chunk" and r["row"] == "ras@0.5" and r["start"] == 2)
    part = tmp_path / "part"
    (part / ".work").mkdir(parents=True)
    lines = (out / ".work" / "records.jsonl").read_text().splitlines()
    (part / ".work" / "records.jsonl").write_text("\n".join(lines[:cut]) + '\n{"kind": "chunk", "row": "ras@0')
    for f in (out / ".work").glob("dense*.npy"):
        (part / ".work" / f.name).write_bytes(f.read_bytes())
    assert quality.main([*args[:-1], str(part), "--report-only"]) == 0
    pdoc = json.loads((part / "quality.json").read_text())
    rows = {r["row"]: r for r in pdoc["aggregate"]["rows"]}
    assert set(rows) == {"dense-rerun", "cat@0.3", "cat@0.5", "ras@0.5"}
    assert rows["cat@0.3"]["n"] == 4 and rows["cat@0.5"]["n"] == 4 and rows["ras@0.5"]["n"] == 2
    assert rows["cat@0.3"] == full["cat@0.3"]  # the finished rows read the same as in the whole run
    assert any(f.startswith("Separation, cat@0.3") for f in pdoc["findings"])
    inc = next(f for f in pdoc["findings"] if f.startswith("Incomplete run"))
    assert "ras@0.5 (n=2)" in inc and "cat@0.5" not in inc
    assert "| ras@0.5 |" in (part / "quality.md").read_text()

    # The same command resumes the cut-off folder: only the missing (row, chunk)s run, nothing twice.
    assert quality.main([*args[:-1], str(part)]) == 0
    again = [(r["row"], r["start"]) for r in _records(part / ".work" / "records.jsonl") if r["kind"] == "chunk"]
    assert sorted(again) == sorted(chunks) and len(again) == len(set(again))
    rdoc = json.loads((part / "quality.json").read_text())
    assert {r["row"]: r["n"] for r in rdoc["aggregate"]["rows"]} == {k: v["n"] for k, v in full.items()}


def test_paired_differences_of_a_cut_off_row_use_the_captions_both_have():
    rng = np.random.default_rng(1)
    cal = 40 + rng.normal(0, 0.5, 16)
    cat = cal[:8] - 4 + rng.normal(0, 0.1, 8)

    def chunk(row, method, psnr, start):
        k = len(psnr)
        return {"kind": "chunk", "row": row, "method": method, "budget": 0.5, "start": start, "stop": start + k,
                "psnr": list(psnr), "iou": [0.9] * k, "ssim": [0.99] * k, "acc": [1.0] * k, "latent_err": [0.01] * k,
                "seconds": 1.0}

    recs = [chunk("calibrated@0.5", "calibrated", cal[:8], 0), chunk("calibrated@0.5", "calibrated", cal[8:], 8),
            chunk("cat@0.5", "cat", cat, 0)]
    agg = report.aggregate(recs, 16)
    by = {r["row"]: r for r in agg["rows"]}
    assert by["calibrated@0.5"]["n"] == 16 and by["cat@0.5"]["n"] == 8
    d = by["cat@0.5"]["calibrated_minus_this"]["psnr"]
    assert d["n"] == 8 and d["mean"] == pytest.approx(float(np.mean(cal[:8] - cat)))
    text = report.findings(agg)
    assert any(f.startswith("Incomplete run: 1 row(s)") and "cat@0.5 (n=8)" in f for f in text)
    assert any(f.startswith("Budget 0.5: calibrated PSNR: best or tied (better than 1") for f in text)


def test_report_only_rebuilds_gpu_records_on_a_machine_without_one(tmp_path):
    from tokprune.yardstick.store import RunStore, fingerprint

    a = tmp_path / "a"
    assert quality.main([*TINY, "--out", str(a), "--report-only"]) == 0  # writes this run's settings record
    settings = {**_records(a / ".work" / "records.jsonl")[0]["settings"], "device": "cuda"}
    b = tmp_path / "b"
    store = RunStore(b / ".work", {k: v for k, v in settings.items() if k != "n"})
    assert _records(store.path)[0]["fingerprint"] == fingerprint({k: v for k, v in settings.items() if k != "n"})
    store.append({"kind": "versions", "python": "3.12", "torch": "2.11.0+cu130", "diffusers": "0.42.1", "numpy": "2",
                  "tokprune": "x", "threads": 2, "device": "NVIDIA H100 80GB HBM3"})
    for row, method, budget in (("dense-rerun", "dense-rerun", None), ("cat@0.3", "cat", 0.3)):
        store.append({"kind": "chunk", "row": row, "method": method, "budget": budget, "start": 0, "stop": 2,
                      "psnr": [99.0, 98.0] if budget is None else [30.0, 31.0], "iou": None, "ssim": [1.0, 0.99],
                      "acc": None, "latent_err": [0.0, 0.1], "seconds": 1.0})
    if not torch.cuda.is_available():  # without --report-only the same flags are refused here
        assert quality.main([*TINY, "--device", "cuda", "--n", "2", "--out", str(b)]) == 2
    assert quality.main([*TINY, "--device", "cuda", "--n", "2", "--out", str(b), "--report-only"]) == 0
    doc = json.loads((b / "quality.json").read_text())
    assert doc["versions"]["device"] == "NVIDIA H100 80GB HBM3" and doc["settings"]["device"] == "cuda"
    assert {r["row"]: r["n"] for r in doc["aggregate"]["rows"]} == {"dense-rerun": 2, "cat@0.3": 2}
    assert "NVIDIA H100 80GB HBM3" in (b / "quality.md").read_text()


def test_a_failing_phase_is_reported_and_the_next_phases_still_run(tmp_path, monkeypatch, capsys):
    from tokprune.yardstick import rows as rows_mod

    real = rows_mod._make_plan

    def broken(method, b, **kw):
        if b == 0.5:
            raise RuntimeError("CUDA error: simulated")
        return real(method, b, **kw)

    out = tmp_path / "q"
    args = [*TINY, "--steps", "8", "--budgets", "0.5,0.3", "--methods", "cat", "--caches", "fbc:threshold=5",
            "--n", "2", "--chunk", "2", "--noise-n", "1", "--out", str(out)]
    monkeypatch.setattr(rows_mod, "_make_plan", broken)
    assert quality.main(args) == 1
    assert "1 phase(s) failed: budget 0.5" in capsys.readouterr().err
    doc = json.loads((out / "quality.json").read_text())
    assert {r["row"] for r in doc["aggregate"]["rows"]} == {"dense-rerun", "cat@0.3", "fbc(threshold=5)"}
    assert any(f.startswith("Phase 'budget 0.5' FAILED") and "CUDA error: simulated" in f for f in doc["findings"])
    monkeypatch.setattr(rows_mod, "_make_plan", real)
    assert quality.main(args) == 0  # the rerun does the failed phase only, and its report drops the old error
    doc = json.loads((out / "quality.json").read_text())
    assert {r["row"] for r in doc["aggregate"]["rows"]} == {"dense-rerun", "cat@0.3", "cat@0.5", "fbc(threshold=5)"}
    assert not any("FAILED" in f for f in doc["findings"])


def test_checker_metrics_apply_to_both_trained_yardsticks(tmp_path):
    """Object IoU and accuracy are computed for the shapes world on either family, not for random models."""
    from tokprune.yardstick.driver import scores_objects

    assert scores_objects("shapes") and scores_objects("pixart-shapes")
    assert not scores_objects("sd3-tiny") and not scores_objects("pixart-medium")
    trained = tmp_path / "my-yardstick"
    trained.mkdir()
    assert not scores_objects(trained)
    (trained / "yardstick.json").write_text("{}")
    assert scores_objects(trained)
