"""PNG of a schedule: per-step keep counts, bucket levels, reuse steps, the CAT reference."""

from __future__ import annotations

from pathlib import Path

from tokprune.calibrate.schedule import Schedule


def plot_schedule(schedule: Schedule, path: str | Path) -> Path:
    """Write a PNG of ``schedule`` to ``path`` (matplotlib's Agg canvas; no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, t = schedule.num_tokens, schedule.text_tokens
    steps = list(range(schedule.steps))
    img, txt, reuse_steps = [], [], []
    for s in steps:
        b = schedule.bucket_at(s)
        if b is None:  # no call: no bar, and a gap in the text line
            img.append(0.0)
            txt.append(float("nan"))
            reuse_steps.append(s)
        else:
            img.append(b.image_keep / n)
            txt.append(b.text_keep / t)

    fig = Figure(figsize=(9, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(steps, img, width=0.8, color="#4C72B0", label=f"image keep K / N (N={n})")
    ax.step(steps, txt, where="mid", color="#DD8452", linewidth=2, label=f"text keep / T (T={t})")
    if reuse_steps:
        ax.scatter(
            reuse_steps, [0.02] * len(reuse_steps), marker="x", color="#C44E52", zorder=3, label="reuse (no call)"
        )
    levels: dict[int, list[str]] = {}
    for b in schedule.buckets:
        levels.setdefault(b.image_keep, []).append(b.key)
    for k, keys in levels.items():  # one dotted line per image keep level, labelled with its buckets
        ax.axhline(k / n, color="gray", linestyle=":", linewidth=0.8)
        ax.text(schedule.steps - 0.45, k / n, ", ".join(keys), fontsize=7, va="bottom", ha="right", color="dimgray")
    cat = schedule.stats.get("cat_reference")
    if cat:
        ax.plot(
            steps,
            [k / n for k in cat["image_keep"]],
            color="#55A868",
            linestyle="--",
            linewidth=1.5,
            label=f"CAT reference ({cat['mac_fraction']:.2f} of dense MACs)",
        )
    ax.set_xlabel("denoising step")
    ax.set_ylabel("fraction of tokens kept")
    ax.set_ylim(0, 1.3)
    ax.set_xlim(-0.6, schedule.steps - 0.4)
    ax.set_title(
        f"{schedule.model} {schedule.height}x{schedule.width}, {schedule.steps} steps: budget {schedule.budget:.2f}, "
        f"achieved {schedule.mac_fraction:.3f}, {len(schedule.buckets)} buckets",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
