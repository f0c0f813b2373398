"""Whole-run rollouts: the same loop, selection code and state as a pipeline call with pruning applied."""

from __future__ import annotations

import pytest
import torch

from tokprune import pruning
from tokprune.calibrate.baselines import cat_schedule, interleaved_schedule
from tokprune.calibrate.rollout import Rollouts
from tokprune.pruning.plan import ALL, PrunePlan

STEPS, MSL = 6, 16
PROMPTS = ["a red circle on a white background", "two blue squares"]


@pytest.fixture(scope="module")
def pipe():
    from tokprune.models import build_tiny_pipeline

    p = build_tiny_pipeline("sd3")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def rollouts(pipe):
    return Rollouts(pipe, PROMPTS, steps=STEPS, guidance=5.0, max_sequence_length=MSL, seed=3)


def _pipeline(pipe, plan=None, policy="cat"):
    if plan is not None:
        pruning.apply(pipe, plan, policy=policy)
    try:
        return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
                    output_type="latent", max_sequence_length=MSL).images
    finally:
        pruning.remove(pipe)


def test_dense_rollout_is_the_pipeline_call(pipe, rollouts):
    assert torch.equal(rollouts.dense(), _pipeline(pipe).float())


@pytest.mark.parametrize("policy", ["cat", "dynamics", "random"])
def test_pruned_rollout_is_the_pruned_pipeline_call(pipe, rollouts, policy):
    """Rollouts measure exactly what users run: same policy code, CFG sharing, caches and probe steps."""
    plan = PrunePlan((ALL, ALL, 128, 0, 64, 128), text_keep=(ALL, ALL, 40, ALL, ALL, 40))
    assert torch.equal(rollouts.run(plan, policy), _pipeline(pipe, plan, policy).float())


def test_shared_prefixes_are_paid_once_and_change_nothing(pipe):
    ro = Rollouts(pipe, PROMPTS, steps=STEPS, guidance=5.0, max_sequence_length=MSL, seed=3)
    fresh = Rollouts(pipe, PROMPTS, steps=STEPS, guidance=5.0, max_sequence_length=MSL, seed=3, snapshot_bytes=0)
    ro.dense()
    before = ro.executed_steps
    plan = cat_schedule(ro.geometry, STEPS, 0.6, t0=3)
    warm = plan.image_keep.index(next(k for k in plan.image_keep if k != ALL))
    assert warm >= 2
    assert torch.equal(ro.run(plan), fresh.run(plan))
    assert ro.executed_steps - before == STEPS - warm  # resumed after the shared dense warm-up
    assert fresh.executed_steps == STEPS


def test_error_is_zero_for_dense_and_grows_with_pruning(rollouts):
    assert rollouts.error(PrunePlan.dense(STEPS)) == 0.0
    light = cat_schedule(rollouts.geometry, STEPS, 0.9, t0=2)
    heavy = cat_schedule(rollouts.geometry, STEPS, 0.5, t0=2)
    assert 0.0 < rollouts.error(light) < rollouts.error(heavy)
    reuse = interleaved_schedule(rollouts.geometry, STEPS, 0.5)
    assert rollouts.error(reuse) > 0.0


def test_decode_matches_the_pipeline_images(pipe, rollouts):
    got = rollouts.decode(rollouts.dense())
    want = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
                output_type="np", max_sequence_length=MSL).images
    assert got.shape == want.shape and abs(got - want).max() < 1e-5


def test_short_dense_warmups_are_kept_when_memory_is_short(pipe):
    """Snapshots are capped; dense warm-ups (shared by every candidate) are evicted last, shortest kept."""
    probe = Rollouts(pipe, PROMPTS, steps=STEPS, guidance=5.0, max_sequence_length=MSL, seed=3)
    probe.dense()
    one = max(s.nbytes for s in probe._snapshots.values())
    ro = Rollouts(pipe, PROMPTS, steps=STEPS, guidance=5.0, max_sequence_length=MSL, seed=3,
                  snapshot_bytes=3 * one)
    ro.dense()
    assert sorted(len(k[1]) for k in ro._snapshots) == [1, 2, 3]  # the three shortest warm-ups
    ro.run(cat_schedule(ro.geometry, STEPS, 0.6, t0=2))  # its pruned prefixes do not push warm-ups out
    assert sorted(len(k[1]) for k in ro._snapshots) == [1, 2, 3]
    before = ro.executed_steps
    ro.run(cat_schedule(ro.geometry, STEPS, 0.7, t0=3))
    assert ro.executed_steps - before <= STEPS - 2  # resumed from a stored warm-up


def test_per_prompt_seeds_match_a_pipeline_call_with_a_generator_list(pipe):
    ro = Rollouts(pipe, PROMPTS, steps=STEPS, guidance=5.0, max_sequence_length=MSL, seeds=[7, 11])
    want = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent", max_sequence_length=MSL,
                generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(11)]).images
    assert torch.equal(ro.dense(), want.float())
    alone = Rollouts(pipe, PROMPTS[1:], steps=STEPS, guidance=5.0, max_sequence_length=MSL, seeds=[11])
    assert torch.equal(alone.start[0], ro.start[1])  # a prompt's start does not depend on its place


def test_resumed_runs_continue_a_multistep_scheduler_exactly():
    """DPM-Solver++ (PixArt-Σ's sampler) combines previous predictions: a run resumed from a prefix
    snapshot must continue the snapshot's scheduler, not a fresh one at the same step index."""
    from tokprune.models import load_pipeline

    pipe = load_pipeline("pixart-tiny")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(steps=STEPS, guidance=4.5, seed=3)
    ro, fresh = Rollouts(pipe, PROMPTS, **kw), Rollouts(pipe, PROMPTS, **kw, snapshot_bytes=0)
    assert type(ro._scheduler).__name__ == "DPMSolverMultistepScheduler"
    ro.dense()
    plan = cat_schedule(ro.geometry, STEPS, 0.6, t0=3)
    before = ro.executed_steps
    assert torch.equal(ro.run(plan), fresh.run(plan))
    assert ro.executed_steps - before < STEPS  # it did resume from the shared warm-up


def test_planned_units_is_the_work_the_runs_then_execute(pipe):
    """The cost model (the progress bar's total) counts exactly what runs: the dense run once, each plan
    from its longest shared prefix (also one run earlier in the same list), reused steps free."""
    ro = Rollouts(pipe, PROMPTS, steps=STEPS, guidance=5.0, max_sequence_length=MSL, seed=3)
    a = cat_schedule(ro.geometry, STEPS, 0.6, t0=3)
    b = PrunePlan(a.image_keep[:4] + (0, 64))  # shares a's first four steps, then reuses one
    c = PrunePlan((ALL, ALL, 128, 0, 64, 128), text_keep=(ALL, ALL, 40, ALL, ALL, 40))  # probe step 1
    plans = [a, b, c, a]
    want = ro.planned_units(plans)
    assert want > STEPS  # the dense run is included while it has not run
    for p in plans:
        ro.errors(p)
    assert ro.executed_units == pytest.approx(want, rel=1e-12)
    before = ro.executed_units
    assert ro.planned_units([b]) == pytest.approx(ro._step_units(b, STEPS - 1))  # all but its last step is held
    ro.run(b)
    assert ro.executed_units - before == pytest.approx(ro._step_units(b, STEPS - 1))
    fresh = Rollouts(pipe, PROMPTS, steps=STEPS, guidance=5.0, max_sequence_length=MSL, seed=3, snapshot_bytes=0)
    assert fresh.planned_units([a]) == pytest.approx(STEPS + sum(fresh._step_units(a, s) for s in range(STEPS)))


def test_planned_units_replays_the_snapshot_cap(pipe):
    """Under a memory cap that holds two snapshots the forecast still equals what runs (evictions replayed),
    and the estimate of a snapshot's size before any run is the size the first stored one has."""
    probe = Rollouts(pipe, PROMPTS, steps=STEPS, guidance=5.0, max_sequence_length=MSL, seed=3)
    size = probe._snapshot_nbytes()
    probe.dense()
    assert probe._nbytes == size
    ro = Rollouts(pipe, PROMPTS, steps=STEPS, guidance=5.0, max_sequence_length=MSL, seed=3,
                  snapshot_bytes=2 * size + 1)
    a = cat_schedule(ro.geometry, STEPS, 0.6, t0=3)
    b = PrunePlan(a.image_keep[:4] + (0, 64))
    c = cat_schedule(ro.geometry, STEPS, 0.5, t0=2)
    plans = [a, b, c, b, a]
    want = ro.planned_units(plans)
    uncapped = Rollouts(pipe, PROMPTS, steps=STEPS, guidance=5.0, max_sequence_length=MSL, seed=3).planned_units(plans)
    assert want > uncapped  # the cap costs re-runs, and the forecast knows it
    ro.dense()  # what errors() runs first
    for p in plans:
        ro.run(p)
    assert ro.executed_units == pytest.approx(want, rel=1e-12)
