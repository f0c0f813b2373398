"""Fixtures: a real ``sd3-tiny`` export with a hand-written schedule (seconds, no calibration).

Schedule (4 steps): dense (records text mass) -> K=64 image / 80 text -> reuse -> K=64 / 80, so
requests exercise per-run pruning caches, text pruning and a reuse step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

STEPS = 4
T5_LEN = 16
TEXT = 77 + T5_LEN
GUIDANCE = 5.0
KEYS = [f"k0256-t{TEXT:04d}", "k0064-t0080", "reuse", "k0064-t0080"]


def _schedule(pipe, keys: list[str]):
    from tokprune.calibrate.schedule import Bucket, Schedule
    from tokprune.pruning.geometry import Geometry
    from tokprune.pruning.macs import mac_fraction

    from tokprune.models import fingerprint

    vsf = int(pipe.vae_scale_factor)
    size = int(pipe.default_sample_size) * vsf
    g = Geometry.from_config(pipe.transformer.config, batch=2, latent_hw=(size // vsf, size // vsf), text_tokens=TEXT)
    fields = dict(
        model="sd3-tiny", model_fingerprint=fingerprint(pipe.transformer), height=size, width=size,
        vae_scale_factor=vsf, num_tokens=g.num_tokens, text_tokens=TEXT, steps=len(keys),
        scheduler=type(pipe.scheduler).__name__, scheduler_config=dict(pipe.scheduler.config), guidance=GUIDANCE,
        budget=1.0, mac_fraction=1.0, policy="cat", buckets=tuple(sorted({Bucket.from_key(k) for k in keys if k != "reuse"},
                                                                         reverse=True)),
        plan=tuple(keys), reuse="noise", align=16,
    )
    frac = mac_fraction(g, Schedule(**fields).to_plan(), "noise")
    fields.update(mac_fraction=frac, budget=round(frac, 4))
    return Schedule(**fields)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    from tokprune.export.exporter import ExportConfig, export_model
    from tokprune.models import build_tiny_pipeline

    tmp = tmp_path_factory.mktemp("serve-export")
    path = _schedule(build_tiny_pipeline("sd3"), KEYS).save(tmp / "schedule.json")
    out = tmp / "tiny"
    export_model(ExportConfig(model="sd3-tiny", schedule_file=str(path)), out, progress=False)
    return out


@pytest.fixture(scope="session")
def generator(tiny_export):
    from tokprune.serve.worker import ImageGenerator

    gen = ImageGenerator(tiny_export, slots=2, threads=1)
    yield gen
    gen.close()
