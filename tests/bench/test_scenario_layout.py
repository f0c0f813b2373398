"""The CPU layout scenario end to end on the tiny transformer: exports, each layout measured in its own process."""

from __future__ import annotations

import json

from tokprune.bench.scenarios.layout_cpu import main


def test_layouts_are_measured_in_their_own_processes(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--arch", "tiny", "--text-tokens", "20", "--repeats", "1", "--threads", "1"]) == 0
    data = json.loads((tmp_path / "layout_cpu.json").read_text())
    keys = ["k0256-t0020", "k0128-t0020", "k0064-t0020"]
    for layout in ("per-bucket", "single"):
        assert list(data["layouts"][layout]["ms"]) == keys and all(v > 0 for v in data["layouts"][layout]["ms"].values())
    assert (tmp_path / "graph.onnx").is_file() and all((tmp_path / f"{k}.onnx").is_file() for k in keys)
    assert data["geometry"] == {"N": 256, "T": 20, "batch": 2, "layers": data["geometry"]["layers"], "dim": data["geometry"]["dim"]}
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("| sessions' resident memory |")
