"""``export_model(config)``: calibrate (or load a schedule), export every bucket, write the manifest.

The steps, each a small callable from its own module:

1. validate the arguments and, for ``--backend tensorrt``, refuse at once without TensorRT + GPU;
2. resolve and load the model; settle height / width / steps / guidance; pick the directory;
3. refuse an existing directory made with another configuration (unless ``force``);
4. calibrate (:func:`tokprune.calibrate.calibrate`) or load ``--schedule``;
5. per bucket: trace to ONNX (:mod:`.onnx_export`), move its weights into the shared
   ``weights.bin`` (:mod:`.weights`), ``onnx.checker``, TensorRT lint (:mod:`.lint`), ONNX Runtime
   vs PyTorch (:mod:`.ort`);
6. write ``manifest.json`` (:mod:`.manifest`); build engines when TensorRT and a GPU are here
   (:mod:`.tensorrt`);
7. rename the temporary sibling directory into place.

Atomic and resumable: everything is written into ``.<name>.partial/`` next to the target, with a
small state file recording the configuration, the schedule, the weight index and each finished
bucket's file hash. An interrupted export leaves no ``manifest.json`` at the target; re-running the
same command reuses every finished bucket whose file still hashes as recorded.

Example::

    from tokprune.export.exporter import ExportConfig, export_model
    result = export_model(ExportConfig(model="sd3-tiny", budget=0.5, steps=8))
    result.directory, result.engines_built, result.message
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tokprune.export import outdir
from tokprune.export.config import (
    DEFAULT_STEPS,
    ExportConfig,
    ExportResult,
    load_schedule_file,
    max_sequence_length,
    policy_for,
    settle,
)
from tokprune.export.checks import check_calibration_inputs, checkpoint_kwargs, precheck
from tokprune.export.errors import DiskFullError, ExportError
from tokprune.export.manifest import (
    FORMAT,
    SCHEMA_VERSION,
    file_entry,
    load_manifest,
    sha256_file,
    utc_now,
    verify,
    write_manifest,
)
from tokprune.export.onnx_export import cast_for_export, export_bucket_onnx, finalize_onnx
from tokprune.export.spec import PROBE_SUFFIX, Backend, BucketSpec, Precision, geometry_to_dict
from tokprune.export.weights import WEIGHTS_FILE, SharedWeights

import tokprune
from tokprune.errors import ConfigError, ScheduleError, ShapeError
from tokprune.pruning.family import family_for
from tokprune.fsutil import atomic_write_json, check_output_dir, replace_dir

logger = logging.getLogger(__name__)

__all__ = ["ExportConfig", "ExportResult", "bucket_specs", "default_out_dir", "export_model", "partial_dir"]

STATE_FILE = ".export-state.json"
CALIBRATION_DIR = "calibration"  # inside the work directory: measured rollouts, reused by a re-run
SCHEDULE_FILE = "schedule.json"
def default_out_dir(model_name: str, height: int, width: int, steps: int, budget: float, root: str | Path = "engines") -> Path:
    """``engines/<model>-<H>x<W>-s<S>-b<B>`` (hub ids: ``/`` becomes ``--``)."""
    safe = model_name.replace("/", "--")
    return Path(root) / f"{safe}-{height}x{width}-s{steps}-b{budget:g}"


def partial_dir(out_dir: Path) -> Path:
    """The temporary sibling an export is built in before it is renamed into place."""
    out_dir = outdir.resolve_out(out_dir)
    return out_dir.parent / f".{out_dir.name}.partial"


# ---- helpers ------------------------------------------------------------------------------------------
def _versions() -> dict[str, Any]:
    from tokprune.environment import versions

    return versions("diffusers", "onnx", "onnxruntime", "tensorrt")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, (tuple, set)) else str(v)))


def _write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_json(path, data, indent=1)


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} (existing) vs {b.get(k)!r} (requested)" for k in keys if a.get(k) != b.get(k)]


def _enospc(exc: BaseException) -> OSError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _dense_weight_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- the export ---------------------------------------------------------------------------------------
def export_model(
    config: ExportConfig,
    out_dir: str | Path | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> ExportResult:
    """Run the whole export described in the module docstring. See :class:`ExportConfig`.

    Raises :class:`~tokprune.errors.ConfigError` (bad arguments, directory exists with another
    configuration), :class:`~tokprune.errors.ModelNotFoundError`, :class:`BackendUnavailableError`
    (``--backend tensorrt`` without TensorRT + GPU, before any work), :class:`ExportError`,
    :class:`DiskFullError` (the partial export is kept; free space and re-run to resume).
    """
    from tokprune.export import tensorrt as trt

    from tokprune.models import load_pipeline, resolve_model

    start = time.perf_counter()
    source = resolve_model(config.model)  # unknown names fail here, before anything is loaded
    precheck(config, out_dir, force)  # bad --out / --policy / --prompts fail before the model loads
    if config.backend is Backend.TENSORRT:  # fail fast, before loading or writing anything
        where = out_dir
        if where is None and config.height and config.width and config.budget is not None:
            where = default_out_dir(source.name, config.height, config.width, config.steps or DEFAULT_STEPS, config.budget)
        trt.require_tensorrt(where or "DIR")
    work: Path | None = None
    made_work, held = False, None
    try:
        pipe = load_pipeline(config.model)
        schedule_in = None
        if config.schedule_file is not None:
            from tokprune.models import fingerprint

            schedule_in = load_schedule_file(config, pipe, fingerprint(family_for(pipe).denoiser(pipe)))
        settings = settle(config, pipe, schedule_in)
        out = outdir.resolve_out(out_dir) if out_dir is not None else default_out_dir(
            source.name, settings["height"], settings["width"], settings["steps"], settings["budget"]
        )
        identity = _identity(config, source, pipe, settings, schedule_in)
        if schedule_in is None:
            check_calibration_inputs(config, pipe, settings, max_sequence_length(config, pipe))
        check_output_dir(out, flag="--out")
        held = outdir.lock(out, command=command or "").acquire()  # a second export into `out` is refused
        existing = _check_existing(out, identity, force=force)
        if existing is not None:
            if config.backend is not Backend.ONNX and not existing.engines_built and trt.availability()[0]:
                trt.build_engines(out, progress=progress)  # exported earlier on a host without TensorRT
                existing.manifest = load_manifest(out).data
                existing.engines_built = True
                existing.message = f"{out} was up to date; built its TensorRT engines"
            existing.seconds = time.perf_counter() - start
            return existing
        work = partial_dir(out)
        made_work = not work.exists()
        state = _open_state(work, identity)
        result = _export_into(work, state, config, source, pipe, settings, schedule_in, progress=progress, command=command)
        _finalize(work, out)
        result.directory = out
        result.message = result.message.replace(str(work), str(out))
        result.seconds = time.perf_counter() - start
        return result
    except Exception as exc:
        if made_work and work is not None and isinstance(exc, (ConfigError, ShapeError, ScheduleError)):
            shutil.rmtree(work, ignore_errors=True)  # a refusal leaves nothing behind (made by this run)
        full = _enospc(exc)
        if full is not None:
            where = work if work is not None else Path(out_dir or ".")
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing the export ({full.filename or where}). The finished part is kept in "
                f"{where}; free some space (a bucket needs about one model's ONNX graph plus new weights) and re-run "
                f"the same command to resume",
            ) from exc
        raise
    finally:
        if held is not None:
            held.release()


def _identity(config: ExportConfig, source: Any, pipe: Any, settings: dict[str, Any], schedule: Any) -> dict[str, Any]:
    """Everything that determines the export's content; equal identity = reusable artifacts."""
    from tokprune.models import fingerprint

    prompts_sha = sha256_file(config.prompts_file) if config.prompts_file else None
    return {
        "tokprune": tokprune.__version__,
        "model": source.ref,
        "model_source": source.kind,
        "fingerprint": fingerprint(family_for(pipe).denoiser(pipe)),
        **settings,
        "max_buckets": config.max_buckets,
        "policy": policy_for(config, pipe),
        "prompts_sha256": prompts_sha,
        "num_prompts": config.num_prompts,
        "allow_reuse": config.allow_reuse,
        "schedule_sha256": schedule.content_hash if schedule is not None else None,
        "precision": config.precision.value,
        "max_sequence_length": max_sequence_length(config, pipe, schedule),
        "opset": config.opset,
        "seed": config.seed,
    }


def _check_existing(out: Path, identity: dict[str, Any], *, force: bool) -> ExportResult | None:
    """None when the export should run; an up-to-date result when ``out`` already holds it."""
    kind = outdir.check_replaceable(out, force=force)  # refuses a non-export directory, --force or not
    if kind != "export" or force:
        return None
    try:
        manifest = load_manifest(out)
    except Exception as exc:  # noqa: BLE001 - a damaged export: replace it only when asked
        raise ConfigError(
            f"output directory {out} holds a tokprune export whose manifest does not load ({exc}); pass --force to "
            f"replace it or choose another --out"
        ) from None
    previous = manifest.data.get("export_config", {})
    diff = _config_diff(previous, identity)
    if diff:
        raise ConfigError(
            f"output directory {out} already holds an export with a different configuration ({'; '.join(diff)}); "
            f"pass --force to replace it, or choose another --out"
        )
    problems = verify(out)
    if problems:
        raise ConfigError(
            f"output directory {out} holds this export but fails verification ({'; '.join(problems[:3])}); "
            f"pass --force to re-export it"
        )
    logger.info("%s already holds this export (verified); nothing to do", out)
    return ExportResult(out, manifest.data, manifest.has_engines, f"{out} is up to date; nothing was exported",
                        up_to_date=True)


def _open_state(work: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Resume ``work`` if it was started with the same identity, else start it afresh."""
    state_path = work / STATE_FILE
    if work.exists():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = None
        if state is not None and state.get("identity") == identity:
            logger.info("resuming the interrupted export in %s", work)
            return state
        logger.info("discarding %s (an interrupted export of another configuration)", work)
        outdir.discard_work(work, STATE_FILE)
    work.mkdir(parents=True)
    state = {"identity": identity, "schedule_sha256": None, "weights": None, "buckets": {}}
    _write_json_atomic(state_path, state)
    return state


def _export_into(
    work: Path,
    state: dict[str, Any],
    config: ExportConfig,
    source: Any,
    pipe: Any,
    settings: dict[str, Any],
    schedule_in: Any,
    *,
    progress: bool,
    command: str | None,
) -> ExportResult:
    """Schedule, buckets, manifest, engines, all inside ``work``; ``state`` records what is done."""
    from tokprune.export import tensorrt as trt
    from tqdm.auto import tqdm

    schedule = _schedule_step(work, state, config, source, pipe, settings, schedule_in, progress=progress)
    denoiser = family_for(pipe).denoiser(pipe)
    specs = bucket_specs(schedule, denoiser.config, config.precision)
    model = cast_for_export(denoiser, config.precision)
    store = SharedWeights(work / WEIGHTS_FILE, state.get("weights"))
    exported, reused = [], []
    bar = tqdm(specs, desc="export buckets", unit="bucket", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.key)
        done = state["buckets"].get(spec.key)
        if done is not None and _intact(work, done["onnx"]):
            reused.append(spec.key)
            continue
        state["buckets"][spec.key] = _export_bucket(work, spec, model, store, config)
        state["weights"] = store.state()
        _write_json_atomic(work / STATE_FILE, state)  # commit: this bucket survives an interruption
        exported.append(spec.key)
    bar.close()
    if _wants_graph(specs) and not _graph_done(work, state.get("graph"), specs):
        from tokprune.export.dynamic import export_graph_into  # one dynamic-K graph for all buckets (weights once)

        state["graph"] = export_graph_into(work, specs, model, store, opset=config.opset, seed=config.seed)
        state["weights"] = store.state()
        _write_json_atomic(work / STATE_FILE, state)
    stage = state.get("prompt_stage")
    if stage is None or not _intact(work, stage["file"]):
        from tokprune.export.prompt_stage import export_prompt_stage  # families with per-run conditions only

        state["prompt_stage"] = export_prompt_stage(
            work, model, specs[0].geometry, store, precision=config.precision, opset=config.opset, seed=config.seed
        )
        state["weights"] = store.state()
        _write_json_atomic(work / STATE_FILE, state)
    shutil.rmtree(work / "raw", ignore_errors=True)

    manifest = _manifest(work, state, config, source, pipe, schedule, specs, store, model, command)
    write_manifest(work, manifest)

    engines_built = False
    if config.backend is Backend.ONNX:
        message = f"ONNX export only (--backend onnx); build TensorRT engines later with: {trt.build_command(work)}"
    else:
        ok, why = trt.availability()
        if ok:
            trt.build_engines(work, progress=progress)
            manifest = load_manifest(work).data
            engines_built = True
            message = f"built {len(specs)} TensorRT engine(s) on {manifest['engines']['gpu']['name']}"
        else:
            message = (
                f"No TensorRT engines were built: {why}. The ONNX export is complete; build the engines on a GPU "
                f"host with TensorRT >= 10.9: {trt.build_command(work)}"
            )
    return ExportResult(work, manifest, engines_built, message, exported=exported, reused=reused)


def _wants_graph(specs: list[BucketSpec]) -> bool:
    """The dynamic graph (:mod:`.dynamic`) is exported when two or more buckets could share it (and the
    family's buckets can: :attr:`~tokprune.pruning.family.ModelFamily.dynamic_graph`)."""
    from tokprune.pruning.family import get_family

    if not specs or not get_family(specs[0].geometry.family).dynamic_graph:
        return False
    return sum(not s.record_text for s in specs) >= 2


def _graph_done(work: Path, entry: dict[str, Any] | None, specs: list[BucketSpec]) -> bool:
    """An interrupted run's graph is reused only if it serves exactly these buckets and re-hashes."""
    keys = [s.key for s in specs if not s.record_text]
    return entry is not None and [p["bucket"] for p in entry["profiles"]] == keys and _intact(work, entry["file"])


def _intact(directory: Path, entry: dict[str, Any]) -> bool:
    p = directory / entry["path"]
    return p.is_file() and p.stat().st_size == entry["size"] and sha256_file(p) == entry["sha256"]


def _schedule_step(work, state, config, source, pipe, settings, schedule_in, *, progress: bool):
    """The interrupted run's schedule, else ``--schedule``, else a fresh calibration; saved in ``work``."""
    from tokprune.calibrate.schedule import Schedule

    path = work / SCHEDULE_FILE
    recorded = state.get("schedule_sha256")
    if recorded and path.is_file() and sha256_file(path) == recorded:
        schedule = Schedule.load(path)
        logger.info("reusing the schedule of the interrupted run (%s)", schedule.key)
        return schedule
    if schedule_in is not None:
        schedule = schedule_in
    else:
        from tokprune.calibrate import calibrate
        from tokprune.calibrate.prompts import load_prompts

        prompts = load_prompts(config.prompts_file) if config.prompts_file else None
        logger.info("calibrating %s for budget %g (%d steps)", source.name, settings["budget"], settings["steps"])
        schedule = calibrate(
            pipe, budget=settings["budget"], steps=settings["steps"], prompts=prompts, height=settings["height"],
            width=settings["width"], guidance=settings["guidance"], max_buckets=config.max_buckets,
            policy=policy_for(config, pipe),
            num_prompts=config.num_prompts, seed=config.seed, max_sequence_length=max_sequence_length(config, pipe),
            allow_reuse=config.allow_reuse,
            model=config.model, progress=progress, **checkpoint_kwargs(calibrate, work / CALIBRATION_DIR),
        )
    schedule.save(path)
    shutil.rmtree(work / CALIBRATION_DIR, ignore_errors=True)  # the export's own checkpoints; the schedule holds them
    state["schedule_sha256"] = sha256_file(path)
    state["buckets"] = {}  # a new schedule invalidates buckets of an earlier one
    _write_json_atomic(work / STATE_FILE, state)
    return schedule


def bucket_specs(schedule: Any, transformer_config: Any, precision: Precision | str) -> list[BucketSpec]:
    """One :class:`BucketSpec` per schedule bucket (dense first). CFG (guidance > 1) doubles the batch.

    When the schedule prunes text, the dense bucket is followed by its probe variant
    (``record_text=True``, key ``<dense key>-probe``): the same call that also outputs
    ``text_mass``, the text importance the runtime ranks text tokens by. Only the steps in
    ``PrunePlan.probe_steps()`` run it; every other dense step runs the plain dense bucket.
    """
    batch = 2 if schedule.guidance > 1.0 else 1
    geometry = schedule.geometry(transformer_config, batch)
    probes = bool(schedule.to_plan().probe_steps())
    dense_key = schedule.dense_bucket.key
    specs = []
    for b in schedule.buckets:
        specs.append(BucketSpec(geometry, b.image_keep, b.text_keep, reuse=schedule.reuse, precision=precision,
                                cached=b.cached))
        if probes and b.key == dense_key:
            specs.append(BucketSpec(geometry, b.image_keep, b.text_keep, reuse=schedule.reuse, precision=precision,
                                    record_text=True))
    return specs


def _export_bucket(work: Path, spec: BucketSpec, model: torch.nn.Module, store: SharedWeights, config: ExportConfig) -> dict:
    """Trace, share weights, check (onnx.checker, TensorRT lint, ONNX Runtime vs PyTorch). Returns its state entry."""
    import onnx
    from tokprune.export.lint import lint_model
    from tokprune.export.equivalence import check_equivalence

    t0 = time.perf_counter()
    raw = work / "raw" / spec.key / "model.onnx"
    if raw.parent.exists():
        shutil.rmtree(raw.parent)
    exporter = export_bucket_onnx(model, spec, raw, opset=config.opset, seed=config.seed)
    proto = finalize_onnx(raw, spec)
    stats = store.externalize(proto)
    rel = f"{spec.key}.onnx"
    onnx.save_model(proto, str(work / rel))
    del proto
    shutil.rmtree(raw.parent)
    onnx.checker.check_model(str(work / rel))
    lint = [issue.to_dict() for issue in lint_model(work / rel)]
    equivalence = check_equivalence(model, spec, work / rel, seed=config.seed)
    if equivalence["status"] == "failed":
        raise ExportError(
            f"bucket {spec.key}: ONNX Runtime differs from PyTorch by {equivalence['worst']:.3g} "
            f"(tolerance {equivalence['tolerance']}); per output: {equivalence['max_abs']}"
        )
    store.sync()
    return {
        "onnx": file_entry(work, rel),
        "exporter": exporter,
        "export_seconds": round(time.perf_counter() - t0, 3),
        "lint": lint,
        "equivalence": equivalence,
        "weights": stats.to_dict(),
    }


def _manifest(work, state, config, source, pipe, schedule, specs, store, model, command) -> dict[str, Any]:
    from tokprune.calibrate.schedule import REUSE

    dense_bytes = _dense_weight_bytes(model)
    inline = sum(state["buckets"][s.key]["weights"]["inline_bytes"] for s in specs)
    stored = (work / WEIGHTS_FILE).stat().st_size + inline
    probe_steps = set(schedule.to_plan().probe_steps())  # these dense steps run the dense bucket's -probe variant
    step_buckets = [None if entry == REUSE else f"{entry}{PROBE_SUFFIX}" if s in probe_steps else entry
                    for s, entry in enumerate(schedule.plan)]
    buckets = []
    for spec in specs:
        done = state["buckets"][spec.key]
        buckets.append({
            **spec.to_dict(),
            "steps": [s for s, k in enumerate(step_buckets) if k == spec.key],
            "io": [t.to_dict() for t in spec.io()],
            "files": {"onnx": done["onnx"]},
            **{k: done[k] for k in ("exporter", "export_seconds", "lint", "equivalence", "weights")},
        })
    return {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "created_utc": utc_now(),
        "command": command or "",
        "versions": _versions(),
        "model": {"name": source.name, "source": source.kind, "ref": source.ref,
                  "fingerprint": state["identity"]["fingerprint"]},
        # The full architecture, so a runtime can rebuild .config and check the fingerprint without the weights.
        "transformer_config": json.loads(json.dumps(
            {k: v for k, v in dict(family_for(pipe).denoiser(pipe).config).items() if not k.startswith("_")}, default=list)),
        "height": schedule.height,
        "width": schedule.width,
        "steps": schedule.steps,
        "guidance": schedule.guidance,
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": _jsonable(dict(pipe.scheduler.config))},
        "budget": schedule.budget,
        "mac_fraction": schedule.mac_fraction,
        "precision": Precision.parse(config.precision).value,
        "reuse": schedule.reuse,
        "policy": schedule.policy,
        "opset": config.opset,
        "geometry": geometry_to_dict(specs[0].geometry),
        "schedule": {"file": file_entry(work, SCHEDULE_FILE), "embedded": schedule.to_dict()},
        "weights": {
            "file": file_entry(work, WEIGHTS_FILE),
            "tensors": len(store.index),
            "dense_weight_bytes": dense_bytes,
            "stored_bytes": stored,
            "ratio": round(stored / dense_bytes, 4) if dense_bytes else None,
        },
        "buckets": buckets,
        "step_buckets": step_buckets,
        "graph": state.get("graph") if _wants_graph(specs) else None,  # the single dynamic-K graph (export/dynamic.py)
        "prompt_stage": state.get("prompt_stage"),  # per-run conditions (export/prompt_stage.py), or None
        "engines": None,
        "export_config": state["identity"],
    }


def _finalize(work: Path, out: Path) -> None:
    """Drop the progress state and rename ``work`` to ``out`` (replacing it when forced)."""
    (work / STATE_FILE).unlink(missing_ok=True)
    for p in work.rglob("*"):  # temporary-file helpers create 0600 files; artifacts are for sharing
        if p.is_file():
            p.chmod(0o644)
    replace_dir(work, out)  # atomic swap (an old export goes only after the new one is in place); --out . too
