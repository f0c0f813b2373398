"""The README's main job (`make demo` -> tokprune-demo) end to end, on the tiny model to stay fast."""

from __future__ import annotations

import json
import math

from tokprune.demo import _parser, run
from tokprune.export.manifest import verify


def test_demo_exports_engines_and_writes_grid_and_table(tmp_path):
    args = _parser().parse_args(
        ["--model", "sd3-tiny", "--budget", "0.5", "--steps", "6", "--n", "2",
         "--engines", str(tmp_path / "engines"), "--report", str(tmp_path / "report")]
    )
    result = run(args)
    assert verify(tmp_path / "engines") == []
    manifest = json.loads((tmp_path / "engines" / "manifest.json").read_text())
    assert abs(manifest["mac_fraction"] - 0.5) <= 0.02
    # Token pruning only: at least one bucket keeps fewer image tokens than the dense one.
    keeps = [b["image_keep"] for b in manifest["buckets"]]
    assert min(keeps) < max(keeps)
    assert (tmp_path / "report" / "grid.png").stat().st_size > 0
    table = (tmp_path / "report" / "speed.md").read_text()
    assert "| dense |" in table and "| pruned |" in table
    # Pruned images differ from dense (tokens were really pruned) but stay close.
    assert math.isfinite(result["psnr_db"]) and result["psnr_db"] > 10
    assert result["speedup"] > 0 and result["n"] == 2
