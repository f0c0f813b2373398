"""``tokprune-generate`` end to end on an sd3-tiny export."""

from __future__ import annotations

import numpy as np
from PIL import Image
from tokprune.runtime.cli import generate_main


def test_generate_writes_the_image(pruned_export, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert generate_main(["--engines", str(pruned_export), "--prompt", "a red circle", "--seed", "1", "--out", str(out),
                          "--quiet"]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert "onnxruntime pruned (3 engine calls)" in capsys.readouterr().out


def test_generate_refuses_other_steps_with_the_fix(pruned_export, tmp_path, capsys):
    code = generate_main(["--engines", str(pruned_export), "--prompt", "x", "--steps", "7", "--out", str(tmp_path / "b.png"),
                          "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--steps 7" in err and "pass --steps 4" in err and "tokprune-export --model sd3-tiny" in err
    assert "num_inference_steps" not in err  # the CLI speaks its flags, not the Python API's keywords


def test_generate_refuses_a_missing_export(tmp_path, capsys):
    assert generate_main(["--engines", str(tmp_path / "none"), "--prompt", "x"]) == 1
    assert "manifest.json does not exist" in capsys.readouterr().err
