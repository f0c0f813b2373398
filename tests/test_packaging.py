"""The wheel installs into a fresh venv and runs one pruned step from there (not from the source tree)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tokprune", "tokprune/pruning", "tokprune/calibrate", "tokprune/export", "tokprune/runtime", "tokprune/yardstick",
            "tokprune/serve", "tokprune/demo", "tokprune/bench", "tokprune/bench/scenarios")

SNIPPET = r"""
import sys, torch
import tokprune
assert tokprune.__file__.startswith(sys.prefix), (tokprune.__file__, sys.prefix)
from tokprune import pruning
from diffusers import SD3Transformer2DModel
torch.manual_seed(0)
m = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16).eval()
x, e, p, t = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 16), torch.randn(1, 32), torch.tensor([500.0])
with torch.no_grad():
    ref = m(x, e, p, t).sample
    pruning.apply(m, pruning.PrunePlan(image_keep=(pruning.ALL, 32)), policy="random")
    a = m(x, e, p, t).sample
    b = m(x, e, p, t).sample
    pruning.remove(m)
assert (a - ref).abs().max() < 1e-5 and b.shape == ref.shape
print("OK", tokprune.__version__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (whl,) = out.glob("tokprune-*.whl")
    return whl


def test_wheel_contains_every_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in names, f"{pkg} missing from the wheel"
    assert not any(n.startswith(("tests/", "pruning/", "export/")) for n in names), "folders must install under tokprune/"


def test_wheel_ships_no_module_without_a_source_file(wheel):
    """A module moved or deleted in the tree must not live on in the wheel from an old ``build/`` folder."""
    import tomllib

    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    stale = []
    for name in zipfile.ZipFile(wheel).namelist():
        parts = name.split("/")
        if not name.endswith(".py") or ".dist-info" in parts[0]:
            continue
        pkg = next(i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in package_dir)
        if not (ROOT / package_dir[".".join(parts[:pkg])]).joinpath(*parts[pkg:]).is_file():
            stale.append(name)
    assert not stale, f"{stale} have no source file: stale build output; remove build/ (make clean) and rebuild"


def test_wheel_in_fresh_venv_runs_a_pruned_step(wheel, tmp_path):
    venv = tmp_path / "venv"
    # Heavy deps (torch, diffusers) come from this environment through a plain path line in a .pth file:
    # no network, and nested .pth files (e.g. an editable install's finder) are NOT processed that way,
    # so tokprune itself can only come from the wheel. We also run outside the source tree.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True, text=True
    ).stdout.strip()
    (Path(purelib) / "host-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(py), "-c", SNIPPET], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().startswith("OK")
