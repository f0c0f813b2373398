"""Shared exports of the offline tiny SD3, built once per session."""

from __future__ import annotations

import pytest

from tests.export.helpers import STEPS, run_export


@pytest.fixture(scope="session")
def export_half(tmp_path_factory) -> dict:
    """budget 0.5: calibrated, token pruning only (the tiny random model would otherwise reuse whole
    steps: its predictions barely change), so several buckets (dense, pruned)."""
    out = tmp_path_factory.mktemp("exports") / "half"
    rc, seconds = run_export(out, "--budget", "0.5", "--no-reuse-steps")
    return {"rc": rc, "dir": out, "seconds": seconds, "steps": STEPS}


@pytest.fixture(scope="session")
def export_dense(tmp_path_factory) -> dict:
    """budget 1.0: one dense bucket, no calibration."""
    out = tmp_path_factory.mktemp("exports") / "dense"
    rc, seconds = run_export(out, "--budget", "1.0")
    return {"rc": rc, "dir": out, "seconds": seconds, "steps": STEPS}

