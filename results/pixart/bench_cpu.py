"""CPU speed of PixArt pruning on ``pixart-medium``: ONNX Runtime pruned vs PyTorch eager dense and ONNX Runtime dense.

Two sub-commands; run ``bench`` once per thread count, each in its own process::

    python results/pixart/bench_cpu.py export --out engines/pixart-medium-cat-b0.5
    python results/pixart/bench_cpu.py bench --engines engines/pixart-medium-cat-b0.5 --threads 1 --json results/pixart/bench-1thread.json
    python results/pixart/bench_cpu.py bench --engines engines/pixart-medium-cat-b0.5 --threads 2 --json results/pixart/bench-2threads.json

``export``: CAT's fixed schedule at the budget (dense warm-up of round(8/28 * steps) steps, then one K;
no calibration run, :func:`tokprune.calibrate.api.baseline_schedule`), exported through the generic
exporter (one ONNX graph per bucket, each checked against PyTorch). ``bench``: whole pipeline calls
(``output_type="latent"``: the denoising loop and prompt encoding, no VAE), the arms interleaved round by
round in one process so machine load hits them alike; per-bucket ONNX Runtime latency against the
dense bucket's latency times the bucket's MAC ratio. Random weights: speed only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

STEPS, GUIDANCE, PROMPT = 10, 4.5, "a red circle on the left of a blue square"
#: T5 rows. PixArt-Σ-XL at 1024² sees T = 300 beside N = 4096 image tokens (7.3 %); at N = 1024 the same
#: proportion is T ≈ 75: 80 keeps the text's share of the work close to the real model's.
MSL = 80


def export(args: argparse.Namespace) -> int:
    from tokprune.calibrate.api import baseline_schedule
    from tokprune.export.exporter import ExportConfig, export_model
    from tokprune.models import load_pipeline

    pipe = load_pipeline("pixart-medium")
    sched = baseline_schedule(pipe, "cat", budget=args.budget, steps=STEPS, guidance=GUIDANCE, max_sequence_length=MSL,
                              model="pixart-medium", align=16)
    path = Path(args.schedule)
    sched.save(path)
    t = time.perf_counter()
    res = export_model(ExportConfig(model="pixart-medium", schedule_file=str(path)), args.out, force=True, progress=False)
    print(f"exported {res.directory} in {time.perf_counter() - t:.0f} s: plan {list(sched.plan)}, "
          f"mac_fraction {sched.mac_fraction:.4f}")
    return 0


def _median_call(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from tokprune import runtime
    from tokprune.export.manifest import load_manifest
    from tokprune.export.runners.ort import OnnxRuntimeRunner
    from tokprune.models import load_pipeline

    manifest = load_manifest(args.engines)
    pipe = load_pipeline("pixart-medium")
    kw = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=MSL, output_type="latent",
              clean_caption=False)

    def call() -> torch.Tensor:
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images

    def spinning(spec, manifest):  # the per-bucket runners runtime.load builds on CPU, with spinning threads
        return OnnxRuntimeRunner(manifest.onnx_path(spec.key), spec, threads=args.threads, spin=True)

    factory = spinning if args.spin else None
    views = {
        "ort-dense": runtime.load(args.engines, backend="onnxruntime", pruned=False, threads=args.threads,
                                  runner_factory=factory),
        "ort-pruned": runtime.load(args.engines, backend="onnxruntime", threads=args.threads, runner_factory=factory),
    }
    original = pipe.transformer
    arms = ["eager-dense", *views]
    times: dict[str, list[float]] = {a: [] for a in arms}
    latents: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        call()  # warm-up of the eager path
        for r in range(args.rounds + 1):  # round 0 warms every arm up and is not counted
            for arm in arms:
                if arm == "eager-dense":
                    out = _median_call(call, 1)
                    latents[arm] = call() if r == 0 else latents.get(arm, None)
                else:
                    runtime.attach(pipe, views[arm])  # binds the pipeline (CFG scale, T5 EOS) through the family
                    try:
                        out = _median_call(call, 1)
                        if r == 0:
                            latents[arm] = call()
                    finally:
                        runtime.detach(pipe)
                if r > 0:
                    times[arm] += out
            print(f"round {r}: " + ", ".join(f"{a} {times[a][-1]:.2f}s" for a in arms if times[a]), flush=True)
    assert pipe.transformer is original

    # per-bucket latency (engine call alone, buckets interleaved call by call so load hits them alike)
    # vs the dense bucket's latency x MAC ratio
    specs = manifest.bucket_specs()
    g = manifest.geometry
    runners = {key: OnnxRuntimeRunner(manifest.onnx_path(key), spec, threads=args.threads, spin=args.spin)
               for key, spec in specs.items()}
    feeds = {key: spec.sample_inputs(0) for key, spec in specs.items()}
    lat: dict[str, list[float]] = {key: [] for key in specs}
    for runner in runners.values():
        runner.__enter__()
    try:
        for key, runner in runners.items():
            runner.infer(feeds[key])  # warm-up
        for _ in range(args.bucket_repeats):
            for key, runner in runners.items():
                lat[key] += _median_call(lambda: runner.infer(feeds[key]), 1)
    finally:
        for runner in runners.values():
            runner.__exit__(None, None, None)
    buckets = {key: {"k": spec.image_keep, "median_s": statistics.median(lat[key]), "seconds": lat[key],
                     "macs": g.step_macs(spec.image_keep, spec.text_keep)} for key, spec in specs.items()}
    dense_key = max(buckets, key=lambda k: buckets[k]["k"])
    d = buckets[dense_key]
    for b in buckets.values():
        b["mac_ratio"] = b["macs"] / d["macs"]
        b["predicted_s"] = d["median_s"] * b["mac_ratio"]
        b["vs_prediction"] = b["median_s"] / b["predicted_s"] - 1.0
        # the same, per repeat against the dense call right beside it (robust to load changing mid-run)
        b["vs_prediction_paired"] = statistics.median(
            t / (td * b["mac_ratio"]) - 1.0 for t, td in zip(b["seconds"], d["seconds"]))

    med = {a: statistics.median(v) for a, v in times.items()}
    ref = latents["eager-dense"].float()
    result = {
        "model": "pixart-medium", "threads": args.threads, "spin": args.spin, "steps": STEPS, "guidance": GUIDANCE,
        "max_sequence_length": MSL, "rounds": args.rounds, "plan": manifest.step_buckets,
        "mac_fraction": manifest.data["mac_fraction"], "geometry": manifest.data["geometry"],
        "seconds": times, "median_s": med,
        "speedup_vs_eager_dense": {a: med["eager-dense"] / m for a, m in med.items()},
        "speedup_vs_ort_dense": {a: med["ort-dense"] / m for a, m in med.items()},
        "latent_rel_err_vs_eager_dense": {a: float((x.float() - ref).norm() / ref.norm()) for a, x in latents.items()},
        "buckets": buckets,
        "meta": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                 "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                 "command": " ".join(sys.argv)},
    }
    import onnxruntime

    result["meta"]["onnxruntime"] = onnxruntime.__version__
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--out", required=True)
    e.add_argument("--budget", type=float, default=0.5)
    e.add_argument("--schedule", default=str(Path(__file__).parent / "pixart-medium-s10-b0.5-cat.schedule.json"),
                   help="where the CAT schedule is written (exported from there)")
    b = sub.add_parser("bench")
    b.add_argument("--engines", required=True)
    b.add_argument("--threads", type=int, required=True)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--bucket-repeats", type=int, default=7)
    b.add_argument("--spin", action="store_true",
                   help="ONNX Runtime threads spin for work while a run is in flight (OnnxRuntimeRunner(spin=True))")
    b.add_argument("--json")
    args = p.parse_args(argv)
    return export(args) if args.cmd == "export" else bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
