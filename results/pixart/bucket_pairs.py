"""Bucket latency against its MAC prediction, for several exports / ONNX Runtime settings in one process.

Every arm is an export directory and a spin setting; each arm's dense bucket and pruned bucket run
back to back, arms round-robin, ``--reps`` rounds, so load changes hit every arm alike. Per arm:
median wall and CPU time (``time.process_time``, all threads) per bucket, and the pruned bucket
against the dense bucket's latency x the MAC ratio, both from the medians and paired call by call
(``vs_prediction_paired``, as ``bench_cpu.py`` reports it)::

    OMP_NUM_THREADS=2 python results/pixart/bucket_pairs.py --threads 2 --reps 10 \\
        --arm old=engines/old:nospin --arm new=engines/new:nospin --arm new-spin=engines/new:spin \\
        --json results/pixart/bucket-pairs-2threads.json

``spin``: intra-op threads spin for work while a run is in flight and stop when it returns
(``OnnxRuntimeRunner(spin=True)``); ``nospin``: they sleep between kernels (the runner's default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _session(path: Path, threads: int, spin: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--arm", action="append", required=True, metavar="NAME=DIR:spin|nospin")
    p.add_argument("--json")
    args = p.parse_args(argv)

    from tokprune.export.manifest import load_manifest

    arms = []
    for text in args.arm:
        name, rest = text.split("=", 1)
        directory, mode = rest.rsplit(":", 1)
        if mode not in ("spin", "nospin"):
            p.error(f"--arm {text}: the setting after ':' is 'spin' or 'nospin', got {mode!r}")
        manifest = load_manifest(directory)
        specs = manifest.bucket_specs()
        keys = sorted(specs, key=lambda k: -specs[k].image_keep)[:2]  # dense, then the largest pruned bucket
        g = manifest.geometry
        sessions = {k: _session(manifest.onnx_path(k), args.threads, mode == "spin") for k in keys}
        feeds = {k: {n: x.numpy() for n, x in specs[k].sample_inputs(0).items()} for k in keys}
        macs = {k: g.step_macs(specs[k].image_keep, specs[k].text_keep) for k in keys}
        for k in keys:
            sessions[k].run(None, feeds[k])  # warm-up
        arms.append((name, directory, mode, keys, sessions, feeds, macs))
    wall: dict[str, dict[str, list[float]]] = {a[0]: {k: [] for k in a[3]} for a in arms}
    cpu: dict[str, dict[str, list[float]]] = {a[0]: {k: [] for k in a[3]} for a in arms}
    load_start = os.getloadavg()
    for _ in range(args.reps):
        for name, _, _, keys, sessions, feeds, _ in arms:
            for k in keys:
                t, c = time.perf_counter(), time.process_time()
                sessions[k].run(None, feeds[k])
                wall[name][k].append(time.perf_counter() - t)
                cpu[name][k].append(time.process_time() - c)
    result: dict[str, Any] = {"threads": args.threads, "reps": args.reps, "arms": {},
                              "meta": {"load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
                                       "command": " ".join(sys.argv)}}
    print(f"{args.threads} thread(s), {args.reps} rounds, load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    for name, directory, mode, keys, _, _, macs in arms:
        dense, pruned = keys
        ratio = macs[pruned] / macs[dense]
        md, mp = statistics.median(wall[name][dense]), statistics.median(wall[name][pruned])
        paired = statistics.median(tp / (td * ratio) - 1.0 for tp, td in zip(wall[name][pruned], wall[name][dense]))
        arm = {"engines": directory, "spin": mode == "spin", "dense": dense, "pruned": pruned, "mac_ratio": ratio,
               "dense_s": md, "pruned_s": mp, "dense_cpu_s": statistics.median(cpu[name][dense]),
               "pruned_cpu_s": statistics.median(cpu[name][pruned]), "vs_prediction": mp / (md * ratio) - 1.0,
               "vs_prediction_paired": paired, "seconds": wall[name]}
        result["arms"][name] = arm
        print(f"  {name:12s} dense {1e3 * md:6.1f} ms (cpu {1e3 * arm['dense_cpu_s']:6.1f})  {pruned} {1e3 * mp:6.1f} ms "
              f"(cpu {1e3 * arm['pruned_cpu_s']:6.1f})  MAC ratio {ratio:.3f}  vs prediction {100 * arm['vs_prediction']:+.1f} % "
              f"(paired {100 * paired:+.1f} %)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
