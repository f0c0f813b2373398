"""Which signal should one CFG selection per prompt score: the guided prediction or the conditional half?

Whole sampling runs on the shipped ``shapes`` model (28 steps, guidance 7, 128 px), held-out
captions (split seed 1), CAT's fixed schedule (t0 = 8) at several budgets, the ``cat`` and
``dynamics`` policies; error of the final latent and PSNR of the decoded image vs the dense run.
Both variants share one index set between the CFG halves of a prompt (tokprune's rule); they
differ only in what the policy scores. Writes ``selection_signal.json`` and ``.md`` next to this file.

    python results/selection/selection_signal.py --n 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tokprune.environment import device_name, versions
from tokprune.fidelity import capped_psnr


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="held-out captions (default 8)")
    p.add_argument("--chunk", type=int, default=4, help="captions per batched run (default 4)")
    p.add_argument("--budgets", default="0.3,0.5", help="MAC budgets (default 0.3,0.5)")
    p.add_argument("--policies", default="cat,dynamics")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    a = p.parse_args(argv)

    from tokprune.calibrate.baselines import cat_schedule
    from tokprune.calibrate.rollout import relative_error
    from tokprune.calibrate.rollout import Rollouts
    from tokprune.models import call_defaults, load_pipeline
    from tokprune.yardstick.dataset import sample_spec

    t_start = time.perf_counter()
    pipe = load_pipeline("shapes")
    kw = call_defaults(pipe)
    captions = [sample_spec(i, 1).caption for i in range(a.n)]
    budgets = [float(b) for b in a.budgets.split(",")]
    rows: dict[tuple, dict[str, list[float]]] = {}
    for c in range(0, a.n, a.chunk):
        part = captions[c : c + a.chunk]
        for sel in ("guided", "cond"):
            ro = Rollouts(pipe, part, steps=kw["num_inference_steps"], guidance=kw["guidance_scale"],
                          height=kw["height"], width=kw["width"], max_sequence_length=kw["max_sequence_length"],
                          seed=c, select_from=sel)
            dense_img = np.asarray(ro.decode(ro.dense()), dtype=np.float64)
            for b in budgets:
                plan = cat_schedule(ro.geometry, ro.steps, b, t0=8)
                for pol in a.policies.split(","):
                    x = ro.run(plan, pol)
                    err = relative_error(x, ro.dense()).tolist()
                    r = rows.setdefault((sel, b, pol), {"error": [], "psnr_db": []})
                    r["error"] += err
                    r["psnr_db"] += [float(v) for v in capped_psnr(np.asarray(ro.decode(x), dtype=np.float64), dense_img)]
                    print(f"chunk {c}: {sel} b={b} {pol}: error {np.mean(err):.4f}", flush=True)
    table = [{"select_from": s, "budget": b, "policy": pol, "error": float(np.mean(v["error"])),
              "psnr_db": float(np.mean(v["psnr_db"])), "n": len(v["error"])} for (s, b, pol), v in rows.items()]
    meta = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "versions": versions(), "device": device_name("cpu"),
            "wall_s": round(time.perf_counter() - t_start, 1), "captions": "shapes held-out split (seed 1)",
            "schedule": "cat_schedule(t0=8) at each budget; one index set per prompt for both CFG halves"}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "selection_signal.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=1))
    lines = ["# Selection signal under CFG: guided prediction vs conditional half", "",
             f"- command: `{meta['command']}`", f"- {meta['device']}, torch {torch.__version__}, wall {meta['wall_s']} s",
             f"- {a.n} {meta['captions']}; {meta['schedule']}", "",
             "| select_from | budget | policy | final-latent error | PSNR vs dense (dB) |", "|---|---|---|---|---|"]
    for r in sorted(table, key=lambda r: (r["budget"], r["policy"], r["select_from"])):
        lines.append(f"| {r['select_from']} | {r['budget']:g} | {r['policy']} | {r['error']:.4f} | {r['psnr_db']:.2f} |")
    (a.out / "selection_signal.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
