"""The work loop of ``tokprune-quality``: phase by phase, prepare the phase's rows, then measure them chunk by chunk.

Phases put the rows that matter most first, so a run cut off by a time limit still leaves a report
that answers the main questions (:func:`phases`): the dense reference of every chunk with the noise
row and CAT at 0.3 (the separation finding), then every plan row at 0.5, then 0.4, 0.6, 0.75, the rest
of 0.3 and any other budget, then the diffusers cache rows. Each phase plans (calibrates) only its own
rows, so calibration at later budgets costs nothing until their phase comes.

:class:`Driver` keeps everything it finishes in a :class:`~tokprune.yardstick.store.RunStore`, so a
rerun skips it: plans (calibration, CAT's t0 choice), MagCache's measured ratios, each plan row's
counted MACs, each chunk's dense reference (images and latents as ``.npy``) and each (row, chunk)'s
per-caption metrics. The progress bar counts dense-caption equivalents (a row costs its MAC
fraction per caption), so its ETA is a cost-weighted one.

Example::

    driver = Driver(pipe, store, call=call, settings=settings, budgets=(0.3,), methods=("cat",), caches=[])
    driver.run(n=8, chunk=8)          # every phase; or: driver.prepare(); driver.run_chunk(0, 8)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Driver", "PRIORITY_BUDGETS", "Phase", "phases"]

#: Budgets in the order their plan rows run (after the first phase); others follow in the order given.
PRIORITY_BUDGETS: tuple[float, ...] = (0.5, 0.4, 0.6, 0.75, 0.3)


@dataclass(frozen=True)
class Phase:
    """One step of the work order: plan rows ``(budget, method)``, whether cache rows and the noise row run."""

    name: str
    rows: tuple[tuple[float, str], ...] = ()
    caches: bool = False
    noise: bool = False


def phases(budgets: Sequence[float], methods: Sequence[str], caches: Sequence[str]) -> list[Phase]:
    """The work order (see module doc). Every (budget, method) appears in exactly one phase."""
    def has(bs: Sequence[float], b: float) -> bool:
        return any(math.isclose(b, x) for x in bs)

    lead = tuple((b, "cat") for b in budgets if math.isclose(b, 0.3) and "cat" in methods)
    out = [Phase("dense references, noise row" + "".join(f", cat@{b:g}" for b, _ in lead), lead, noise=True)]
    order = [b for b in PRIORITY_BUDGETS if has(budgets, b)] + [b for b in budgets if not has(PRIORITY_BUDGETS, b)]
    for pb in order:
        b = next(x for x in budgets if math.isclose(x, pb))
        rows = tuple((b, m) for m in methods if (b, m) not in lead)
        if rows:
            out.append(Phase(f"budget {b:g}", rows))
    if caches:
        out.append(Phase("diffusers caches", caches=True))
    return out


def scores_objects(model: Any) -> bool:
    """Whether ``model`` draws the shapes world, so the checker's metrics (object IoU, accuracy) apply.

    True for the trained yardsticks (``shapes``, ``pixart-shapes``) by name or by their directory (a
    ``yardstick.json`` beside the pipeline's ``model_index.json``); random-weight models are scored on
    PSNR / SSIM / latent error only.
    """
    from pathlib import Path

    from tokprune.yardstick import PIXART_SHAPES_DIR, SHAPES_DIR

    if str(model) in ("shapes", "pixart-shapes", str(SHAPES_DIR), str(PIXART_SHAPES_DIR)):
        return True
    path = Path(str(model))
    return path.is_dir() and (path / "yardstick.json").is_file()


class Driver:
    """Prepare rows and run chunks for one comparison (see module doc)."""

    def __init__(self, pipe: Any, store: Any, *, call: Any, settings: dict[str, Any], budgets: Sequence[float],
                 methods: Sequence[str], caches: Sequence[str], progress: bool = True,
                 prefer_rollouts: bool = True, metric_workers: int = 0, metric_threads: int = 2) -> None:
        self.pipe, self.store, self.call, self.settings = pipe, store, call, settings
        self.budgets, self.methods, self.caches = tuple(budgets), tuple(methods), list(caches)
        self.progress, self.prefer_rollouts = progress, prefer_rollouts
        model = settings["model"]
        self.score = scores_objects(model)  # checker metrics need a trained yardstick of the shapes world
        self.rows: list[Any] = []
        self._bar: Any = None
        self._calib_runs: Any = None
        self.metric_workers, self.metric_threads = metric_workers, metric_threads
        self._metrics: Any = None

    @property
    def metrics(self) -> Any:
        """The :class:`~tokprune.yardstick.workers.MetricPool` (started on first use)."""
        if self._metrics is None:
            from tokprune.yardstick.workers import MetricPool

            self._metrics = MetricPool(self.store, self.metric_workers, self.metric_threads)
        return self._metrics

    def close(self, *, cancel: bool = False) -> None:
        """Record every metric in flight (``cancel``: only the finished ones) and stop the metric workers."""
        if self._metrics is not None:
            self._metrics.close(cancel=cancel)
            self._metrics = None

    # ---- the whole comparison -----------------------------------------------------------
    def run(self, n: int, chunk: int, after_phase: Callable[[Phase], None] | None = None) -> None:
        """Every phase (:func:`phases`) on captions ``0..n-1`` in chunks; ``after_phase`` after each (a report).

        A phase that fails (an error, not an interrupt) is recorded (``phase_error``, shown in the findings)
        and the next phase runs: one broken row never costs the others; the error is raised at the end."""
        from tokprune.errors import TokpruneError

        failed: list[str] = []
        try:
            for ph in phases(self.budgets, self.methods, self.caches):
                t0 = time.perf_counter()
                logger.info("phase: %s", ph.name)
                try:
                    rows = self.prepare_rows(ph.rows, caches=ph.caches)
                    for start in range(0, n, chunk):
                        self.run_chunk(start, min(n, start + chunk), rows=rows, noise=ph.noise)
                    self.metrics.drain()
                except Exception as e:  # noqa: BLE001 - recorded, reported, raised after the other phases
                    logger.error("phase %r failed after %.0f s: %s: %s; going on with the next phase", ph.name,
                                 time.perf_counter() - t0, type(e).__name__, e, exc_info=logger.isEnabledFor(logging.DEBUG))
                    self.store.append({"kind": "phase_error", "phase": ph.name, "error": f"{type(e).__name__}: {e}"})
                    failed.append(ph.name)
                else:
                    logger.info("phase done: %s (%.0f s)", ph.name, time.perf_counter() - t0)
                if after_phase is not None:
                    after_phase(ph)
        except BaseException:
            self.close(cancel=True)
            raise
        self.close()
        if failed:
            raise TokpruneError(f"{len(failed)} phase(s) failed: {'; '.join(failed)} (errors in the log and in the "
                                "report's findings); the other phases are recorded: fix and re-run the same command")

    # ---- captions -------------------------------------------------------------------
    def captions(self, start: int, stop: int) -> tuple[list[str], list[int]]:
        from tokprune.yardstick.dataset import EVAL_SEED, sample_spec

        caps = [sample_spec(i, EVAL_SEED).caption for i in range(start, stop)]
        return caps, [self.settings["seed"] + i for i in range(start, stop)]

    # ---- preparation (once, stored) ----------------------------------------------------
    def prepare(self) -> None:
        """Plans of every plan row, MagCache ratios, counted MACs of each plan row (every phase's rows at once)."""
        self.rows = self.prepare_rows([(b, m) for b in self.budgets for m in self.methods], caches=True)

    def prepare_rows(self, pairs: Sequence[tuple[float, str]], *, caches: bool) -> list[Any]:
        """The rows of plan ``(budget, method)`` pairs (planned, MACs counted) and, with ``caches``, the cache rows."""
        from tokprune.yardstick.rows import cache_rows, plan_rows
        from tokprune.yardstick.runs import make_runs, measure_plan_macs

        calib = self.settings["calib_captions"]
        calib_seeds = [self.settings["seed"] + i for i in range(len(calib))]
        if self._calib_runs is None:  # shared by every phase (CAT's t0 choice reuses its dense warm-ups)
            self._calib_runs = make_runs(self.pipe, calib, call=self.call, seeds=calib_seeds,
                                         prefer_rollouts=self.prefer_rollouts)
        t0 = time.perf_counter()
        rows: list[Any] = []
        for b in dict.fromkeys(b for b, _ in pairs):
            rows += plan_rows(
                self.pipe, budgets=(b,), methods=tuple(m for bb, m in pairs if bb == b), call=self.call,
                calib_runs=self._calib_runs, seed=self.settings["seed"], model=self.settings["model"], store=self.store,
                checkpoint_dir=self.store.folder / "calibration", on_progress=lambda m: logger.info("%s", m),
            )
        if time.perf_counter() - t0 > 1.0:
            self.store.append({"kind": "timing", "what": "planning", "rows": [r.name for r in rows],
                               "seconds": round(time.perf_counter() - t0, 1)})
        ratios = None
        if caches and any(c.startswith("magcache") for c in self.caches):
            rec = self.store.find("mag_ratios")
            if rec is None:
                from tokprune.families.sd3.caches import measure_mag_ratios

                t0 = time.perf_counter()
                logger.info("measuring MagCache's magnitude ratios on %d calibration captions", len(calib))
                ratios = measure_mag_ratios(self.pipe, calib, seeds=calib_seeds, call=self.call.kwargs())
                self.store.append({"kind": "mag_ratios", "ratios": ratios, "seconds": round(time.perf_counter() - t0, 1)})
            else:
                ratios = rec["ratios"]
        if caches:
            rows += cache_rows(self.caches, mag_ratios=ratios)
        prompt, seed = self.captions(0, 1)
        for r in rows:
            if r.is_cache or self.store.has("macs", row=r.name):
                continue
            from tokprune.yardstick.rows import plan_from_dict

            t0 = time.perf_counter()
            m = measure_plan_macs(self.pipe, plan_from_dict(r.plan), r.policy, self.call, prompt[0], seed[0])
            self.store.append({"kind": "macs", "row": r.name, **m, "seconds": round(time.perf_counter() - t0, 1)})
            logger.info("%s: counted MAC fraction %.4f (plan's analytic %.4f)", r.name, m["fraction"], m["analytic"])
        return rows

    # ---- cost ------------------------------------------------------------------------
    def row_fraction(self, row: Any) -> float:
        rec = self.store.find("macs", row=row.name)
        if rec is not None:
            return float(rec["fraction"])
        if row.is_cache:
            done = [c for c in self.store.records() if c.get("kind") == "chunk" and c["row"] == row.name]
            vals = [v for c in done for v in c.get("mac_fraction") or []]
            return float(np.mean(vals)) if vals else 0.5
        return float(row.budget or 0.5)

    def estimate_text(self) -> str:
        """Measure one dense caption; project the wall time of the whole comparison from MAC fractions."""
        from tokprune.bench.harness import device_sync, time_repeats
        from tokprune.yardstick.runs import EagerRuns

        caps, seeds = self.captions(0, 1)
        # the first call also pays one-time set-up: keep the faster of two
        dense_s = min(time_repeats(lambda: EagerRuns(self.pipe, caps, call=self.call, seeds=seeds).dense(),
                                   sync=device_sync(self.pipe.device), warmup=0, repeats=2))
        n = self.settings["n"]
        plan_units = sum(self.budgets) * len([m for m in self.methods if m != "random"])
        if "random" in self.methods:
            plan_units += sum(self.budgets)  # unless the calibrated plan never selects (then free)
        cache_units = 0.5 * len(self.caches)
        per_caption = dense_s * (1 + plan_units + cache_units)
        calib = len(self.settings["calib_captions"])
        cat_units = calib * sum(self.budgets) * 4 if "cat" in self.methods else 0  # 4 t0 candidates, full runs
        noise = self.settings["noise_n"] * dense_s
        macs = dense_s * plan_units  # one counted caption per plan row
        total = n * per_caption + dense_s * cat_units + noise + macs
        return (
            f"one dense caption: {dense_s:.1f} s ({self.call.steps} steps, this machine now)\n"
            f"per caption, all rows: {per_caption:.0f} s = dense x (1 + {plan_units:.2f} plan-row MAC units "
            f"+ {cache_units:.2f} cache units, assumed 0.5 each)\n"
            f"projected: {n} captions {n * per_caption / 60:.0f} min + CAT t0 choice {dense_s * cat_units / 60:.0f} min"
            f" (upper bound, no shared prefixes) + MAC counting {macs / 60:.0f} min + noise row {noise / 60:.1f} min "
            f"= {total / 60:.0f} min, plus calibration ({len(self.budgets)} budgets, tokprune.calibrate's own cost)\n"
        )

    # ---- chunks ----------------------------------------------------------------------
    def _done(self, row: str, start: int) -> bool:
        return self.store.has("chunk", row=row, start=start)

    def _dense(self, runs: Any, start: int, captions: list[str]) -> tuple[np.ndarray, Any]:
        import torch

        from tokprune.yardstick.runs import decode

        imgs, lats = self.store.load_array(f"dense-{start}"), self.store.load_array(f"dense-latents-{start}")
        if imgs is not None and lats is not None and len(imgs) == len(captions):
            return imgs, torch.from_numpy(lats)
        t0 = time.perf_counter()
        lat = runs.dense().detach().float().cpu()  # kept on the CPU: metrics and the stored .npy
        imgs = decode(self.pipe, lat)
        self.store.save_array(f"dense-{start}", imgs)
        self.store.save_array(f"dense-latents-{start}", lat.numpy())
        if not self.store.has("dense", start=start):
            from tokprune.yardstick.metrics import accuracies

            self.store.append({"kind": "dense", "start": start, "stop": start + len(captions),
                               "acc": accuracies(imgs, captions) if self.score else None,
                               "seconds": round(time.perf_counter() - t0, 1)})
        return imgs, lat

    def run_chunk(self, start: int, stop: int, rows: Sequence[Any] | None = None, noise: bool | None = None) -> None:
        """Every row of ``rows`` (default: all prepared) not yet measured on captions ``start..stop-1``; the
        chunk's dense reference if not stored; the noise row at chunk 0 unless ``noise`` is False. Records of
        rows whose metrics are computed in workers land by :meth:`close` (or the metric pool's ``drain``)."""
        from tqdm.auto import tqdm

        from tokprune.yardstick.rows import plan_from_dict
        from tokprune.yardstick.runs import decode, make_runs, run_cache

        caps, seeds = self.captions(start, stop)
        todo = [r for r in (self.rows if rows is None else rows) if not self._done(r.name, start)]
        noise = (noise is not False and start == 0 and self.settings["noise_n"] > 0
                 and not self._done("dense-rerun", 0))
        if not todo and not noise and self.store.has("dense", start=start):
            return
        units = len(caps) * (1 + sum(self.row_fraction(r) for r in todo)) + (self.settings["noise_n"] if noise else 0)
        bar = tqdm(total=round(units, 2), desc=f"captions {start}-{stop - 1}", unit="dense-caption",
                   disable=not self.progress, dynamic_ncols=True)
        runs = make_runs(self.pipe, caps, call=self.call, seeds=seeds, prefer_rollouts=self.prefer_rollouts)
        dense_imgs, dense_lat = self._dense(runs, start, caps)
        bar.update(len(caps))
        base = {"kind": "chunk", "start": start, "stop": stop}
        if noise:
            self._noise_row(dense_imgs, dense_lat, base)
            bar.update(self.settings["noise_n"])
        for r in todo:
            t0 = time.perf_counter()
            rec = {**base, "row": r.name, "method": r.method, "budget": r.budget}
            same = r.info.get("identical_to")
            if same:
                self.metrics.wait(same, start)  # its record may still be in a metric worker
            if same and self._done(same, start):
                src = self.store.find("chunk", row=same, start=start)
                rec.update({m: src[m] for m in ("psnr", "ssim", "iou", "acc", "latent_err")},
                           identical_to=same, seconds=0.0)
                self.store.append(rec)
            elif r.is_cache:
                lat, fracs, calls, _ = run_cache(self.pipe, caps, seeds, self.call, r.cache)
                rec.update(mac_fraction=fracs, calls=calls, settings=r.info.get("settings"))
                self.metrics.submit(rec, decode(self.pipe, lat), dense_imgs, lat, dense_lat, caps, score=self.score,
                                    started=t0)
            else:
                lat = runs.run(plan_from_dict(r.plan), r.policy)
                self.metrics.submit(rec, decode(self.pipe, lat), dense_imgs, lat, dense_lat, caps, score=self.score,
                                    started=t0)
            bar.update(round(len(caps) * self.row_fraction(r), 2))
        bar.close()

    def _noise_row(self, dense_imgs: np.ndarray, dense_lat: Any, base: dict[str, Any]) -> None:
        """Dense again on the first ``noise_n`` captions with another batch split: the metrics' noise floor."""
        import torch

        from tokprune.yardstick.runs import EagerRuns, decode

        k = min(self.settings["noise_n"], len(dense_imgs))
        caps, seeds = self.captions(0, k)
        t0 = time.perf_counter()
        if len(dense_imgs) > 1:  # reference ran the chunk batched: re-run one caption per call
            lat = torch.cat([EagerRuns(self.pipe, [c], call=self.call, seeds=[s]).dense() for c, s in zip(caps, seeds)])
            how = "one caption per pipeline call (reference: the chunk in one call)"
        else:
            lat = EagerRuns(self.pipe, caps * 2, call=self.call, seeds=seeds * 2).dense()[:1]
            how = "the caption batched twice in one call (reference: alone)"
        rec = {**base, "stop": k, "row": "dense-rerun", "method": "dense-rerun", "budget": None, "how": how}
        self.metrics.submit(rec, decode(self.pipe, lat), dense_imgs[:k], lat, dense_lat[:k], caps, score=self.score,
                            started=t0)
