"""The work loop of ``tokprune-quality``: prepare rows once, then measure every row chunk by chunk.

:class:`Driver` keeps everything it finishes in a :class:`~tokprune.yardstick.store.RunStore`, so a
rerun skips it: plans (calibration, CAT's t0 choice), MagCache's measured ratios, each plan row's
counted MACs, each chunk's dense reference (images and latents as ``.npy``) and each (row, chunk)'s
per-caption metrics. The progress bar counts dense-caption equivalents (a row costs its MAC
fraction per caption), so its ETA is a cost-weighted one.

Example::

    driver = Driver(pipe, store, call=call, settings=settings, budgets=(0.3,), methods=("cat",), caches=[])
    driver.prepare()
    driver.run_chunk(0, 8)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Driver"]


class Driver:
    """Prepare rows and run chunks for one comparison (see module doc)."""

    def __init__(self, pipe: Any, store: Any, *, call: Any, settings: dict[str, Any], budgets: Sequence[float],
                 methods: Sequence[str], caches: Sequence[str], progress: bool = True,
                 prefer_rollouts: bool = True) -> None:
        from tokprune.yardstick import SHAPES_DIR

        self.pipe, self.store, self.call, self.settings = pipe, store, call, settings
        self.budgets, self.methods, self.caches = tuple(budgets), tuple(methods), list(caches)
        self.progress, self.prefer_rollouts = progress, prefer_rollouts
        model = settings["model"]
        self.score = model == "shapes" or str(model) == str(SHAPES_DIR)  # checker metrics need the trained yardstick
        self.rows: list[Any] = []
        self._bar: Any = None

    # ---- captions -------------------------------------------------------------------
    def captions(self, start: int, stop: int) -> tuple[list[str], list[int]]:
        from tokprune.yardstick.dataset import EVAL_SEED, sample_spec

        caps = [sample_spec(i, EVAL_SEED).caption for i in range(start, stop)]
        return caps, [self.settings["seed"] + i for i in range(start, stop)]

    # ---- preparation (once, stored) ----------------------------------------------------
    def prepare(self) -> None:
        """Plans of every plan row, MagCache ratios, counted MACs of each plan row."""
        from tokprune.yardstick.rows import cache_rows, plan_rows
        from tokprune.yardstick.runs import make_runs, measure_plan_macs

        calib = self.settings["calib_captions"]
        calib_seeds = [self.settings["seed"] + i for i in range(len(calib))]
        calib_runs = make_runs(self.pipe, calib, call=self.call, seeds=calib_seeds, prefer_rollouts=self.prefer_rollouts)
        t0 = time.perf_counter()
        rows = plan_rows(
            self.pipe, budgets=self.budgets, methods=self.methods, call=self.call, calib_runs=calib_runs,
            seed=self.settings["seed"], model=self.settings["model"], store=self.store,
            checkpoint_dir=self.store.folder / "calibration", on_progress=lambda m: logger.info("%s", m),
        )
        if time.perf_counter() - t0 > 1.0:
            self.store.append({"kind": "timing", "what": "planning", "seconds": round(time.perf_counter() - t0, 1)})
        ratios = None
        if any(c.startswith("magcache") for c in self.caches):
            rec = self.store.find("mag_ratios")
            if rec is None:
                from tokprune.families.sd3.caches import measure_mag_ratios

                t0 = time.perf_counter()
                logger.info("measuring MagCache's magnitude ratios on %d calibration captions", len(calib))
                ratios = measure_mag_ratios(self.pipe, calib, seeds=calib_seeds, call=self.call.kwargs())
                self.store.append({"kind": "mag_ratios", "ratios": ratios, "seconds": round(time.perf_counter() - t0, 1)})
            else:
                ratios = rec["ratios"]
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
        self.rows = rows

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
        lat = runs.dense()
        imgs = decode(self.pipe, lat)
        self.store.save_array(f"dense-{start}", imgs)
        self.store.save_array(f"dense-latents-{start}", lat.numpy())
        if not self.store.has("dense", start=start):
            from tokprune.yardstick.metrics import accuracies

            self.store.append({"kind": "dense", "start": start, "stop": start + len(captions),
                               "acc": accuracies(imgs, captions) if self.score else None,
                               "seconds": round(time.perf_counter() - t0, 1)})
        return imgs, lat

    def run_chunk(self, start: int, stop: int) -> None:
        """Every row not yet measured on captions ``start..stop-1``."""
        from tqdm.auto import tqdm

        from tokprune.yardstick.metrics import chunk_metrics
        from tokprune.yardstick.rows import plan_from_dict
        from tokprune.yardstick.runs import decode, make_runs, run_cache

        caps, seeds = self.captions(start, stop)
        todo = [r for r in self.rows if not self._done(r.name, start)]
        noise = start == 0 and self.settings["noise_n"] > 0 and not self._done("dense-rerun", 0)
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
            if r.info.get("identical_to") and self._done(r.info["identical_to"], start):
                src = self.store.find("chunk", row=r.info["identical_to"], start=start)
                rec.update({m: src[m] for m in ("psnr", "ssim", "iou", "acc", "latent_err")},
                           identical_to=r.info["identical_to"], seconds=0.0)
            elif r.is_cache:
                lat, fracs, calls, _ = run_cache(self.pipe, caps, seeds, self.call, r.cache)
                rec.update(chunk_metrics(decode(self.pipe, lat), dense_imgs, lat, dense_lat, caps, self.score),
                           mac_fraction=fracs, calls=calls, settings=r.info.get("settings"))
            else:
                lat = runs.run(plan_from_dict(r.plan), r.policy)
                rec.update(chunk_metrics(decode(self.pipe, lat), dense_imgs, lat, dense_lat, caps, self.score))
            rec.setdefault("seconds", round(time.perf_counter() - t0, 1))
            self.store.append(rec)
            bar.update(round(len(caps) * self.row_fraction(r), 2))
            logger.info("%s captions %d-%d: PSNR %.2f dB, IoU %s (%.0f s)", r.name, start, stop - 1,
                        float(np.mean(rec["psnr"])), "-" if rec["iou"] is None else f"{np.mean(rec['iou']):.4f}",
                        rec["seconds"])
        bar.close()

    def _noise_row(self, dense_imgs: np.ndarray, dense_lat: Any, base: dict[str, Any]) -> None:
        """Dense again on the first ``noise_n`` captions with another batch split: the metrics' noise floor."""
        import torch

        from tokprune.yardstick.metrics import chunk_metrics
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
        rec.update(chunk_metrics(decode(self.pipe, lat), dense_imgs[:k], lat, dense_lat[:k], caps, self.score))
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        self.store.append(rec)
