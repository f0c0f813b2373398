"""The drop-in transformer: walks the denoising loop and runs each step's bucket engine.

:func:`load` verifies an export directory and returns an :class:`EngineTransformer`, an
``nn.Module`` with ``.config``, ``.dtype`` and ``.device`` that replaces ``pipe.transformer``
in a diffusers ``StableDiffusion3Pipeline``. :func:`attach` / :func:`detach` do the swap and
keep the step loop in sync with ``pipe.scheduler``.

There is one step loop in tokprune: :class:`tokprune.pruning.sampler.TokenPruner` (plan walking,
selection policy, text pruning, caches, previous prediction). The runtime reuses it with an
:class:`EngineExecutor` — the executor runs one bucket call through a runner
(:mod:`tokprune.export.runners`) and writes the fresh rows into the run's caches. Selection and
cache updates are torch ops on the run's device between engine calls: no host sync.

Concurrency: engines (runners) are shared; run state is per view. Each pipeline gets its own
view (:func:`attach` makes one with :meth:`EngineTransformer.share` when the runtime is already
attached elsewhere), so two pipelines on one loaded runtime generate concurrently and correctly.
One view used by two generations at once (two threads on the same transformer object) is
refused with :class:`RuntimeBusyError`.

Example::

    import torch
    from tokprune import runtime
    from tokprune.models import load_pipeline

    pipe = load_pipeline("sd3-tiny")
    runtime.attach(pipe, "engines/sd3-tiny-64x64-s8-b0.5", backend="onnxruntime")
    image = pipe("a red circle", num_inference_steps=8, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    runtime.detach(pipe)      # pipe.transformer is the original module again
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokprune.export.runners.base import Runner
from tokprune.export.spec import RUNTIME_BACKENDS, Backend, BucketSpec, bucket_key
from tokprune.pruning.family import get_family
from tokprune.pruning.forward import StepOutput, scatter_rows
from tokprune.pruning.plan import PrunePlan
from tokprune.pruning.sampler import RunState, StepInputs, TokenPruner, scheduler_steps
from tokprune.runtime.caches import PooledCachePruner
from tokprune.runtime.prompt import PromptStageRunner
from tokprune.runtime.layout import (
    LoadedEngines,
    RunnerFactory,
    build_runners,
    check_cuda_graphs,
    default_layout,
    graph_for,
)
from tokprune.runtime.verify import (
    check_fingerprint,
    rebuild_command,
    transformer_config,
    verify_export,
)

from tokprune.errors import (
    BackendUnavailableError,
    ConfigError,
    ManifestError,
    ShapeError,
    TokpruneError,
)

logger = logging.getLogger(__name__)

__all__ = ["EngineExecutor", "EngineTransformer", "RuntimeBusyError", "attach", "detach", "load"]

_ORIGINAL = "_tokprune_runtime_original"


class RuntimeBusyError(TokpruneError, RuntimeError):
    """A second generation started on a runtime view while another one is in flight."""


# ---- the executor -------------------------------------------------------------------------------
class EngineExecutor:
    """``(pruner, run_state, StepInputs) -> StepOutput`` through the bucket runners.

    Picks the runner of the step's bucket (K image, K_txt text tokens), feeds it the step's
    tensors, the run's caches (bound as they are: no copy) and the previous prediction, then
    scatters the fresh cache rows into ``run_state.caches`` on the device. Calls whose batch is
    a multiple of the engines' batch run in chunks of it (``num_images_per_prompt > 1``).

    A step whose ``StepInputs.record_text`` is set (the sampler sets it only at
    ``plan.probe_steps()``) runs the dense bucket's probe variant (``<dense key>-probe``, which also
    outputs ``text_mass``); every other dense step runs the plain dense bucket.

    ``write_caches=False`` (the dense-only mode) skips cache updates: no pruned step reads them.
    ``timer``: optional object with ``begin(key)`` / ``end()`` around each engine call (benchmarks).
    """

    def __init__(self, engines: LoadedEngines, *, write_caches: bool = True) -> None:
        self.engines = engines
        self.write_caches = write_caches
        self.timer: Any = None

    @classmethod
    def over(cls, runners: Mapping[str, Any], *, write_caches: bool = True) -> EngineExecutor:
        """An executor over activated runners (bucket key -> runner) made without an export directory (benchmarks)."""
        from types import SimpleNamespace

        return cls(SimpleNamespace(runners=dict(runners), lock=threading.Lock(), manifest=None, prompt_stage=None),  # type: ignore[arg-type]
                   write_caches=write_caches)

    def __call__(self, pruner: TokenPruner, st: RunState, inputs: StepInputs) -> StepOutput:
        eng = self.engines
        g = st.geometry
        keep = inputs.img_idx.shape[1]
        keep_text = g.text_tokens if inputs.txt_idx is None else inputs.txt_idx.shape[1]
        want_mass = inputs.record_text
        key = bucket_key(keep, keep_text, probe=want_mass, cached=inputs.cached)
        runner = eng.runners.get(key)
        if runner is None and want_mass:
            raise ManifestError(
                f"step {st.step} must measure text importance (text pruning follows) but the export has no probe "
                f"bucket {key} (the dense bucket with a 'text_mass' output); buckets are {sorted(eng.runners)}. "
                f"Re-export: {rebuild_command(eng.manifest)}"
            )
        if runner is None:
            raise ShapeError(
                f"step {st.step} needs bucket {key} (K={keep} image, {keep_text} text tokens) but the export has "
                f"{sorted(eng.runners)}; the plan and the engines disagree: re-export with {rebuild_command(eng.manifest)}"
            )
        spec = runner.spec
        dt = spec.precision.torch_dtype
        feed: dict[str, torch.Tensor] = {
            "latent": inputs.latent.to(dt),
            "timestep": inputs.timestep.to(torch.float32),
            "img_idx": inputs.img_idx.to(torch.int64),
        }
        takes = set(spec.input_names())
        for name, x in self._conditions(st, inputs).items():  # the family's conditioning inputs
            if name in takes:
                feed[name] = x.to(dt) if x.is_floating_point() else x
        if spec.prunes_text:
            feed["txt_idx"] = inputs.txt_idx.to(torch.int64)
        if "prev_noise" in takes:
            feed["prev_noise"] = st.prev_noise.to(dt)
        for t in spec.inputs():  # the caches this bucket reads (the family's bucket_caches)
            if t.cache is not None:
                feed[t.name] = st.caches[t.cache]
        eb, b = spec.geometry.batch, g.batch
        noises, masses = [], []
        for c in range(b // eb):
            part = slice(c * eb, (c + 1) * eb)
            chunk = feed if eb == b else {n: x[part] for n, x in feed.items()}
            if runner.aliases_outputs:
                with eng.lock:  # outputs live in shared buffers until consumed below
                    noise, mass = self._call(runner, spec, chunk, st, inputs, part, want_mass, key)
            else:
                noise, mass = self._call(runner, spec, chunk, st, inputs, part, want_mass, key)
            noises.append(noise)
            masses.append(mass)
        noise = noises[0] if len(noises) == 1 else torch.cat(noises, dim=0)
        text_mass = None
        if want_mass:
            text_mass = masses[0] if len(masses) == 1 else torch.cat(masses, dim=0)
        return StepOutput(noise=noise, fresh={}, text_mass=text_mass)

    def _conditions(self, st: RunState, inputs: StepInputs) -> Mapping[str, torch.Tensor]:
        """The bucket conditions of this step: the call's, or (exports with a prompt stage) what the stage
        made from them at the run's first step, computed once per run (chunked by the engines' batch)."""
        stage = self.engines.prompt_stage
        if stage is None:
            return inputs.conditions
        if st.prepared is None:
            eb, b = self.engines.geometry.batch, st.geometry.batch
            parts = [stage({n: x[c * eb:(c + 1) * eb] for n, x in inputs.conditions.items()}) for c in range(b // eb)]
            st.prepared = {n: torch.cat([p[n] for p in parts]) for n in parts[0]} if len(parts) > 1 else parts[0]
        rest = {n: x for n, x in inputs.conditions.items() if n not in stage.input_names}
        return {**rest, **st.prepared}

    def _call(
        self,
        runner: Runner,
        spec: BucketSpec,
        feed: Mapping[str, torch.Tensor],
        st: RunState,
        inputs: StepInputs,
        part: slice,
        want_mass: bool,
        key: str,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        timer = self.timer
        if timer is not None:
            timer.begin(key)
        out = runner.infer(feed)
        alias = runner.aliases_outputs
        noise = out["noise"].to(inputs.latent.dtype, copy=alias)  # (b, C, H, W), owned by the caller
        mass = None
        if want_mass:
            mass = out["text_mass"].clone() if alias else out["text_mass"]
        if self.write_caches and st.caches:
            idx = inputs.img_idx[part]
            whole = get_family(st.geometry.family).cache_update == "whole"  # U-Nets: it replaces the cache
            for t in spec.outputs():
                if t.cache is None:
                    continue
                dst = st.caches[t.cache][part]
                if spec.dense or whole:  # the dense step's img_idx is arange(N): rows are in token order
                    dst.copy_(out[t.name])
                else:
                    scatter_rows(dst, idx, out[t.name], inplace=True)
        if timer is not None:
            timer.end()
        return noise, mass


# ---- the module ---------------------------------------------------------------------------------
class EngineTransformer(torch.nn.Module):
    """A diffusers-compatible transformer that runs the exported bucket engines.

    Not built directly: use :func:`load` (or :func:`attach`). Attributes the pipeline reads:
    ``config`` (the exported transformer's config), ``dtype`` (the engines' precision), ``device``.

    Args (via :func:`load`) that matter: ``pruned`` (False runs the dense bucket at every step —
    the dense baseline of the same backend). Views made with :meth:`share` share the engines and
    have their own run state.
    """

    def __init__(self, engines: LoadedEngines, *, pruned: bool = True, scheduler: Any = None) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self._engines = engines
        self.pruned = bool(pruned)
        self.config = FrozenDict(engines.config)
        plan = engines.plan if self.pruned else PrunePlan.dense(engines.steps)
        self.executor = EngineExecutor(engines, write_caches=self.pruned)
        self._pruner = PooledCachePruner(
            None,  # no module: the executor runs the engines
            plan,
            policy=engines.policy,
            reuse=engines.reuse,
            scheduler=scheduler,
            executor=self.executor,
            config=engines.config,
            family=engines.geometry.family,
            cache_dtype=engines.dtype,
            use_caches=self.pruned,
            # A bare call with an even batch is [uncond; cond] as calibrated; attach() reads the pipeline's call.
            guidance=float(engines.manifest.data["guidance"]) if float(engines.manifest.data.get("guidance", 1.0)) > 1.0 else None,
        )
        self._guard = threading.Lock()
        self._owner: threading.Thread | None = None
        self._in_flight = False
        for name, value in self._pruner.family.engine_attributes(self.config).items():
            object.__setattr__(self, name, value)  # what the family's pipelines read on the denoiser (SDXL)

    # ---- what the pipeline reads ------------------------------------------------------------
    @property
    def family(self) -> Any:
        """The model family of the exported denoiser (:class:`~tokprune.pruning.family.ModelFamily`)."""
        return self._pruner.family

    @property
    def dtype(self) -> torch.dtype:
        return self._engines.dtype

    @property
    def device(self) -> torch.device:
        return self._engines.device

    @property
    def backend(self) -> Backend:
        return self._engines.backend

    @property
    def manifest(self) -> Any:
        return self._engines.manifest

    @property
    def plan(self) -> PrunePlan:
        return self._pruner.plan

    @property
    def scheduler(self) -> Any:
        return self._pruner.scheduler

    @property
    def calls(self) -> int:
        """Engine calls made by this view (reuse steps make none)."""
        return self._pruner.calls

    @property
    def runners(self) -> dict[str, Runner]:
        return dict(self._engines.runners)

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend.value}, device={self.device}, pruned={self.pruned}, "
            f"buckets={sorted(self._engines.runners)}, dir={self._engines.directory}"
        )

    # ---- views and state ------------------------------------------------------------------
    def share(self, *, pruned: bool | None = None) -> EngineTransformer:
        """A new view on the same engines with its own run state (one per concurrent pipeline)."""
        return EngineTransformer(self._engines, pruned=self.pruned if pruned is None else pruned)

    def bind_scheduler(self, scheduler: Any) -> None:
        """Follow ``scheduler.step_index`` (what :func:`attach` does). None: count calls instead."""
        self._pruner.scheduler = scheduler

    def bind_pipeline(self, pipe: Any) -> None:
        """Read CFG and special tokens from ``pipe``'s calls (what :func:`attach` does); None unbinds."""
        family = self._pruner.family
        old = self._pruner.pipeline
        if old is not None:
            family.unbind_pipeline(old)
        self._pruner.pipeline = pipe
        self._pruner.call_text_protect = None
        if pipe is not None:
            family.bind_pipeline(pipe, self._pruner)

    def reset(self) -> None:
        """Forget the current run (after an aborted generation) and release this view."""
        with self._guard:
            self._pruner.reset()
            self._in_flight = False
            self._owner = None

    def close(self) -> None:
        """Deactivate every runner (all views of these engines stop working)."""
        self._engines.close()

    # ---- the call ----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The exported denoiser's forward, with its own signature (the model family parses it)."""
        if self._engines.closed:
            raise BackendUnavailableError("this runtime was closed; load it again with tokprune.runtime.load(...)")
        geometry, call = self._pruner.family.parse_call(self.config, args, kwargs)
        self._check_call(geometry)
        starts = self._enter(call.timestep)
        try:
            out = self._pruner(*args, **kwargs)
        except BaseException:
            self._abort()
            raise
        self._leave(starts)
        return out

    def _check_call(self, call: Any) -> None:
        """Refuse a resolution, text length or batch the engines were not built for (before any work)."""
        eng = self._engines
        g = eng.geometry
        data = eng.manifest.data
        problems = []
        hw = tuple(call.latent_hw)
        if hw != tuple(g.latent_hw):
            scale = data["height"] // g.latent_hw[0]
            problems.append(
                f"resolution: got {hw[0] * scale}x{hw[1] * scale} px (latent {hw[0]}x{hw[1]}), the engines were built "
                f"for {data['height']}x{data['width']} px (latent {g.latent_hw[0]}x{g.latent_hw[1]}); call the pipeline "
                f"with height={data['height']}, width={data['width']}"
            )
        if call.text_tokens != g.text_tokens:
            built = _built_text_length(data)
            fix = "" if built is None else f"; call the pipeline with max_sequence_length={built}"
            problems.append(f"text tokens: got {call.text_tokens}, the engines take {g.text_tokens}{fix}")
        b = call.batch
        if b % g.batch:
            problems.append(
                f"batch: got {b} latents, the engines take batches of {g.batch} (calibrated with guidance "
                f"{data['guidance']:g}: {'2 per image with CFG' if g.batch % 2 == 0 else '1 per image'}); use a "
                f"guidance_scale {'> 1' if g.batch % 2 == 0 else '<= 1'} and a multiple of "
                f"{max(1, g.batch // 2) if g.batch % 2 == 0 else g.batch} images"
            )
        if problems:
            raise ShapeError(
                f"the runtime in {eng.directory} cannot run this call: " + "; ".join(problems)
                + f". Or build engines for it: {_rebuild_for(eng.manifest, call)}"
            )

    def _enter(self, timestep: torch.Tensor | None = None) -> bool:
        """Claim this view for the calling thread; returns whether this call starts a new run."""
        me = threading.current_thread()
        with self._guard:
            if self._in_flight and self._owner is not me and self._owner is not None and self._owner.is_alive():
                raise RuntimeBusyError(
                    f"this runtime view is generating in thread {self._owner.name!r} (step "
                    f"{getattr(self._pruner.state, 'step', '?')} of {self.plan.num_steps}); a second generation cannot "
                    f"share its caches. Give each pipeline its own view: tokprune.runtime.attach(pipe, runtime) "
                    f"(shares the engines), or runtime.share()"
                )
            starts = self._starts_run(timestep)
            if starts:
                self._check_steps()
                self._pruner.reset()
            self._owner, self._in_flight = me, True
            return starts

    def _starts_run(self, timestep: torch.Tensor | None = None) -> bool:
        st = self._pruner.state
        sched = self._pruner.scheduler
        if sched is not None and hasattr(sched, "step_index"):
            idx = sched.step_index
            return idx is None or int(idx) == 0
        # no scheduler, or one without a step index (DDIM, PNDM: SD1.5's): count calls as the step loop does,
        # a call at the scheduler's first timestep starts a new run
        return st is None or st.step >= self.plan.num_steps or self._pruner._restarted(timestep)

    def _check_steps(self) -> None:
        n = scheduler_steps(self._pruner.scheduler)
        if n is not None and n != self.plan.num_steps:
            from tokprune.export.command import export_command

            data = self._engines.manifest.data
            raise ConfigError(
                f"the pipeline runs {int(n)} denoising steps but the engines in {self._engines.directory} were scheduled "
                f"for {self.plan.num_steps}; call it with num_inference_steps={self.plan.num_steps}, or build engines "
                f"for {int(n)} steps: {export_command(data, steps=int(n))}"
            )

    def _leave(self, starts: bool) -> None:
        st = self._pruner.state
        if st is None or st.step >= self.plan.num_steps:
            with self._guard:
                self._in_flight = False
                self._owner = None

    def _abort(self) -> None:
        with self._guard:
            self._pruner.reset()
            self._in_flight = False
            self._owner = None


def _built_text_length(data: Mapping[str, Any]) -> int | None:
    """The text-length setting (``max_sequence_length``) the engines were exported for, when recorded."""
    value = (data.get("export_config") or {}).get("max_sequence_length")
    return None if value is None else int(value)


def _rebuild_for(manifest: Any, call: Any) -> str:
    """The ``tokprune-export`` command whose engines would take this call (size, text length)."""
    data = manifest.data
    g = manifest.geometry
    scale = data["height"] // g.latent_hw[0]
    h, w = call.latent_hw[0] * scale, call.latent_hw[1] * scale
    built = _built_text_length(data)
    text = None if built is None else built + call.text_tokens - g.text_tokens
    from tokprune.export.command import export_command

    return export_command(data, height=h, width=w, max_sequence_length=text)


# ---- entry points -------------------------------------------------------------------------------
def load(
    engine_dir: str | Path,
    backend: Backend | str = "onnxruntime",
    device: torch.device | str | None = None,
    *,
    pruned: bool = True,
    model: torch.nn.Module | None = None,
    compile: bool = False,
    threads: int | None = None,
    spin: bool = False,
    cuda_graphs: bool = False,
    layout: str | None = None,
    check_files: bool = True,
    runner_factory: RunnerFactory | None = None,
) -> EngineTransformer:
    """Verify an export directory and return the transformer that runs its engines.

    Args that matter:
        engine_dir: a ``tokprune-export`` output directory (``manifest.json`` inside).
        backend: ``"onnxruntime"`` (CPU or CUDA), ``"tensorrt"`` (GPU, built engines), or ``"torch"``
            (the PyTorch pruned forward, eagerly: the reference; needs the model).
        device: ``"cpu"`` / ``"cuda"``; default: CUDA for TensorRT, CPU otherwise.
        pruned: False runs the dense bucket at every step (the same backend's dense baseline).
    Args to tinker with:
        model: the PyTorch transformer for ``backend="torch"`` (default: load the manifest's model).
        compile: ``torch.compile`` each bucket (``backend="torch"``).
        threads: ONNX Runtime intra-op threads; ``spin``: they spin-wait while a run is in flight (faster
            small buckets at 2+ threads on a dedicated host, slower on a busy shared one; off by default).
            ``cuda_graphs``: replay a CUDA graph per bucket (torch and
            tensorrt backends, CUDA only; :mod:`tokprune.export.runners.cuda_graphs`).
        layout: ``"single"`` (the export's one dynamic-K graph / engine, weights loaded once) or
            ``"per-bucket"`` (one static graph / engine per bucket); default: :func:`default_layout`.
        check_files: re-hash every file against the manifest (recommended; seconds for big exports).
        runner_factory: ``factory(spec, manifest) -> Runner`` (inactive) for every bucket instead of the
            backend's own runners (the public hook for a backend of your own: :mod:`tokprune.export.runners`);
            ``backend`` still chooses what is verified.

    Raises :class:`ManifestError` (mismatched or corrupted export, wrong model),
    :class:`BackendUnavailableError` (backend or device missing), each saying what differs and the
    command that rebuilds.

    Example::

        rt = tokprune.runtime.load("engines/sd3-tiny-64x64-s8-b0.5", backend="onnxruntime")
        pipe.transformer = rt; rt.bind_scheduler(pipe.scheduler)      # or tokprune.runtime.attach(pipe, rt)
    """
    backend = Backend.parse(backend, choices=RUNTIME_BACKENDS)
    if device is None:
        device = "cuda" if backend is Backend.TENSORRT else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device} requested but no CUDA GPU is visible; use device='cpu'")
    if backend is Backend.TENSORRT and device.type != "cuda":
        raise BackendUnavailableError("the tensorrt backend runs on a CUDA device only; pass device='cuda'")
    manifest = verify_export(engine_dir, backend, check_files=check_files)
    specs = manifest.bucket_specs()
    schedule = manifest.schedule()
    plan = schedule.to_plan()
    config = transformer_config(manifest)
    dense_key = bucket_key(manifest.geometry.num_tokens, manifest.geometry.text_tokens)
    if dense_key not in specs:
        raise ManifestError(f"{engine_dir}: the export has no dense bucket {dense_key}; re-export: {rebuild_command(manifest)}")
    probe_key = None
    if plan.probe_steps():
        probe_key = bucket_key(manifest.geometry.num_tokens, manifest.geometry.text_tokens, probe=True)
        if probe_key not in specs or not specs[probe_key].record_text:
            raise ManifestError(
                f"{engine_dir}: the schedule prunes text tokens, which needs the dense probe bucket {probe_key} (the "
                f"dense call plus a 'text_mass' output) to rank them at steps {list(plan.probe_steps())}, but the "
                f"export has only {sorted(specs)}; re-export: {rebuild_command(manifest)}"
            )
    if model is not None:
        check_fingerprint(manifest, model, "the model passed to load()")
    check_cuda_graphs(cuda_graphs, backend, device)
    layout = default_layout(manifest, backend, device) if layout is None else layout
    graph = graph_for(manifest, specs, layout, backend)
    runners = build_runners(manifest, specs, backend, device, graph=graph, model=model, compile=compile,
                            threads=threads, spin=spin, cuda_graphs=cuda_graphs, runner_factory=runner_factory)
    engines = LoadedEngines(
        directory=Path(engine_dir),
        manifest=manifest,
        backend=backend,
        device=device,
        specs=specs,
        runners=runners,
        config=config,
        schedule=schedule,
        plan=plan,
        policy=str(manifest.data.get("policy") or schedule.policy),
        reuse=manifest.reuse,
        dense_key=dense_key,
        probe_key=probe_key,
        prompt_stage=PromptStageRunner.from_manifest(manifest, device, threads),  # None unless the family has one
    )
    logger.info("loaded %d %s buckets from %s on %s", len(runners), backend.value, engine_dir, device)
    return EngineTransformer(engines, pruned=pruned)


def attach(
    pipe: Any,
    engines: EngineTransformer | str | Path,
    *,
    backend: Backend | str = "onnxruntime",
    device: torch.device | str | None = None,
    **load_kwargs: Any,
) -> EngineTransformer:
    """Make ``pipe`` run the engines: swap its denoiser (``pipe.transformer``; ``pipe.unet`` for SD1.5 / SDXL
    U-Nets: the family's ``denoiser_attr``), wire the scheduler.

    ``engines``: an export directory (loaded with ``backend`` / ``device`` / ``load_kwargs``) or a loaded
    runtime; a runtime already serving another pipeline is shared through a new view, so several
    pipelines can use one set of engines at once. The pipeline's own transformer, if any, must have
    the export's architecture fingerprint. Idempotent; :func:`detach` restores the original.
    Returns the view now in ``pipe.transformer``.
    """
    from tokprune.pruning.family import all_families

    attrs = sorted({f.denoiser_attr for f in all_families().values()})
    if not (any(hasattr(pipe, a) for a in attrs) and hasattr(pipe, "scheduler")):
        raise ConfigError(
            f"attach expects a diffusers pipeline with a scheduler and a denoiser ({' or '.join(attrs)}: "
            f"StableDiffusion3Pipeline, PixArtSigmaPipeline, StableDiffusion(XL)Pipeline), got {type(pipe).__name__}"
        )
    detach(pipe)
    if isinstance(engines, EngineTransformer):
        view = engines
        if view.scheduler is not None and view.scheduler is not pipe.scheduler:
            view = view.share()
    else:
        view = load(engines, backend=backend, device=device, **load_kwargs)
    attr = view.family.denoiser_attr  # pipe.transformer, or pipe.unet for U-Net families
    original = getattr(pipe, attr, None)
    if original is not None:
        check_fingerprint(view.manifest, original, f"the pipeline's {attr}")
    recorded = view.manifest.data.get("scheduler", {}).get("class")
    if recorded and type(pipe.scheduler).__name__ != recorded:
        logger.warning(
            "the pipeline's scheduler is %s but the schedule was calibrated with %s; the engines run, but the "
            "per-step keep counts were chosen for the other sampler", type(pipe.scheduler).__name__, recorded,
        )
    view.bind_scheduler(pipe.scheduler)
    view.bind_pipeline(pipe)
    object.__setattr__(view, _ORIGINAL, original)  # plain attribute, not a registered submodule
    setattr(pipe, attr, view)
    return view


def detach(pipe: Any) -> None:
    """Undo :func:`attach`: ``pipe.transformer`` is the original module again (no-op if not attached)."""
    from tokprune.pruning.family import all_families

    attrs = sorted({f.denoiser_attr for f in all_families().values()})
    attr = next((a for a in attrs if isinstance(getattr(pipe, a, None), EngineTransformer)), None)
    current = None if attr is None else getattr(pipe, attr)
    if isinstance(current, EngineTransformer):
        original = current.__dict__.get(_ORIGINAL)
        current.bind_scheduler(None)
        current.bind_pipeline(None)
        current.__dict__.pop(_ORIGINAL, None)
        setattr(pipe, attr, original)
