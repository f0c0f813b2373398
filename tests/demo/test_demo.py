"""The README's main job (`make demo` -> tokprune-demo) end to end, on the tiny model to stay fast."""

from __future__ import annotations

import json
import math

from tokprune.demo.cli import _parser, run
from tokprune.export.manifest import verify


def test_demo_exports_engines_and_writes_grid_and_table(tmp_path):
    args = _parser().parse_args(
        ["--model", "sd3-tiny", "--budget", "0.5", "--steps", "6", "--n", "2", "--no-reuse-steps",
         "--engines", str(tmp_path / "engines"), "--report", str(tmp_path / "report")]
    )
    result = run(args)
    assert verify(tmp_path / "engines") == []
    manifest = json.loads((tmp_path / "engines" / "manifest.json").read_text())
    assert abs(manifest["mac_fraction"] - 0.5) <= 0.02
    # Token pruning only (--no-reuse-steps; on the random tiny model whole-step reuse may win otherwise):
    # at least one bucket keeps fewer image tokens than the dense one.
    keeps = [b["image_keep"] for b in manifest["buckets"]]
    assert min(keeps) < max(keeps)
    assert (tmp_path / "report" / "grid.png").stat().st_size > 0
    table = (tmp_path / "report" / "speed.md").read_text()
    assert "| dense | PyTorch eager" in table and "| dense | ONNX Runtime, dense bucket" in table and "| pruned |" in table
    # The speed table separates the export gain from the pruning gain; overall = their product.
    assert "export gain" in table and "pruning gain" in table and "overall" in table
    assert result["export_gain"] == result["dense_s"] / result["ort_dense_s"]
    assert result["pruning_gain"] == result["ort_dense_s"] / result["pruned_s"]
    assert math.isclose(result["speedup"], result["export_gain"] * result["pruning_gain"], rel_tol=1e-9)
    # ONNX Runtime's dense bucket reproduces eager dense; pruned images differ (tokens were really pruned) but stay close.
    assert result["ort_dense_psnr_db"] > 60
    assert math.isfinite(result["psnr_db"]) and 10 < result["psnr_db"] < result["ort_dense_psnr_db"]
    assert result["speedup"] > 0 and result["n"] == 2
    # The MAC fraction shown counts what runs (token pruning only here: no text-importance probe).
    assert abs(result["mac_fraction"] - manifest["mac_fraction"]) < 1e-9
