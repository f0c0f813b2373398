"""What to benchmark, as frozen dataclasses: one per kind of benchmark, checked when built.

- :class:`GridScenario`: ``tokprune-bench``'s grid over an export directory (backends x dense/pruned, the
  pipeline's own call with the settings the export was made for: :mod:`tokprune.bench.grid`);
- :class:`LoopScenario`: a bare transformer in a denoising loop at a chosen architecture and size, with
  schedules from :mod:`tokprune.calibrate.baselines` (the GPU scenario: :mod:`tokprune.bench.scenarios.gpu_ready`).

Example::

    from tokprune.bench.scenario import GridScenario, LoopScenario
    GridScenario(engines="engines/sd3-tiny-64x64-s8-b0.5", backends=("eager", "onnxruntime"), runs=3)
    LoopScenario.tiny()               # the CPU dry run of the GPU scenario
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tokprune.errors import ConfigError

__all__ = ["BACKENDS", "DEFAULT_PROMPTS", "LOOP_MODES", "GridScenario", "LoopScenario"]

BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt", "torch")
DEFAULT_PROMPTS = ("a red circle on a blue background", "a photo of a small cat in the sun")
#: modes of :class:`LoopScenario` (``--skip`` names): torch.compile, CUDA graphs, ONNX Runtime, diffusers' first-block cache
LOOP_MODES = ("compiled", "graphs", "ort", "fbc")


def _check_counts(runs: int, warmup: int, runs_flag: str) -> None:
    if isinstance(runs, bool) or runs < 1 or warmup < 0:
        raise ConfigError(f"{runs_flag} {runs} / --warmup {warmup}; expected {runs_flag} >= 1 and --warmup >= 0")


@dataclass(frozen=True)
class GridScenario:
    """The ``tokprune-bench`` grid. Settings that define the images (size, steps, guidance) come from the manifest.

    Args that matter: ``engines`` (an export directory), ``backends`` (subset of :data:`BACKENDS`;
    eager dense always runs, it is the baseline), ``runs`` (measured repeats per prompt).
    Args to tinker with: ``warmup`` (unmeasured generations per arm; >= 1 so torch.compile and ONNX
    Runtime's first-call costs are excluded), ``prompts``, ``seed`` (prompt i uses seed + i), ``threads``
    (intra-op threads of torch and ONNX Runtime alike; default: torch's default), ``device``.
    """

    engines: str | Path
    backends: tuple[str, ...] = ("eager", "compile", "onnxruntime", "tensorrt")
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    runs: int = 3
    warmup: int = 1
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ConfigError(f"--backends {','.join(unknown)}: unknown; expected a comma list of {','.join(BACKENDS)}")
        _check_counts(self.runs, self.warmup, "--runs")
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise ConfigError("no prompts to benchmark (empty list or empty lines); pass --prompts FILE, one per line")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads}; expected an int >= 1")


@dataclass(frozen=True)
class LoopScenario:
    """A bare transformer in a flow-matching Euler loop: dense, pruned (CAT schedules) and the other modes.

    Args that matter: ``arch`` (a :data:`tokprune.bench.models.TRANSFORMER_ARCHS` name, or ``"tiny"``, the
    offline tiny SD3 transformer), ``budgets`` (one CAT schedule per MAC budget), ``steps``, ``device``.
    Args to tinker with: ``repeats`` / ``warmup`` (loops per mode), ``dtype`` (``bf16`` / ``fp16`` / ``fp32``),
    ``text_tokens`` (None: 77 CLIP + 256 T5), ``skip`` (subset of :data:`LOOP_MODES`), ``fbc_thresholds``
    (first-block cache thresholds tried; the one closest to the plan's MAC fraction is reported),
    ``tolerance`` (relative error allowed between the keep-all pruned loop and diffusers' dense loop).
    """

    arch: str = "sd3-medium"
    steps: int = 28
    budgets: tuple[float, ...] = (0.5,)
    repeats: int = 3
    warmup: int = 1
    device: str = "cuda"
    dtype: str = "bf16"
    batch: int = 2
    text_tokens: int | None = None
    skip: frozenset[str] = frozenset()
    fbc_thresholds: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.8)
    tolerance: float = 5e-2

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip", frozenset(self.skip))
        object.__setattr__(self, "budgets", tuple(float(b) for b in self.budgets))
        unknown = sorted(self.skip - set(LOOP_MODES))
        if unknown:
            raise ConfigError(f"--skip {','.join(unknown)}: unknown; expected a comma list of {','.join(LOOP_MODES)}")
        if not self.budgets or not all(0.0 < b < 1.0 for b in self.budgets):
            raise ConfigError(f"--budgets {','.join(map(str, self.budgets))}; expected MAC fractions in (0, 1), e.g. 0.5,0.3")
        if self.steps < 2:
            raise ConfigError(f"--steps {self.steps}; expected an int >= 2 (a dense warm-up step, then pruned steps)")
        _check_counts(self.repeats, self.warmup, "--repeats")
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"--dtype {self.dtype}; expected bf16, fp16 or fp32")

    @classmethod
    def tiny(cls, **changes: object) -> LoopScenario:
        """The dry run: the tiny SD3 transformer, fp32, CPU, 10 steps, one repeat, no torch.compile (measures nothing)."""
        base = cls(arch="tiny", steps=10, repeats=1, warmup=0, device="cpu", dtype="fp32", text_tokens=20,
                   skip=frozenset({"compiled"}), fbc_thresholds=(0.1, 0.8), tolerance=1e-3)
        return replace(base, **changes)  # type: ignore[arg-type]
