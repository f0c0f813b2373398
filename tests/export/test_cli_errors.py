"""Clear errors: unknown model, offline hub id, budget out of range, disk full."""

from __future__ import annotations

import errno

import pytest
from tokprune.export.cli import main
from tokprune.export.weights import SharedWeights

from tests.export.helpers import run_export


def test_unknown_model(capsys, tmp_path):
    rc = main(["--model", "no-such-model", "--budget", "0.5", "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "'no-such-model' is not a known model name" in err and "sd3-tiny" in err


def test_offline_hub_id(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rc = main(["--model", "someone/sd3-finetune", "--budget", "0.5", "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "offline" in err and "someone/sd3-finetune" in err  # a model that cannot be had: bad input
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.2"])
def test_budget_out_of_range(budget, capsys, tmp_path):
    rc = main(["--model", "sd3-tiny", "--budget", budget, "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "out of range" in err and "(0, 1]" in err


def test_budget_is_required_without_a_schedule(capsys):
    assert main(["--model", "sd3-tiny", "--quiet"]) == 2
    assert "--budget is required" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["onnx", "weights"])
def test_disk_full_is_reported_and_the_partial_export_kept(where, capsys, tmp_path, monkeypatch):
    from tokprune.export import exporter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "weights.bin")

    if where == "weights":  # the shared weights file is written after the bucket was traced
        monkeypatch.setattr(SharedWeights, "_append", full)
    else:  # the exporter (torch.onnx) writing its graph: it may wrap the OSError
        def wrapped(*args, **kwargs):
            try:
                full()
            except OSError as exc:
                raise RuntimeError("torch.onnx: failed to save the model") from exc

        monkeypatch.setattr(exporter, "export_bucket_onnx", wrapped)
    out = tmp_path / "full"
    rc, _ = run_export(out, "--budget", "1.0")
    err = capsys.readouterr().err
    assert rc == 1 and "disk full" in err and "re-run the same command to resume" in err
    assert not out.exists() and (tmp_path / ".full.partial").is_dir()
