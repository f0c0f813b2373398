"""What ``tokprune-demo`` shows: the picture grid (top row dense, bottom row pruned) and the speed table.

Example::

    import numpy as np
    from pathlib import Path
    from tokprune.demo.report import grid, table
    imgs = np.zeros((2, 32, 32, 3))
    grid([("dense", imgs), ("pruned", imgs)], ["a red circle", "a blue square"], Path("demo-output/grid.png"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["grid", "table"]


def grid(rows: list[tuple[str, Any]], prompts: list[str], path: Path) -> None:
    """Write one labelled row of (N, H, W, 3) images in [0, 1] per entry of ``rows`` to ``path`` (atomically)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from tokprune.fsutil import atomic_output

    h, w = rows[0][1].shape[1:3]
    label_w, pad, cap_h = 90, 4, 28
    canvas = Image.new("RGB", (label_w + len(prompts) * (w + pad), cap_h + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, prompt in enumerate(prompts):
        draw.text((label_w + j * (w + pad), 2), "\n".join(_wrap(prompt, 24)[:2]), fill="black")
    for i, (label, images) in enumerate(rows):
        y = cap_h + i * (h + pad)
        draw.text((4, y + h // 2 - 6), label, fill="black")
        for j, img in enumerate(images):
            tile = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype("uint8"))
            canvas.paste(tile, (label_w + j * (w + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:  # no half-written grid on an interrupt or a full disk
        canvas.save(tmp)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def table(r: dict[str, Any]) -> str:
    """The markdown speed table of one demo result (the dict :func:`tokprune.demo.cli.run` returns)."""
    rows = [
        "| run | backend | MAC fraction | seconds for the grid | vs eager dense | vs ONNX Runtime dense "
        "| PSNR vs eager dense | accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| dense | PyTorch eager (diffusers) | 1.000 | {r['dense_s']:.1f} | 1.00x | | | {_acc(r, 'dense')} |",
        f"| dense | ONNX Runtime, dense bucket every step | 1.000 | {r['ort_dense_s']:.1f} | "
        f"{r['export_gain']:.2f}x export gain | 1.00x | {_db(r['ort_dense_psnr_db'])} | {_acc(r, 'ort_dense')} |",
        f"| pruned | ONNX Runtime engines, schedule | {r['mac_fraction']:.3f} | {r['pruned_s']:.1f} | "
        f"{r['speedup']:.2f}x overall | {r['pruning_gain']:.2f}x pruning gain | {_db(r['psnr_db'])} | "
        f"{_acc(r, 'pruned')} |",
    ]
    rows.append(
        f"\nExport gain {r['export_gain']:.2f}x (ONNX Runtime dense vs PyTorch eager dense) x pruning gain "
        f"{r['pruning_gain']:.2f}x (ONNX Runtime pruned vs ONNX Runtime dense) = overall {r['speedup']:.2f}x. "
        "MAC fraction counts every transformer MAC that runs."
    )
    head = f"{r['model']}: {r['n']} images, {r['steps']} steps, budget {r['budget']:g} (CPU timings of one run: ratios, not absolutes)"
    return head + "\n\n" + "\n".join(rows)


def _db(x: float) -> str:
    return "identical" if x == float("inf") else f"{x:.1f} dB"


def _acc(r: dict[str, Any], name: str) -> str:
    v = r.get(f"accuracy_{name}")
    return "" if v is None else f"{100 * v:.1f}%"
