"""``tokprune-quality``: the comparison users will make, at equal transformer MACs, on the trained yardstick.

Rows (see :mod:`tokprune.yardstick.rows`): ``calibrated`` (default), ``cat`` (t0 chosen on the
calibration prompts), ``ras``, ``interleaved``, ``random`` (calibrated plan, random policy) at every
budget, plus diffusers' TaylorSeer / MagCache / first-block caches at several settings, placed by the
MACs they actually ran. Each is compared with the dense image of the same caption and seed (PSNR,
SSIM, per-object mask IoU, checker accuracy, latent error; :mod:`tokprune.yardstick.report`), and a
dense re-run with another batch split gives the noise floor.

Cost and resuming: captions run in chunks of ``--chunk`` (memory stays bounded); every finished
(row, chunk) is appended to ``OUT/.work/records.jsonl`` at once, so an interrupted run continues
where it stopped, and a later run with a larger ``--n`` only computes the new chunks. On a 2-core
CPU one dense 28-step ``shapes`` caption takes ~12 s; a row costs about its MAC fraction of that per
caption. ``--estimate`` measures one dense caption and prints the projected wall time, then stops.

Example::

    tokprune-quality --n 64 --out results/quality                      # the full comparison (hours on CPU)
    tokprune-quality --n 2 --budgets 0.3,0.5 --methods calibrated,cat --caches fbc:threshold=0.1 --out /tmp/q
    tokprune-quality --n 64 --estimate                                  # projected wall time only
    tokprune-quality --n 64 --report-only                               # rebuild quality.md/json/png from records
    tokprune-quality --device cuda --n 64 --chunk 16 --noise-n 16 --out /tmp/q64   # on a GPU (minutes)

Work order: dense references, the noise row and CAT@0.3 first, then every plan row at 0.5, 0.4, 0.6,
0.75, the rest of 0.3, then the diffusers caches (:func:`tokprune.yardstick.driver.phases`), with the
report rewritten after each phase; a run stopped at any point leaves records that ``--report-only``
turns into a valid partial report (each row says its n).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokprune.console import add_common, run_cli
from tokprune.errors import ConfigError
from tokprune.pruning.family import family_for
from tokprune.fsutil import atomic_write_text

logger = logging.getLogger(__name__)

PROG = "tokprune-quality"
DEFAULT_BUDGETS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.75)
CACHE_GUESS = 0.5  # MAC fraction assumed for a cache row before it has run (estimates only)


# --------------------------------------------------------------------------- CLI
def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"--budgets {text!r}: {e}; expected comma-separated fractions, e.g. 0.3,0.5") from e
    if not vals or any(not 0.0 < b < 1.0 for b in vals):
        raise ConfigError(f"--budgets {text!r}; expected fractions of dense MACs in (0, 1), e.g. 0.3,0.5")
    return vals


def _methods(text: str) -> tuple[str, ...]:
    from tokprune.yardstick.rows import PLAN_METHODS

    vals = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"))
    bad = [m for m in vals if m not in PLAN_METHODS]
    if bad:
        raise ConfigError(f"--methods {text!r}: unknown {bad}; expected a comma-separated subset of "
                          f"{','.join(PLAN_METHODS)} (or none)")
    if "random" in vals and "calibrated" not in vals:
        vals = ("calibrated", *vals)  # random runs the calibrated plan
    return vals


def build_parser() -> argparse.ArgumentParser:
    from tokprune.yardstick.rows import DEFAULT_CACHES, PLAN_METHODS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--model", default="shapes", help="model (default: shapes, the trained yardstick)")
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS),
                   help="MAC budgets, comma-separated (default: 0.3,0.4,0.5,0.6,0.75)")
    p.add_argument("--methods", default=",".join(PLAN_METHODS),
                   help=f"plan rows, subset of {','.join(PLAN_METHODS)} or none (default: all)")
    p.add_argument("--caches", default="|".join(DEFAULT_CACHES),
                   help="diffusers cache rows, '|'-separated kind:key=value;key=value, or none "
                        f"(default: {'|'.join(DEFAULT_CACHES)})")
    p.add_argument("--n", type=int, default=64, help="held-out captions (default: 64, the issue's bar)")
    p.add_argument("--chunk", type=int, default=8, help="captions per chunk (memory bound, resume unit; default: 8)")
    p.add_argument("--calib-prompts", type=int, default=4, help="train-split captions for CAT's t0 choice and MagCache's ratios (default: 4; the calibrated "
                        "row uses tokprune.calibrate's own default prompts, as users get it)")
    p.add_argument("--noise-n", type=int, default=4, help="captions of the dense re-run noise row (default: 4; 0 = none)")
    p.add_argument("--out", type=Path, default=Path("results/quality"), help="output folder (default: results/quality)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, else 28)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the model's, else 256)")
    p.add_argument("--seed", type=int, default=0, help="caption i uses seed+i (default: 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--device", default="cpu",
                   help="torch device of the model, calibration, every row and the MAC counting: cpu or cuda[:i] "
                        "(default: cpu). Numbers differ across devices, so each keeps its own --out records")
    p.add_argument("--metric-workers", type=int, default=None,
                   help="processes computing the per-caption metrics beside the sampling (default: 0 on cpu, "
                        "min(6, cores/2 - 1) on cuda)")
    p.add_argument("--no-rollouts", action="store_true", help="plain pipeline calls instead of shared-prefix rollouts")
    p.add_argument("--estimate", action="store_true", help="measure one dense caption, print the projected time, stop")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from OUT/.work/records.jsonl")
    p.add_argument("--fresh", action="store_true", help="discard OUT/.work (earlier records of this comparison)")
    return add_common(p)  # --quiet, --debug, --log-level and the exit codes, as every tokprune command


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tokprune-quality`` (through the shared CLI runner): exit 0 ok, 1 failure, 2 bad input,
    130 interrupted."""
    words = list(sys.argv[1:] if argv is None else argv)
    return run_cli(build_parser(), words, lambda args: _run(args, words),
                   interrupted_hint="re-run the same command to resume (finished rows are recorded)")


def _invocation() -> list[str]:
    if Path(sys.argv[0]).name == "quality.py":
        return ["python", "-m", "tokprune.yardstick.quality"]
    return [PROG]


def _versions(device: str = "cpu") -> dict[str, Any]:
    import torch

    from tokprune.environment import device_name, versions

    return {**versions("diffusers", "numpy"), "threads": torch.get_num_threads(), "device": device_name(device)}


def _device(text: str, *, present: bool = True) -> str:
    """``--device`` checked before the model loads: cpu, or a CUDA device this machine has (``present=False``:
    any CUDA device, for ``--report-only`` of GPU records on a machine without one)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device {text!r}: {e}; expected cpu or cuda[:index]") from e
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if present and (dev.index or 0) >= count:
            raise ConfigError(f"--device {text!r}: this machine has {count} CUDA device(s); pass --device cpu "
                              "(or run on a machine with a GPU)")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {text!r}; expected cpu or cuda[:index]")
    return str(dev)


def _recorded_versions(records: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """The versions and device of the last run that measured (a ``versions`` record), else this machine's."""
    import torch

    rec = next((r for r in reversed(records) if r.get("kind") == "versions"), None)
    if rec is not None:
        return {k: v for k, v in rec.items() if k != "kind"}
    return _versions(device if device == "cpu" or torch.cuda.is_available() else "cpu")


def _metric_workers(requested: int | None, device: str) -> int:
    import os

    if requested is not None:
        if requested < 0:
            raise ConfigError(f"--metric-workers {requested}; expected >= 0 (0 = in the main process)")
        return requested
    return 0 if device == "cpu" else max(1, min(6, (os.cpu_count() or 2) // 2 - 1))


def write_report(out: Path, store: Any, settings: dict[str, Any], command: str, wall: float) -> str:
    """quality.json / quality.md / quality.png from the records; returns the text to print."""
    from tokprune.yardstick import report

    records = store.records()
    agg = report.aggregate(records, settings["n"])
    doc = {
        "settings": settings,
        "versions": _recorded_versions(records, settings.get("device", "cpu")),
        "command": command,
        "wall_time_s": round(wall, 1),
        "work_seconds": round(sum(r.get("seconds", 0.0) for r in records), 1),
        "aggregate": agg,
    }
    doc["findings"] = report.findings(agg)
    atomic_write_text(out / "quality.json", json.dumps(doc, indent=2) + "\n")
    report.plot(agg, out / "quality.png", f"{settings['model']}: every row vs dense, n={settings['n']} held-out captions")
    atomic_write_text(out / "quality.md", report.markdown(doc))
    return (f"\nwrote {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'}\n"
            + "\n".join(f"- {f}" for f in doc["findings"]) + "\n\n" + report.table(agg) + "\n")


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from tokprune.models import load_pipeline
    from tokprune.yardstick.dataset import EVAL_SEED, TRAIN_SEED, sample_spec
    from tokprune.yardstick.rows import parse_caches
    from tokprune.yardstick.runs import Call
    from tokprune.yardstick.store import RunStore

    t_start = time.perf_counter()
    budgets, methods = _floats(args.budgets), _methods(args.methods)
    caches = [] if args.caches.strip() in ("", "none") else [c for c in args.caches.split("|") if c.strip()]
    parse_caches(caches)  # bad entries fail before any model call
    if args.n < 1 or args.chunk < 1 or args.calib_prompts < 1 or args.noise_n < 0:
        raise ConfigError(f"--n {args.n} / --chunk {args.chunk} / --calib-prompts {args.calib_prompts} / --noise-n "
                          f"{args.noise_n}; expected >= 1 (noise-n >= 0)")
    device = _device(args.device, present=not args.report_only)
    workers = _metric_workers(args.metric_workers, device)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device="cpu" if args.report_only else device)  # report: settings only
    resolved = family_for(pipe).settings(pipe, steps=args.steps, max_sequence_length=args.max_sequence_length)
    call = Call(
        steps=resolved.steps, guidance=resolved.guidance, height=resolved.height, width=resolved.width,
        max_sequence_length=resolved.max_sequence_length,
    )
    settings = {
        "model": args.model,
        "call": call.as_dict(),
        "n": args.n,
        "chunk": args.chunk,
        "seed": args.seed,
        "split_seed": EVAL_SEED,
        "calib_captions": [sample_spec(i, TRAIN_SEED).caption for i in range(args.calib_prompts)],
        "noise_n": args.noise_n,
        "rollouts": not args.no_rollouts,
    }
    if device != "cpu":  # in the fingerprint (other numbers); absent on the CPU, so earlier CPU work folders stay valid
        settings["device"] = device
    # The fingerprint leaves out n (more captions extend a run), budgets/methods/caches (rows are keyed by name).
    key = {k: v for k, v in settings.items() if k != "n"}
    work = args.out / ".work"
    if args.fresh and work.exists():
        if not (work / RunStore.FILE).is_file():  # only a work folder this command made
            raise ConfigError(f"--fresh: {work} was not written by {PROG} (no {RunStore.FILE}); move it away instead")
        shutil.rmtree(work)
    store = RunStore(work, key)
    command = shlex.join([*_invocation(), *argv])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        sys.stdout.write(write_report(args.out, store, settings, command, time.perf_counter() - t_start))
        return 0
    from tokprune.yardstick.driver import Driver

    driver = Driver(pipe, store, call=call, settings=settings, budgets=budgets, methods=methods, caches=caches,
                    progress=not args.quiet, prefer_rollouts=not args.no_rollouts, metric_workers=workers,
                    metric_threads=max(1, args.threads))
    if args.estimate:
        sys.stdout.write(driver.estimate_text())
        return 0
    store.append({"kind": "versions", **_versions(device)})  # the report names the machine that measured
    # Phase by phase (driver.phases: dense + noise + CAT@0.3, then budget 0.5, 0.4, 0.6, 0.75, 0.3, then caches);
    # a report after each, so a run cut off by a time limit leaves one (rows with fewer captions say their n).
    def after_phase(ph: Any) -> None:
        try:
            write_report(args.out, store, settings, command, time.perf_counter() - t_start)
        except Exception as e:  # noqa: BLE001 - a report is never worth the run: the records stay, --report-only rebuilds
            logger.warning("the report after phase %r failed (%s); the records are kept: rebuild it with --report-only",
                           ph.name, e)

    driver.run(args.n, args.chunk, after_phase=after_phase)
    sys.stdout.write(write_report(args.out, store, settings, command, time.perf_counter() - t_start))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
