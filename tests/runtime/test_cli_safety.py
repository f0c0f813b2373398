"""Issue 11 for tokprune-generate / -demo: refused before work in flag words, nothing half-written.

(tokprune-bench's cases: tests/bench/test_cli_safety.py.)

Each case asserts the exit status, a one-line message naming the flag or file, no traceback and
that nothing was written (or left behind).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tokprune.runtime.cli import generate_main

from tests.export.test_safety import one_line_error
from tests.test_fsutil import readonly_dir


def _generate(pruned_export: Path, *flags: str, out: Path | str) -> int:
    return generate_main(["--engines", str(pruned_export), "--prompt", "a red circle", "--out", str(out), "--quiet", *flags])


@pytest.mark.parametrize("flags, needles", [
    (["--steps", "0"], ["--steps 0", "positive"]),
    (["--steps", "7"], ["--steps 7", "scheduled for 4 steps", "pass --steps 4", "tokprune-export"]),
    (["--height", "0"], ["--height 0", "positive"]),
    (["--width", "-8"], ["--width -8", "positive"]),
    (["--height", "32"], ["--height/--width 32x64", "static-shape for 64x64"]),
    (["--guidance", "1"], ["--guidance 1", "built with guidance 5", "a value > 1"]),
    (["--guidance", "-2"], ["--guidance -2", ">= 0"]),
    (["--backend", "bogus"], ["backend 'bogus'", "--backend onnxruntime"]),
    (["--prompt", " "], ["--prompt is empty"]),
])
def test_generate_refuses_a_call_the_engines_cannot_run(flags, needles, pruned_export, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert _generate(pruned_export, *flags, out=out) == 2
    line = one_line_error(capsys.readouterr().err, *needles)
    assert "num_inference_steps" not in line and "guidance_scale" not in line and "height=" not in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case, needle", [
    ("directory", "is a directory"),
    ("no-extension", "has no extension"),
    ("wrong-extension", "extension '.txt'"),
    ("under-a-file", "is a file"),
    ("read-only", "cannot write there"),
])
def test_generate_checks_out_before_any_work(case, needle, pruned_export, tmp_path, capsys, monkeypatch):
    import tokprune.runtime

    monkeypatch.setattr(tokprune.runtime, "load", lambda *a, **k: pytest.fail("the engines were loaded"))
    (tmp_path / "file").write_text("x")
    out = {"directory": tmp_path, "no-extension": tmp_path / "image", "wrong-extension": tmp_path / "image.txt",
           "under-a-file": tmp_path / "file" / "a.png", "read-only": readonly_dir(tmp_path) / "a.png"}[case]
    assert _generate(pruned_export, out=out) == 2
    one_line_error(capsys.readouterr().err, "--out", needle)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "ro") == ["file"]


def test_generate_on_a_full_disk_leaves_no_file(pruned_export, tmp_path, capsys, monkeypatch):
    from PIL import Image

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"")  # the encoder got as far as creating the file
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "a.png"
    assert _generate(pruned_export, out=out) == 1
    one_line_error(capsys.readouterr().err, "No space left on device", "free some space")
    assert list(tmp_path.iterdir()) == []  # no 0-byte PNG, no temporary file


@pytest.mark.parametrize("installed, gpu, device, needle, code", [
    (None, None, None, "TensorRT is not installed", 1),
    ("10.9.0", None, None, "needs a CUDA GPU", 1),
    ("10.9.0", {"name": "H100"}, "cpu", "runs on a CUDA GPU only, not --device cpu", 2),
])
def test_generate_tensorrt_says_what_is_missing(installed, gpu, device, needle, code, pruned_export, tmp_path, capsys,
                                                monkeypatch):
    from tokprune.export import tensorrt

    monkeypatch.setattr(tensorrt, "tensorrt_version", lambda: installed)
    monkeypatch.setattr(tensorrt, "gpu_info", lambda: gpu)
    flags = ["--backend", "tensorrt"] + (["--device", device] if device else [])
    assert _generate(pruned_export, *flags, out=tmp_path / "a.png") == code
    line = one_line_error(capsys.readouterr().err, "--backend tensorrt", needle)
    assert "device='" not in line


def test_generate_a_missing_export_names_the_file(tmp_path, capsys):
    assert _generate(tmp_path / "none", out=tmp_path / "a.png") == 1
    one_line_error(capsys.readouterr().err, "manifest.json does not exist")


# ---- tokprune-demo ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("force", [False, True])
def test_demo_never_touches_a_directory_it_did_not_make(force, tmp_path, capsys, monkeypatch):
    from tokprune.demo.cli import main as demo_main

    import tokprune.models

    monkeypatch.setattr(tokprune.models, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "chapter1.tex").write_text("keep me too")
    flags = ["--model", "sd3-tiny", "--engines", str(mine), "--report", str(tmp_path / "report"), "--quiet"]
    assert demo_main(flags + (["--force"] if force else [])) == 2
    one_line_error(capsys.readouterr().err, f"--engines {mine}", "not a tokprune export", "notes.txt")
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "sub" / "chapter1.tex").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no report dir, no partial


@pytest.mark.parametrize("flags, needle", [
    (["--n", "0"], "--n 0"),
    (["--steps", "1"], "--steps 1"),
    (["--budget", "2"], "--budget 2"),
    (["--report", "FILE"], "--report"),
])
def test_demo_bad_flags(flags, needle, tmp_path, capsys):
    from tokprune.demo.cli import main as demo_main

    (tmp_path / "file").write_text("x")
    flags = [str(tmp_path / "file") if f == "FILE" else f for f in flags]
    assert demo_main(["--model", "sd3-tiny", "--engines", str(tmp_path / "e"), "--quiet", *flags]) == 2
    one_line_error(capsys.readouterr().err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
