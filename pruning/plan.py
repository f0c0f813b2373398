"""Per-step keep plans: how many image (and text) tokens each denoising step computes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tokprune.errors import ConfigError

ALL = -1  # sentinel in a plan: keep every token


@dataclass(frozen=True)
class PrunePlan:
    """Keep counts per denoising step.

    ``image_keep[s]``: image tokens step ``s`` computes: ``ALL`` (-1) or N = dense; ``0`` = no
    transformer call, reuse the previous step's prediction; otherwise ``0 < K < N``.
    ``text_keep[s]``: text tokens kept at step ``s`` (``ALL`` = all T). Text pruning, once it
    starts, keeps the most-attended tokens measured at the last full-text dense step before it.

    Example::

        plan = PrunePlan.from_ratios([1.0] * 4 + [0.5] * 24, num_tokens=4096)
    """

    image_keep: tuple[int, ...]
    text_keep: tuple[int, ...] | None = None
    #: Step caching (DeepCache, U-Net families): True where only the shallow blocks run and the deep
    #: features of the last full step are reused; ``image_keep`` then applies to the shallow blocks.
    #: None (default) = no cached steps. Families without step caching refuse plans that use it.
    step_cache: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.image_keep) == 0:
            raise ConfigError("a plan needs at least one step, got an empty image_keep")
        for s, k in enumerate(self.image_keep):
            if not isinstance(k, int) or k < ALL:
                raise ConfigError(f"image_keep[{s}] = {k!r}; expected an int >= 0, or ALL (-1)")
        if self.image_keep[0] == 0:
            raise ConfigError("image_keep[0] = 0 (reuse) but step 0 has no previous prediction; make step 0 dense")
        if self.text_keep is not None:
            if len(self.text_keep) != len(self.image_keep):
                raise ConfigError(
                    f"text_keep has {len(self.text_keep)} steps but image_keep has {len(self.image_keep)}; they must match"
                )
            for s, k in enumerate(self.text_keep):
                if not isinstance(k, int) or (k < 1 and k != ALL):
                    raise ConfigError(f"text_keep[{s}] = {k!r}; expected an int >= 1, or ALL (-1)")
        if self.step_cache is not None:
            if len(self.step_cache) != len(self.image_keep):
                raise ConfigError(
                    f"step_cache has {len(self.step_cache)} steps but image_keep has {len(self.image_keep)}; they must match"
                )
            if self.step_cache[0]:
                raise ConfigError("step_cache[0] is True but a cached step needs an earlier full step; make step 0 full")
            for s, (c, k) in enumerate(zip(self.step_cache, self.image_keep)):
                if not isinstance(c, bool):
                    raise ConfigError(f"step_cache[{s}] = {c!r}; expected a bool")
                if c and k == 0:
                    raise ConfigError(f"step {s} is both cached (step_cache) and a reuse step (image_keep 0); pick one")

    @property
    def num_steps(self) -> int:
        return len(self.image_keep)

    def image_k(self, step: int, num_tokens: int) -> int:
        """Resolved image keep count of ``step`` (ALL -> N), checked against N."""
        k = self.image_keep[step]
        if k == ALL:
            return num_tokens
        if k > num_tokens:
            raise ConfigError(f"plan step {step} keeps {k} image tokens but the model has only N={num_tokens}")
        return k

    def text_k(self, step: int, num_text: int) -> int:
        if self.text_keep is None or self.text_keep[step] == ALL:
            return num_text
        k = self.text_keep[step]
        if k > num_text:
            raise ConfigError(f"plan step {step} keeps {k} text tokens but the call has only T={num_text}")
        return k

    def prunes_text(self) -> bool:
        return self.text_keep is not None and any(k != ALL for k in self.text_keep)

    def is_dense(self, step: int) -> bool:
        """All image and all text tokens at ``step`` (the only steps that may reset a policy's reference)."""
        return (
            self.image_keep[step] == ALL
            and (self.text_keep is None or self.text_keep[step] == ALL)
            and not self.is_cached(step)
        )

    def is_cached(self, step: int) -> bool:
        """``step`` runs only the shallow blocks and reuses the deep features (:attr:`step_cache`)."""
        return self.step_cache is not None and bool(self.step_cache[step])

    def prunes_text_at(self, step: int) -> bool:
        """``step`` calls the transformer with fewer than all text tokens."""
        return self.image_keep[step] != 0 and self.text_keep is not None and self.text_keep[step] != ALL

    def probe_steps(self) -> tuple[int, ...]:
        """Steps whose dense call must also measure text importance (the ``text_mass`` probe).

        Text pruning ranks text tokens by the attention mass measured at the last dense full-text
        step before it. So a step probes iff it is dense (all image and text tokens) and the next
        step that is either dense or text-pruned is text-pruned. Reuse steps and image-only pruned
        steps in between do not change the measured importance. Empty when text is never pruned.

        >>> PrunePlan((ALL, ALL, 8, 0, 8), text_keep=(ALL, ALL, 4, ALL, 4)).probe_steps()
        (1,)
        """
        if not self.prunes_text():
            return ()
        out = []
        for s in range(self.num_steps):
            if not self.is_dense(s):
                continue
            for nxt in range(s + 1, self.num_steps):
                if self.prunes_text_at(nxt):
                    out.append(s)
                    break
                if self.is_dense(nxt):
                    break
        return tuple(out)

    @classmethod
    def dense(cls, steps: int) -> "PrunePlan":
        return cls(image_keep=(ALL,) * steps)

    @classmethod
    def from_ratios(
        cls, ratios: Sequence[float], num_tokens: int, *, align: int = 1, text_ratios: Sequence[float] | None = None,
        num_text: int | None = None,
    ) -> "PrunePlan":
        """Plan from keep fractions (1.0 = dense, 0 = reuse), rounding K up to a multiple of ``align``."""

        def k_of(r: float, n: int) -> int:
            if not 0.0 <= r <= 1.0:
                raise ConfigError(f"keep ratio {r} is outside [0, 1]")
            if r >= 1.0:
                return ALL
            if r == 0.0:
                return 0
            k = -(-int(round(r * n * 1e6)) // int(1e6))  # ceil without float drift
            k = min(n, -(-k // align) * align)
            return ALL if k >= n else k

        image = tuple(k_of(r, num_tokens) for r in ratios)
        text = None
        if text_ratios is not None:
            if num_text is None:
                raise ConfigError("text_ratios needs num_text (T)")
            text = tuple(max(1, k) if k != ALL else ALL for k in (k_of(r, num_text) for r in text_ratios))
        return cls(image_keep=image, text_keep=text)
