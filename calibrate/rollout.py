"""Whole sampling runs ("rollouts") of a plan on a fixed prompt set, measured against dense.

Calibration judges a schedule by what it does to complete runs, not by one-step errors: a
:class:`Rollouts` object holds a prompt set (encoded once), its seeded start latents and the
dense run's final latents, and measures any :class:`~tokprune.pruning.plan.PrunePlan` by running
the whole denoising loop through the runtime's own selection code (:class:`TokenPruner`, the
same policy objects, CFG sharing, text protection and probe steps as eager sampling and the
engines).

Runs that share a plan prefix share its work: the run state after every step (latents, the
pruner's caches and previous prediction, the policy's state) is kept as a snapshot keyed by the
prefix, up to a memory cap, and a new run resumes from the longest stored prefix. Dense warm-ups
are what every candidate shares, so they are evicted last (other snapshots go least recently used
first, then the longest warm-ups): a warm-up is paid once per prompt set.

The loop is the ``StableDiffusion3Pipeline`` loop (same start latents from the seeded generator,
same timesteps, guidance and scheduler step), so the dense rollout equals the pipeline's output
(checked in ``tests/calibrate/test_rollout.py``).

Example::

    from tokprune.models import load_pipeline
    from tokprune.calibrate.rollout import Rollouts
    from tokprune.calibrate.baselines import cat_schedule

    pipe = load_pipeline("sd3-tiny")
    ro = Rollouts(pipe, ["a red circle", "two blue squares"], steps=8, guidance=5.0)
    plan = cat_schedule(ro.geometry, 8, 0.5, t0=2)
    ro.error(plan)          # mean relative L2 error of the final latents vs dense
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from tokprune.errors import ConfigError
from tokprune.pruning.macs import dense_macs, step_macs
from tokprune.pruning.plan import ALL, PrunePlan
from tokprune.pruning.sampler import RunState, TokenPruner

logger = logging.getLogger(__name__)

__all__ = ["Rollouts", "default_snapshot_bytes", "relative_error"]

DEFAULT_SNAPSHOT_BYTES = 4 * 2**30  # memory for stored run states on the CPU (per Rollouts object)
CUDA_SNAPSHOT_SHARE = 0.3  # on a GPU: this share of the free device memory


def default_snapshot_bytes(device: torch.device) -> int:
    """Memory for prefix snapshots: 4 GiB on the CPU, 30% of the free memory on a CUDA device."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_SNAPSHOT_SHARE)
    return DEFAULT_SNAPSHOT_BYTES


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(P,) float64 ``||x - ref|| / ||ref||`` per sample of (P, ...) tensors."""
    d = (x.double() - ref.double()).flatten(1).norm(dim=1)
    return d / ref.double().flatten(1).norm(dim=1).clamp_min(1e-12)


@dataclass
class _Snapshot:
    latents: torch.Tensor  # (P, C, H, W) before the step
    state: RunState | None  # the pruner's run state before the step (None before step 0)
    policy: Any
    scheduler: Any  # the scheduler before the step: multistep solvers (DPM-Solver, PNDM) carry history
    nbytes: int


def _clone_state(st: RunState | None) -> RunState | None:
    if st is None:
        return None
    return RunState(
        geometry=st.geometry,
        caches={k: v.clone() for k, v in st.caches.items()},
        step=st.step,
        prev_noise=None if st.prev_noise is None else st.prev_noise.clone(),
        text_importance=None if st.text_importance is None else st.text_importance.clone(),
        guidance=st.guidance,
    )


def _state_bytes(latents: torch.Tensor, st: RunState | None) -> int:
    total = latents.numel() * latents.element_size()
    if st is not None:
        total += sum(v.numel() * v.element_size() for v in st.caches.values())
        if st.prev_noise is not None:
            total += st.prev_noise.numel() * st.prev_noise.element_size()
    return total


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, or a dict / list / tuple of them, nested)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _all_dense(prefix: tuple) -> bool:
    """A prefix of dense, full-text steps without probes or cached steps (the warm-up every candidate shares)."""
    return all(e[0] == ALL and e[1] == ALL and not any(e[2:]) for e in prefix)


def _plan_key(plan: PrunePlan, steps: int) -> tuple[tuple[int, ...], ...]:
    """Per step (image keep, text keep, probe[, cached]): what the state after a prefix depends on (the
    cached flag only for plans with step caching)."""
    text = plan.text_keep if plan.text_keep is not None else (ALL,) * steps
    probes = set(plan.probe_steps())
    if plan.step_cache is not None:
        return tuple((k, t, s in probes, plan.is_cached(s)) for s, (k, t) in enumerate(zip(plan.image_keep, text)))
    return tuple((k, t, s in probes) for s, (k, t) in enumerate(zip(plan.image_keep, text)))


def _pick_victim(snapshots: "OrderedDict[tuple, Any]", warmup_len: int | None) -> tuple | None:
    """The snapshot to evict (its key), or None to not store the new one.

    Dense warm-ups are what every candidate shares: any other snapshot goes first (least
    recently used first); a warm-up goes only for a shorter warm-up (shorter ones serve more
    candidates)."""
    for key in snapshots:  # OrderedDict: least recently used first
        if not _all_dense(key[1]):
            return key
    if warmup_len is None:
        return None
    longest = max(snapshots, key=lambda k: len(k[1]))
    return longest if len(longest[1]) > warmup_len else None


def _admit(snapshots: "OrderedDict[tuple, Any]", held: int, cap: int, key: tuple, nbytes: int,
           size: Callable[[Any], int]) -> tuple[int, bool]:
    """Make room under ``cap`` for a new snapshot ``key`` of ``nbytes`` by evicting from ``snapshots``
    (in place, :func:`_pick_victim`); returns (bytes held after the evictions, whether to store it).
    One rule for the real store and the cost model's replay of it."""
    if nbytes > cap:
        return held, False
    warm = len(key[1]) if _all_dense(key[1]) else None
    while held + nbytes > cap and snapshots:
        victim = _pick_victim(snapshots, warm)
        if victim is None:
            return held, False
        held -= size(snapshots.pop(victim))
    return held, True


class Rollouts:
    """Measure whole sampling runs of plans on one prompt set (module docstring).

    Args that matter:
        pipe: a ``StableDiffusion3Pipeline`` (its transformer, scheduler, text encoders are used; it
            is not modified).
        prompts: the prompt set; all prompts run in one batch (2x under CFG): keep it small.
        steps, guidance, height, width, max_sequence_length: the call the schedule is for.
        seed: start latents come from ``torch.Generator().manual_seed(seed)`` as in a pipeline call.
        seeds: one seed per prompt instead (as a pipeline call with a list of generators), so a prompt's
            start latent does not depend on its place in the batch.
    Args to tinker with:
        policy: the default selection policy name for :meth:`run`.
        select_from: what the policy scores under CFG (``"guided"`` or ``"cond"``, as :func:`pruning.apply`).
        snapshot_bytes: memory for prefix snapshots (0 disables sharing; None: :func:`default_snapshot_bytes`).
    """

    def __init__(
        self,
        pipe: Any,
        prompts: Sequence[str],
        *,
        steps: int,
        guidance: float,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        reuse: str = "noise",
        policy: str = "cat",
        select_from: str = "guided",
        snapshot_bytes: int | None = None,
        on_step: Callable[[float], None] | None = None,
    ) -> None:
        if not prompts:
            raise ConfigError("a rollout needs at least one prompt; got none")
        self.pipe = pipe
        self.prompts = list(prompts)
        self.steps = int(steps)
        self.guidance = float(guidance)
        self.cfg = self.guidance > 1.0
        self.reuse = reuse
        self.policy = policy
        self.seed = int(seed)
        if seeds is not None and len(seeds) != len(self.prompts):
            raise ConfigError(f"seeds: got {len(seeds)} for {len(self.prompts)} prompts; expected one per prompt")
        self.seeds = None if seeds is None else [int(x) for x in seeds]
        self.select_from = select_from
        self.on_step = on_step  # called with the MAC fraction of every executed step (progress)
        from tokprune.pruning.family import family_for

        self.family = family_for(pipe)
        self.settings = self.family.settings(
            pipe, height=height, width=width, steps=self.steps, guidance=self.guidance,
            max_sequence_length=max_sequence_length, prompts=len(self.prompts),
        )
        self.height, self.width = self.settings.height, self.settings.width
        self.max_sequence_length = self.settings.max_sequence_length
        self.device = pipe._execution_device if hasattr(pipe, "_execution_device") else torch.device("cpu")
        self.snapshot_bytes = default_snapshot_bytes(self.device) if snapshot_bytes is None else int(snapshot_bytes)
        self._encode()
        self.geometry = self.settings.geometry(self.family.denoiser(pipe))
        self._dense_step_macs = dense_macs(self.geometry)
        self._snapshots: OrderedDict[tuple, _Snapshot] = OrderedDict()
        self._held = 0
        self._nbytes: int | None = None  # bytes of the last snapshot stored (all are about the same size)
        self._dense: torch.Tensor | None = None
        self.executed_steps = 0  # transformer calls made (cost accounting)
        self.executed_units = 0.0  # the same in dense-step MAC units

    # ---- set-up ------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self) -> None:
        pipe, family = self.pipe, self.family
        self.conditions, self.text_protect = family.encode(pipe, self.prompts, self.settings)
        if self.seeds is None:
            gens = torch.Generator(device="cpu").manual_seed(self.seed)
        else:  # one generator per prompt, as pipe(prompts, generator=[...]) draws them
            gens = [torch.Generator(device="cpu").manual_seed(x) for x in self.seeds]
        dtype = next(iter(self.conditions.values())).dtype
        self.start = family.prepare_latents(pipe, self.settings, gens, len(self.prompts), dtype)
        self._scheduler, self.timesteps = family.timesteps(pipe, self.settings, self.start)  # copied per run
        if len(self.timesteps) != self.steps:
            raise ConfigError(f"the scheduler made {len(self.timesteps)} timesteps for {self.steps} steps; expected one per step")

    # ---- runs --------------------------------------------------------------------------------
    def dense(self) -> torch.Tensor:
        """(P, C, H, W) float32 final latents of the dense run (computed once)."""
        if self._dense is None:
            self._dense = self.run(PrunePlan.dense(self.steps))
        return self._dense

    def error(self, plan: PrunePlan, policy: str | None = None) -> float:
        """Mean over prompts of the final latent's relative L2 error vs dense."""
        return float(self.errors(plan, policy).mean())

    def errors(self, plan: PrunePlan, policy: str | None = None) -> torch.Tensor:
        """(P,) float64 per-prompt relative L2 error of the final latents vs dense."""
        return relative_error(self.run(plan, policy), self.dense())

    @torch.no_grad()
    def run(self, plan: PrunePlan, policy: str | None = None) -> torch.Tensor:
        """(P, C, H, W) float32 final latents of a whole run following ``plan``."""
        if plan.num_steps != self.steps:
            raise ConfigError(f"the plan has {plan.num_steps} steps; these rollouts run {self.steps}")
        policy = policy or self.policy
        key = _plan_key(plan, self.steps)
        pruner = TokenPruner(
            self.family.denoiser(self.pipe),
            plan,
            policy=policy,
            seed=0,  # the policy seed the runtime and apply() use; self.seed only seeds the start latents
            reuse=self.reuse,
            text_protect=self.text_protect,
            guidance=self.guidance if self.cfg else None,
            select_from=self.select_from,
            family=self.family,
        )
        start, snap = self._longest_prefix(policy, key)
        if snap is None:
            latents, pruner.state = self.start.clone(), None
        else:
            latents = snap.latents.clone()
            pruner.state = _clone_state(snap.state)
            pruner.policy = copy.deepcopy(snap.policy)
        # a resumed run continues the scheduler of its snapshot: its step index and, for multistep
        # solvers, the previous predictions they combine (a fresh scheduler would forget them)
        sched = copy.deepcopy(self._scheduler if snap is None else snap.scheduler)
        for s in range(start, self.steps):
            if s > start or snap is None:
                self._store(policy, key[:s], latents, pruner, sched)
            latents = self._step(pruner, sched, s, latents)
        return latents.float()

    def _step(self, pruner: TokenPruner, sched: Any, s: int, latents: torch.Tensor) -> torch.Tensor:
        t = self.timesteps[s]
        x = torch.cat([latents, latents]) if self.cfg else latents
        x = self.family.model_input(sched, x, t)
        g = self.geometry
        if pruner.state is None:
            pruner.state = pruner.begin(g, x.device, x.dtype)
        pruner.state.step = s
        noise = pruner.step(pruner.state, x, self.conditions, t.expand(x.shape[0]))
        pruner.state.step = s + 1
        if pruner.plan.image_k(s, g.num_tokens) > 0:
            units = self._step_units(pruner.plan, s, pruner.probe_steps)
            self.executed_steps += 1
            self.executed_units += units
            if self.on_step is not None:
                self.on_step(units)
        noise = self.family.guide(noise, self.guidance if self.cfg else None)
        return self.family.scheduler_step(sched, noise, t, latents)

    def _step_units(self, plan: PrunePlan, s: int, probes: Any = None) -> float:
        """Step ``s`` of ``plan`` in dense-step MAC units of one call (0 for a reused step: no call)."""
        g = self.geometry
        k = plan.image_k(s, g.num_tokens)
        if k <= 0:
            return 0.0
        probes = set(plan.probe_steps()) if probes is None else probes
        frac = step_macs(g, k, plan.text_k(s, g.text_tokens), self.reuse, probe=s in probes, cached=plan.is_cached(s))
        return frac / self._dense_step_macs

    # ---- cost model --------------------------------------------------------------------------
    def planned_units(self, plans: Sequence[PrunePlan], policy: str | None = None) -> float:
        """The work that measuring ``plans`` in this order would execute now, in dense-step MAC units of
        one call of this prompt set (times ``len(prompts)``: dense prompt-steps).

        The cost model of :meth:`errors`: the dense run first if it has not run, then each plan from its
        longest prefix held now or stored by an earlier plan of the list (what :meth:`run` resumes from;
        the snapshot store, its memory cap and its evictions are replayed with the same rule), reused
        steps free. The calibration's progress bar takes its total from it.
        """
        policy = policy or self.policy
        sizes = OrderedDict((k, snap.nbytes) for k, snap in self._snapshots.items())  # replayed, not touched
        held = self._held
        nbytes = self._snapshot_nbytes()
        todo = list(plans) if self._dense is not None else [PrunePlan.dense(self.steps), *plans]
        total = 0.0
        for plan in todo:
            key = _plan_key(plan, self.steps)
            start = next((s for s in range(len(key), 0, -1) if (policy, key[:s]) in sizes), 0)
            if start:
                sizes.move_to_end((policy, key[:start]))
            probes = set(plan.probe_steps())
            total += sum(self._step_units(plan, s, probes) for s in range(start, self.steps))
            for s in range(max(start, 1), self.steps):  # what run() stores, under the same memory cap
                if (s > start or not start) and self.snapshot_bytes > 0 and (policy, key[:s]) not in sizes:
                    held, ok = _admit(sizes, held, self.snapshot_bytes, (policy, key[:s]), nbytes, lambda n: n)
                    if ok:
                        sizes[(policy, key[:s])] = nbytes
                        held += nbytes
        return total

    def _snapshot_nbytes(self) -> int:
        """Bytes of one stored run state: the last one stored, else those of a fresh run's state (exact for
        SD3; a family that adds caches in the first step, e.g. PixArt's text K/V, stores about 2x more,
        which only the forecasts before the first stored state do not know)."""
        if self._nbytes is None:
            pruner = TokenPruner(self.family.denoiser(self.pipe), PrunePlan.dense(self.steps), policy=self.policy,
                                 seed=0, reuse=self.reuse, text_protect=self.text_protect,
                                 guidance=self.guidance if self.cfg else None, select_from=self.select_from,
                                 family=self.family)
            try:  # shapes only: no memory on the meta device (an SD3 state of 4 prompts is GBs)
                st = pruner.begin(self.geometry, torch.device("meta"), self.start.dtype)
            except (RuntimeError, NotImplementedError):
                st = pruner.begin(self.geometry, self.start.device, self.start.dtype)
            st.prev_noise = torch.cat([self.start, self.start]) if self.cfg else self.start  # set after a step
            self._nbytes = _state_bytes(self.start, st) + _tensor_bytes(vars(self._scheduler))
        return self._nbytes

    # ---- snapshots ---------------------------------------------------------------------------
    def _longest_prefix(self, policy: str, key: tuple) -> tuple[int, _Snapshot | None]:
        for s in range(len(key), 0, -1):
            snap = self._snapshots.get((policy, key[:s]))
            if snap is not None:
                self._snapshots.move_to_end((policy, key[:s]))
                return s, snap
        return 0, None

    def _store(self, policy: str, prefix: tuple, latents: torch.Tensor, pruner: TokenPruner, sched: Any) -> None:
        if not prefix or self.snapshot_bytes <= 0 or (policy, prefix) in self._snapshots:
            return
        nbytes = _state_bytes(latents, pruner.state) + _tensor_bytes(vars(sched))
        self._nbytes = nbytes
        self._held, ok = _admit(self._snapshots, self._held, self.snapshot_bytes, (policy, prefix), nbytes,
                                lambda snap: snap.nbytes)
        if not ok:
            return  # too large, or everything held is worth more than this one
        self._snapshots[(policy, prefix)] = _Snapshot(
            latents=latents.clone(), state=_clone_state(pruner.state), policy=copy.deepcopy(pruner.policy),
            scheduler=copy.deepcopy(sched), nbytes=nbytes,
        )
        self._held += nbytes

    def _victim(self, warmup_len: int | None) -> tuple | None:
        """The snapshot to evict, or None to not store the new one (:func:`_pick_victim`)."""
        return _pick_victim(self._snapshots, warmup_len)

    def clear(self) -> None:
        """Drop every stored snapshot (frees their memory)."""
        self._snapshots.clear()
        self._held = 0

    # ---- decoding ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Any:
        """(P, H, W, 3) float images in [0, 1] as the pipeline's ``output_type="np"`` would return."""
        return self.family.decode(self.pipe, latents)
