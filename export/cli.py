"""Command-line entry points: ``tokprune-export``, ``tokprune-build``, ``tokprune-inspect``.

Each ``*_main(argv=None) -> int`` goes through :func:`tokprune.console.run_cli`: it returns the
exit status (0 ok, 1 failure, 2 bad input, 130 interrupted) and prints errors as one line that
says what to do; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tokprune.console import add_common, run_cli
from tokprune.export.command import command_line

logger = logging.getLogger("tokprune.export")
RESUME_HINT = "re-run the same command to resume (finished buckets and calibration measurements are kept)"


# ---- tokprune-export --------------------------------------------------------------------------------
def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokprune-export",
        description=(
            "Calibrate a pruning schedule for MODEL under a MAC budget (or take --schedule), export every "
            "static-shape bucket to ONNX with weights stored once, check each against PyTorch in ONNX Runtime, "
            "build TensorRT engines when TensorRT and a GPU are present, and write DIR/manifest.json."
        ),
        epilog="Example: tokprune-export --model sd3-tiny --budget 0.5 --steps 8",
    )
    p.add_argument("--model", required=True, help="built-in name (sd3-tiny, sd3, ...), hub id or local diffusers directory")
    p.add_argument("--budget", type=float, help="fraction of dense transformer MACs over the run, in (0, 1]")
    p.add_argument("--out", type=Path, help="output directory (default: engines/<model>-<H>x<W>-s<S>-b<B>)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    p.add_argument("--steps", type=int, help="denoising steps (default 28)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.0; > 1 doubles the batch)")
    p.add_argument("--max-sequence-length", type=int,
                   help="T5 text tokens the engines are built for (static; default: the model's, else 256)")
    p.add_argument("--prompts", help="calibration prompts, one per line (default: the built-in set)")
    p.add_argument("--num-prompts", type=int, default=4, help="calibration prompts measured as whole runs (default 4)")
    p.add_argument("--max-buckets", type=int, default=4, help="static shapes, the dense one included (default 4)")
    p.add_argument("--policy", default=None,
                   help="token selection policy the runtime will use (default: the model family's: cat; dynamics "
                        "for U-Nets)")
    p.add_argument("--no-reuse-steps", action="store_true",
                   help="calibrate token pruning only: never replace a whole step by the previous prediction")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights/activations dtype")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "tensorrt"],
                   help="auto: engines when TensorRT + GPU are here, else ONNX only; tensorrt: fail without them")
    p.add_argument("--schedule", help="use this schedule file instead of calibrating")
    p.add_argument("--force", action="store_true",
                   help="replace an existing export (only a tokprune export or an empty directory; anything else "
                        "is refused)")
    return add_common(p)


def main(argv: Sequence[str] | None = None) -> int:
    """``tokprune-export``. Example: ``main(["--model", "sd3-tiny", "--budget", "0.5", "--steps", "8"])``."""

    def body(args: argparse.Namespace) -> int:
        from tokprune.export.exporter import ExportConfig, export_model

        config = ExportConfig(
            model=args.model, budget=args.budget, height=args.height, width=args.width, steps=args.steps,
            guidance=args.guidance, max_sequence_length=args.max_sequence_length, prompts_file=args.prompts, num_prompts=args.num_prompts,
            max_buckets=args.max_buckets, policy=args.policy, allow_reuse=not args.no_reuse_steps,
            precision=args.precision, backend=args.backend,
            schedule_file=args.schedule,
        )
        command = command_line(list(sys.argv[1:] if argv is None else argv))
        result = export_model(config, args.out, force=args.force, progress=not args.quiet, command=command)
        m = result.manifest
        if not result.up_to_date:
            print(
                f"exported {len(m['buckets'])} bucket(s) of {m['model']['name']} at {m['height']}x{m['width']}, "
                f"{m['steps']} steps: budget {m['budget']:g}, achieved mac_fraction {m['mac_fraction']:.4f}, "
                f"{result.seconds:.1f} s" + (f" (reused {len(result.reused)} from an interrupted run)" if result.reused else "")
            )
        print(f"{result.directory}: {result.message}")
        return 0

    return run_cli(_export_parser(), argv, body, interrupted_hint=RESUME_HINT)


# ---- tokprune-build ----------------------------------------------------------------------------------
def build_main(argv: Sequence[str] | None = None) -> int:
    """``tokprune-build DIR``: TensorRT engines for an existing export (on a GPU host with TensorRT >= 10.9)."""
    p = argparse.ArgumentParser(
        prog="tokprune-build",
        description="Build one TensorRT engine per bucket of an export directory and record the build in its manifest.",
    )
    p.add_argument("directory", type=Path, help="a directory written by tokprune-export")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimisation level 0-5 (default 3)")
    p.add_argument("--rebuild", action="store_true", help="replace engines that are already built")
    add_common(p)

    def body(args: argparse.Namespace) -> int:
        from tokprune.export.manifest import load_manifest
        from tokprune.export.tensorrt import build_engines

        from tokprune.errors import ManifestError
        from tokprune.export.manifest import verify

        load_manifest(args.directory)  # not an export: say so before anything about TensorRT
        edited = [p for p in verify(args.directory) if p.startswith("manifest:")]
        if edited:  # a rebuild rewrites the manifest: never bless an edited one
            raise ManifestError(f"{args.directory}: {'; '.join(edited)}; re-export it (tokprune-inspect "
                                f"{args.directory} --verify lists every problem)")
        engines = build_engines(args.directory, opt_level=args.opt_level, progress=not args.quiet, rebuild=args.rebuild)
        print(f"{args.directory}: engines built with TensorRT {engines['tensorrt']} on {engines['gpu']['name']}")
        return 0

    return run_cli(p, argv, body)


# ---- tokprune-inspect --------------------------------------------------------------------------------
def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_manifest(manifest, *, io: bool = False) -> str:
    """The manifest as text: settings, versions, buckets table, per-step buckets (and I/O tables)."""
    d = manifest.data
    v = d["versions"]
    eng = d.get("engines")
    out = [
        f"export       {manifest.directory}",
        f"model        {d['model']['name']} ({d['model']['source']}: {d['model']['ref']}), fingerprint {d['model']['fingerprint']}",
        f"sampling     {d['height']}x{d['width']}, {d['steps']} steps, guidance {d['guidance']:g}, {d['scheduler']['class']}",
        f"budget       {d['budget']:g} -> mac_fraction {d['mac_fraction']:.4f}  (policy {d.get('policy')}, reuse {d['reuse']})",
        f"precision    {d['precision']}, opset {d['opset']}, batch {d['geometry']['batch']}",
        f"weights      {d['weights']['file']['path']} {_human(d['weights']['file']['size'])}, stored/dense "
        f"{d['weights'].get('ratio')}",
        f"versions     tokprune {v['tokprune']}, torch {v['torch']}, diffusers {v['diffusers']}, onnx {v['onnx']}, "
        f"onnxruntime {v['onnxruntime']}, tensorrt {v['tensorrt']}",
        "engines      " + (
            f"TensorRT {eng['tensorrt']} on {eng['gpu']['name']} (sm {eng['gpu']['compute_capability']}), flags {eng['flags']}"
            if eng else "none (build with: tokprune-build " + str(manifest.directory) + ")"
        ),
        "",
    ]
    rows = [["bucket", "K", "K_txt", "steps", "inputs", "onnx", "engine", "ort vs torch", "lint"]]
    for b in d["buckets"]:
        eq = b["equivalence"]
        eq_text = f"{eq['status']} {eq['worst']:.1e}" if "worst" in eq else eq["status"]
        n_err = sum(1 for i in b["lint"] if i["severity"] == "error")
        n_warn = len(b["lint"]) - n_err
        engine = b["files"].get("engine")
        rows.append([
            b["key"], str(b["image_keep"]), str(b["text_keep"]), str(len(b["steps"])),
            str(sum(1 for t in b["io"] if t["role"] == "input")), _human(b["files"]["onnx"]["size"]),
            _human(engine["size"]) if engine else "-", eq_text, f"{n_err} err, {n_warn} warn",
        ])
    out.append(_table(rows))
    out.append("")
    out.append("steps        " + " ".join("reuse" if k is None else k for k in d["step_buckets"]))
    if io:
        for b in d["buckets"]:
            out.append("")
            out.append(f"[{b['key']}]")
            rows = [["role", "name", "shape", "dtype"]]
            rows += [[t["role"], t["name"], "x".join(map(str, t["shape"])), t["dtype"]] for t in b["io"]]
            out.append(_table(rows))
    return "\n".join(out)


def inspect_main(argv: Sequence[str] | None = None) -> int:
    """``tokprune-inspect DIR [--verify]``: print the manifest; with --verify re-hash every file (exit 1 on a problem)."""
    p = argparse.ArgumentParser(prog="tokprune-inspect", description="Show an export directory's manifest.")
    p.add_argument("directory", type=Path)
    p.add_argument("--verify", action="store_true", help="re-hash every file; name missing or corrupted ones")
    p.add_argument("--io", action="store_true", help="also print every bucket's I/O table")
    add_common(p)

    def body(args: argparse.Namespace) -> int:
        from tokprune.export.manifest import load_manifest, verify_report

        manifest = load_manifest(args.directory)
        try:
            print(format_manifest(manifest, io=args.io))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a hand-edited manifest
            if not args.verify:
                from tokprune.errors import ManifestError

                raise ManifestError(
                    f"{args.directory}/manifest.json cannot be shown ({type(exc).__name__}: {exc}): a field is missing "
                    f"or malformed; tokprune-inspect {args.directory} --verify names what changed"
                ) from None
            print(f"(the manifest cannot be shown in full: {type(exc).__name__}: {exc})")
        if not args.verify:
            return 0
        problems, notes = verify_report(args.directory)
        for note in notes:
            print(f"note: {note}")
        if problems:
            print(file=sys.stderr)
            for line in problems:
                print(f"tokprune-inspect: {line}", file=sys.stderr)
            print(f"tokprune-inspect: {len(problems)} problem(s); re-export with tokprune-export ... --force", file=sys.stderr)
            return 1
        what = "the manifest matches its content hash and " if not notes else ""
        print(f"\nverified: {what}{len(manifest.files())} files match their sha256")
        return 0

    return run_cli(p, argv, body)
