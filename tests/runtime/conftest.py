"""Fixtures: real ``sd3-tiny`` exports (made once per session through the export API) and pipelines.

Schedules are written by hand (no calibration: seconds instead of minutes) with a short T5 length
(T = 77 + 16 text tokens) so every export and generation stays fast:

- ``pruned_export``: 4 steps, ``dense (records text mass) -> K=64 image / 80 text -> reuse -> K=64 / 80``:
  image and text pruning, a reuse step, two buckets.
- ``dense_export``: 4 dense steps, one bucket (budget 1.0).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

STEPS = 4
T5_LEN = 16
TEXT = 77 + T5_LEN
GUIDANCE = 5.0
PROMPT = "a red circle on a blue background"


def make_schedule(pipe, keys: list[str], *, steps: int = STEPS, text_tokens: int = TEXT):
    """A valid Schedule for the tiny pipeline running ``keys`` (bucket keys or "reuse") per step."""
    from tokprune.calibrate.schedule import Bucket, Schedule
    from tokprune.pruning.geometry import Geometry
    from tokprune.pruning.macs import mac_fraction

    from tokprune.models import fingerprint

    assert len(keys) == steps
    vsf = int(pipe.vae_scale_factor)
    size = int(pipe.default_sample_size) * vsf
    g = Geometry.from_config(pipe.transformer.config, batch=2, latent_hw=(size // vsf, size // vsf), text_tokens=text_tokens)
    buckets = sorted({Bucket.from_key(k) for k in keys if k != "reuse"}, reverse=True)
    sched = dict(
        model="sd3-tiny", model_fingerprint=fingerprint(pipe.transformer), height=size, width=size,
        vae_scale_factor=vsf, num_tokens=g.num_tokens, text_tokens=text_tokens, steps=steps,
        scheduler=type(pipe.scheduler).__name__, scheduler_config=dict(pipe.scheduler.config), guidance=GUIDANCE,
        budget=1.0, mac_fraction=1.0, policy="cat", buckets=tuple(buckets), plan=tuple(keys), reuse="noise", align=16,
    )
    draft = Schedule(**sched)
    frac = mac_fraction(g, draft.to_plan(), "noise")
    sched.update(mac_fraction=frac, budget=round(frac, 4))
    return Schedule(**sched)


def _export(tmp: Path, pipe, keys: list[str], name: str) -> Path:
    from tokprune.export.exporter import ExportConfig, export_model

    path = make_schedule(pipe, keys).save(tmp / f"{name}.json")
    out = tmp / name
    export_model(ExportConfig(model="sd3-tiny", schedule_file=str(path)), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_pipe():
    """One tiny pipeline, never mutated by tests (they attach to :func:`fresh_pipe` copies)."""
    from tokprune.models import build_tiny_pipeline

    return build_tiny_pipeline("sd3")


@pytest.fixture(scope="session")
def pruned_export(tmp_path_factory, tiny_pipe) -> Path:
    keys = [f"k0256-t{TEXT:04d}", "k0064-t0080", "reuse", "k0064-t0080"]
    return _export(tmp_path_factory.mktemp("exports"), tiny_pipe, keys, "pruned")


@pytest.fixture(scope="session")
def dense_export(tmp_path_factory, tiny_pipe) -> Path:
    keys = [f"k0256-t{TEXT:04d}"] * STEPS
    return _export(tmp_path_factory.mktemp("exports"), tiny_pipe, keys, "dense")


def clone_pipe(pipe):
    """A pipeline sharing ``pipe``'s modules (read-only) with its own scheduler and tokenizers.

    Fast tokenizers keep per-call padding/truncation state, so two threads must not share one.
    """
    import copy

    from diffusers import StableDiffusion3Pipeline

    parts = dict(pipe.components)
    for name in ("scheduler", "tokenizer", "tokenizer_2", "tokenizer_3"):
        parts[name] = copy.deepcopy(pipe.components[name])
    clone = StableDiffusion3Pipeline(**parts)
    clone.set_progress_bar_config(disable=True)
    return clone


@pytest.fixture
def fresh_pipe(tiny_pipe):
    return clone_pipe(tiny_pipe)


def generate(pipe, *, prompt=PROMPT, seed=0, steps=STEPS, height=None, width=None, guidance=GUIDANCE,
             num_images=1, output_type="np", callback=None):
    kwargs = {}
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    with torch.inference_mode():
        return pipe(
            prompt, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
            max_sequence_length=T5_LEN, num_images_per_prompt=num_images,
            generator=torch.Generator().manual_seed(seed), output_type=output_type, **kwargs,
        ).images
