"""Per-caption metrics of ``tokprune-quality`` computed beside the sampling, and recorded as they finish.

On a GPU one row of one chunk samples in a fraction of a second, while its metrics (SSIM, the
checker's per-object IoU and accuracy) are CPU work of about the same size; :class:`MetricPool`
runs them in worker processes (``spawn``: no CUDA state is inherited) so the device keeps sampling.
A (row, chunk) record is appended to the store only once its metrics are in, so an interrupted run
loses at most the rows still in flight (a rerun measures them again). ``workers=0`` computes
in-line (the CPU default: sampling and metrics share the same cores anyway).

Example::

    pool = MetricPool(store, workers=4)
    pool.submit(rec, images, dense_images, latents, dense_latents, captions, score=True, started=t0)
    pool.wait("calibrated@0.5", 0)      # that row's record is in the store now
    pool.close()                        # everything submitted is recorded
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["MetricPool", "timed_metrics"]

PENDING_PER_WORKER = 2  # submitted (row, chunk)s held per worker before submit waits (bounds memory)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))


def timed_metrics(images: np.ndarray, dense: np.ndarray, latents: np.ndarray, dense_latents: np.ndarray,
                  captions: Sequence[str], score: bool) -> tuple[dict[str, Any], float]:
    """:func:`tokprune.yardstick.metrics.chunk_metrics` and the seconds it took (runs in a worker)."""
    from tokprune.yardstick.metrics import chunk_metrics

    t0 = time.perf_counter()
    out = chunk_metrics(images, dense, latents, dense_latents, captions, score)
    return out, time.perf_counter() - t0


def _cpu(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)


class MetricPool:
    """Compute chunk metrics in ``workers`` processes (0: in-line) and append each finished record."""

    def __init__(self, store: Any, workers: int = 0, threads: int = 2) -> None:
        self.store, self.workers = store, max(0, int(workers))
        self._pending: dict[tuple[str, int], tuple[Any, dict[str, Any], float]] = {}
        self._ex: Any = None
        if self.workers:
            from concurrent.futures import ProcessPoolExecutor

            self._ex = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_init_worker, initargs=(threads,))

    def submit(self, rec: dict[str, Any], images: np.ndarray, dense: np.ndarray, latents: Any, dense_latents: Any,
               captions: Sequence[str], *, score: bool, started: float) -> None:
        """Metrics of ``images`` vs ``dense`` into ``rec`` (``seconds`` = sampling + metric work), then recorded."""
        args = (images, dense, _cpu(latents), _cpu(dense_latents), list(captions), score)
        run_s = time.perf_counter() - started
        if self._ex is None:
            out, metric_s = timed_metrics(*args)
            self._finish(rec, out, run_s + metric_s)
            return
        key = (rec["row"], rec["start"])
        self._pending[key] = (self._ex.submit(timed_metrics, *args), rec, run_s)
        self.reap()
        while len(self._pending) > self.workers * PENDING_PER_WORKER:
            self.wait(*next(iter(self._pending)))

    def pending(self) -> int:
        return len(self._pending)

    def reap(self) -> None:
        """Record every finished (row, chunk); a worker's error is raised here."""
        for key, (fut, rec, run_s) in list(self._pending.items()):
            if fut.done():
                del self._pending[key]
                out, metric_s = fut.result()
                self._finish(rec, out, run_s + metric_s)

    def wait(self, row: str, start: int) -> None:
        """Block until (row, chunk ``start``) is recorded (no-op when it is not in flight)."""
        item = self._pending.pop((row, start), None)
        if item is not None:
            fut, rec, run_s = item
            out, metric_s = fut.result()
            self._finish(rec, out, run_s + metric_s)

    def drain(self) -> None:
        """Record everything submitted."""
        while self._pending:
            self.wait(*next(iter(self._pending)))

    def close(self, *, cancel: bool = False) -> None:
        """Drain (or, with ``cancel``, record only what has finished and drop the rest), then stop the workers."""
        try:
            if cancel:  # interrupted: keep what finished cleanly (workers may have been signalled too)
                for key, (fut, rec, run_s) in list(self._pending.items()):
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        del self._pending[key]
                        out, metric_s = fut.result()
                        self._finish(rec, out, run_s + metric_s)
                if self._pending:
                    logger.warning("%d (row, chunk) metrics still in flight are dropped (a rerun measures them again)",
                                   len(self._pending))
                self._pending.clear()
            else:
                self.drain()
        finally:
            if self._ex is not None:
                self._ex.shutdown(wait=not cancel, cancel_futures=cancel)
                self._ex = None

    def _finish(self, rec: dict[str, Any], out: dict[str, Any], seconds: float) -> None:
        rec.update(out)
        rec["seconds"] = round(seconds, 1)
        self.store.append(rec)
        logger.info("%s captions %d-%d: PSNR %.2f dB, IoU %s (%.1f s)", rec["row"], rec["start"], rec["stop"] - 1,
                    float(np.mean(rec["psnr"])), "-" if rec["iou"] is None else f"{np.mean(rec['iou']):.4f}",
                    rec["seconds"])
