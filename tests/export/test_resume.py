"""Atomic, resumable exports: an interrupted run leaves nothing that looks complete and resumes where it stopped."""

from __future__ import annotations

import json

from tokprune.export import exporter
from tokprune.export.manifest import load_manifest, verify

from tests.export.helpers import run_export


def test_interrupted_export_resumes_without_redoing_finished_buckets(export_half, tmp_path, monkeypatch, capsys):
    schedule = export_half["dir"] / "schedule.json"  # skip calibration: reuse the session's schedule
    keys = load_manifest(export_half["dir"]).keys
    assert len(keys) >= 2
    out = tmp_path / "resumable"
    partial = tmp_path / ".resumable.partial"
    real = exporter.export_bucket_onnx
    calls: list[str] = []

    def crash_on_second(model, spec, path, **kwargs):
        calls.append(spec.key)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C half-way
        return real(model, spec, path, **kwargs)

    monkeypatch.setattr(exporter, "export_bucket_onnx", crash_on_second)
    rc, _ = run_export(out, "--schedule", str(schedule))
    assert rc == 130 and "re-run the same command to resume" in capsys.readouterr().err
    assert not out.exists()  # nothing that looks complete
    assert partial.is_dir() and not (partial / "manifest.json").exists()
    state = json.loads((partial / exporter.STATE_FILE).read_text())
    assert list(state["buckets"]) == [keys[0]]
    first = (partial / f"{keys[0]}.onnx").read_bytes()

    calls.clear()
    monkeypatch.setattr(exporter, "export_bucket_onnx", lambda *a, **k: (calls.append(a[1].key), real(*a, **k))[1])
    rc, _ = run_export(out, "--schedule", str(schedule))
    assert rc == 0, capsys.readouterr().err
    assert "reused 1 from an interrupted run" in capsys.readouterr().out
    assert calls == keys[1:]  # the finished bucket was not traced again
    assert (out / f"{keys[0]}.onnx").read_bytes() == first
    assert verify(out) == [] and not partial.exists() and not (out / exporter.STATE_FILE).exists()
    assert load_manifest(out).keys == keys
    # identical content to the uninterrupted export of the same schedule
    assert (out / "weights.bin").read_bytes() == (export_half["dir"] / "weights.bin").read_bytes()


def test_force_replaces_an_existing_export_and_a_stale_partial_one(export_dense, tmp_path, capsys):
    import shutil

    out = tmp_path / "forced"
    shutil.copytree(export_dense["dir"], out)
    (out / "notes.txt").write_text("old")
    partial = tmp_path / ".forced.partial"  # left by an interrupted export of another configuration
    partial.mkdir()
    (partial / exporter.STATE_FILE).write_text(json.dumps({"identity": {"budget": 0.3}, "buckets": {}}))
    (partial / "junk.onnx").write_bytes(b"stale")
    rc, _ = run_export(out, "--budget", "1.0", "--precision", "fp16")
    assert rc == 2 and "different configuration" in capsys.readouterr().err
    rc, _ = run_export(out, "--budget", "1.0", "--precision", "fp16", "--force")  # a file the export did not write
    assert rc == 2 and "did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "old"  # --force never deletes what tokprune did not create
    (out / "notes.txt").unlink()  # the user moved it away
    rc, _ = run_export(out, "--budget", "1.0", "--precision", "fp16", "--force")
    assert rc == 0, capsys.readouterr().err
    m = load_manifest(out)
    assert m.data["precision"] == "fp16" and verify(out) == []
    assert not (out / "junk.onnx").exists() and not partial.exists()
    assert m.bucket(m.keys[0])["equivalence"]["status"] == "passed"
