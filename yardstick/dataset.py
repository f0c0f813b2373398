"""Procedural captioned shapes: 1-3 flat-coloured objects on black, each in one cell of a 3x3 grid.

Every scene is a pure function of ``(index, seed)``, so the training set is infinite, the
held-out split is just another seed, and a checker can read every stated attribute back off
the pixels (:mod:`tokprune.yardstick.checker`).

The closed world (recommended as is; the checker and tokenizers are built from it):

- image 128x128 RGB uint8, background black; grid 3x3 of cells ~43 px;
- shapes ``circle, square, triangle, cross``; colours ``red, green, blue, yellow, white``;
- sizes ``small`` (19 px across) and ``large`` (33 px across), jittered +-3 px inside its cell;
- caption: objects in reading order joined by "and", e.g.
  ``"a small red circle at the top left and a large blue square in the center"``.

Example::

    from tokprune.yardstick.dataset import sample, render_batch, TRAIN_SEED
    image, caption, spec = sample(0, seed=TRAIN_SEED)      # (128, 128, 3) uint8, str, SceneSpec
    images, captions, specs = render_batch(range(64))      # (64, 3, 128, 128) float in [-1, 1]

Geometry uses integer arithmetic in *doubled* pixel units (pixel ``i`` has its centre at
``2*i + 1``), so masks are bit-identical on every device and in the checker's templates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from tokprune.errors import ConfigError

IMAGE_SIZE = 128
GRID = 3
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (40, 200, 40),
    "blue": (40, 90, 255),
    "yellow": (240, 220, 40),
    "white": (240, 240, 240),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
# Half extent in pixels: a shape covers 2*r + 1 pixels across (bounding box, all shapes alike).
SIZES: dict[str, int] = {"small": 9, "large": 16}
JITTER = 3  # max offset (px) of an object's centre from its cell centre, per axis
MAX_OBJECTS = 3

# Cell c covers pixels [CELL_EDGES[c], CELL_EDGES[c + 1]); a large object at max jitter keeps >= 2 px margin.
CELL_EDGES: tuple[int, ...] = (0, 43, 86, 128)
CELL_CENTERS: tuple[int, ...] = (21, 64, 106)
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}

TRAIN_SEED = 0
EVAL_SEED = 1  # the held-out split: same generator, another seed
SPLIT_SEEDS: dict[str, int] = {"train": TRAIN_SEED, "eval": EVAL_SEED}


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order (the tokenizers are built from it)."""
    words = ["a", "and"] + list(SIZES) + list(COLOURS) + list(SHAPES)
    for phrase in POSITIONS.values():
        for word in phrase.split():
            if word not in words:
                words.append(word)
    return words


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One object: what it is and where (cell ``row, col`` plus a pixel jitter ``dx, dy``)."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    dx: int = 0
    dy: int = 0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.colour not in COLOURS or self.size not in SIZES:
            raise ConfigError(
                f"ObjectSpec({self.shape!r}, {self.colour!r}, {self.size!r}): expected shape in {SHAPES}, "
                f"colour in {tuple(COLOURS)}, size in {tuple(SIZES)}"
            )
        if not (0 <= self.row < GRID and 0 <= self.col < GRID) or max(abs(self.dx), abs(self.dy)) > JITTER:
            raise ConfigError(f"ObjectSpec cell ({self.row}, {self.col}) / jitter ({self.dx}, {self.dy}) out of range")

    @property
    def center(self) -> tuple[int, int]:
        """Centre pixel ``(x, y)``."""
        return CELL_CENTERS[self.col] + self.dx, CELL_CENTERS[self.row] + self.dy

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITIONS[(self.row, self.col)]}"


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """A scene: up to :data:`MAX_OBJECTS` objects in distinct cells, kept in reading order."""

    objects: tuple[ObjectSpec, ...]

    def __post_init__(self) -> None:
        cells = [(o.row, o.col) for o in self.objects]
        if not 1 <= len(cells) <= MAX_OBJECTS or len(set(cells)) != len(cells):
            raise ConfigError(f"SceneSpec needs 1..{MAX_OBJECTS} objects in distinct cells, got cells {cells}")
        if cells != sorted(cells):
            object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: (o.row, o.col))))

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase for o in self.objects)

    def cells(self) -> set[tuple[int, int]]:
        return {(o.row, o.col) for o in self.objects}


def sample_spec(index: int, seed: int = TRAIN_SEED) -> SceneSpec:
    """The scene at ``index`` of the stream ``seed``: a pure function of both (NumPy SeedSequence)."""
    rng = np.random.default_rng([int(seed), int(index)])
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objects = []
    for cell in sorted(int(c) for c in cells):
        shape, colour, size = (int(v) for v in rng.integers(0, (len(SHAPES), len(COLOURS), len(SIZES))))
        dx, dy = (int(v) for v in rng.integers(-JITTER, JITTER + 1, size=2))
        objects.append(
            ObjectSpec(SHAPES[shape], list(COLOURS)[colour], list(SIZES)[size], cell // GRID, cell % GRID, dx, dy)
        )
    return SceneSpec(tuple(objects))


def parse_caption(caption: str) -> SceneSpec:
    """Invert :attr:`SceneSpec.caption` (objects at their cell centres, no jitter).

    Raises :class:`ConfigError` naming the phrase it cannot read.
    """
    by_phrase = {v: k for k, v in POSITIONS.items()}
    objects = []
    for phrase in caption.strip().lower().split(" and "):
        words = phrase.split()
        if len(words) < 5 or words[0] != "a" or " ".join(words[4:]) not in by_phrase:
            raise ConfigError(f"cannot parse {phrase!r}: expected 'a <size> <colour> <shape> <position>'")
        row, col = by_phrase[" ".join(words[4:])]
        objects.append(ObjectSpec(words[3], words[2], words[1], row, col))
    return SceneSpec(tuple(objects))


def shape_mask(shape: str, dx, dy, r2):
    """Boolean mask of ``shape`` from offsets ``dx, dy`` to its centre and half extent ``r2``.

    All three in doubled pixel units, as NumPy or torch integer arrays that broadcast; the
    bounding box of every shape is ``|dx|, |dy| <= r2``. Fill ratio of that box: circle ~0.785,
    square 1, triangle ~0.5, cross ~0.56.
    """
    adx, ady = abs(dx), abs(dy)
    inside = (adx <= r2) & (ady <= r2)
    if shape == "circle":  # "+ r2" rounds the rim (no one-pixel nubs) without widening the box
        return dx * dx + dy * dy <= r2 * r2 + r2
    if shape == "square":
        return inside
    if shape == "triangle":  # apex up, base at the bottom edge
        return (2 * adx <= dy + r2) & (dy <= r2)
    if shape == "cross":  # bars one third of the extent wide
        w2 = r2 // 3
        return inside & ((adx <= w2) | (ady <= w2))
    raise ConfigError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def scene_params(specs: Sequence[SceneSpec]) -> torch.Tensor:
    """(B, MAX_OBJECTS, 5) int32 per object: shape id (-1 = none), colour id, centre x2, centre y2, r2.

    The compact form :func:`render` draws from; cheap to build on CPU and ship to a GPU.
    """
    rows = []
    colour_ids = {c: i for i, c in enumerate(COLOURS)}
    for spec in specs:
        row = [[-1] * 5 for _ in range(MAX_OBJECTS)]
        for k, o in enumerate(spec.objects):
            x, y = o.center
            row[k] = [SHAPES.index(o.shape), colour_ids[o.colour], 2 * x + 1, 2 * y + 1, 2 * SIZES[o.size]]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32).reshape(len(specs), MAX_OBJECTS, 5)


def render(specs: Sequence[SceneSpec] | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Rasterise scenes (specs, or their :func:`scene_params`) on ``device``: (B, H, W, 3) uint8.

    Integer arithmetic only, so the result is bit-identical on CPU and GPU.
    """
    params = (specs if isinstance(specs, torch.Tensor) else scene_params(specs)).to(device)  # (B, K, 5)
    batch = params.shape[0]
    coords = 2 * torch.arange(IMAGE_SIZE, device=params.device, dtype=torch.int32) + 1
    shape_id, colour_id = params[..., 0, None, None], params[..., 1, None, None]  # (B, K, 1, 1)
    cx, cy, r2 = params[..., 2, None, None], params[..., 3, None, None], params[..., 4, None, None]
    dx, dy = coords.view(1, 1, 1, -1) - cx, coords.view(1, 1, -1, 1) - cy  # (B, K, 1, W), (B, K, H, 1)
    mask = torch.zeros((batch, MAX_OBJECTS, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.bool, device=params.device)
    for i, shape in enumerate(SHAPES):
        mask |= shape_mask(shape, dx, dy, r2) & (shape_id == i)
    palette = torch.tensor([BACKGROUND, *COLOURS.values()], dtype=torch.uint8, device=params.device)  # (1+C, 3)
    # Objects never overlap (distinct cells), so one label per pixel: 0 = background, 1 + colour id.
    label = (mask * (colour_id + 1)).amax(dim=1)  # (B, H, W)
    return palette[label.long()]  # (B, H, W, 3)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], the VAE's input range."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 NumPy."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def sample(index: int, seed: int = TRAIN_SEED) -> tuple[np.ndarray, str, SceneSpec]:
    """One example: ``(image (128, 128, 3) uint8, caption, spec)``; deterministic in ``(index, seed)``."""
    spec = sample_spec(index, seed)
    return render([spec])[0].numpy(), spec.caption, spec


def render_batch(
    indices: Iterable[int], seed: int = TRAIN_SEED, device: torch.device | str | None = None
) -> tuple[torch.Tensor, list[str], list[SceneSpec]]:
    """A batch: ``(images (B, 3, H, W) float in [-1, 1] on device, captions, specs)``."""
    specs = [sample_spec(i, seed) for i in indices]
    return to_model_input(render(specs, device)), [s.caption for s in specs], specs


class ShapesDataset(torch.utils.data.IterableDataset):
    """Stream of ``{"image": (3, H, W) float in [-1, 1], "caption": str, "index": int}``.

    ``split="train"`` is the infinite training stream (``length=None``); ``split="eval"`` is the
    held-out stream (another seed). Indices are sharded across DataLoader workers.
    """

    def __init__(self, split: str = "train", start: int = 0, length: int | None = None, seed: int | None = None):
        if split not in SPLIT_SEEDS:
            raise ConfigError(f"split={split!r}; expected one of {tuple(SPLIT_SEEDS)}")
        self.seed = SPLIT_SEEDS[split] if seed is None else seed
        self.start, self.length = start, length

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start + worker
        stop = None if self.length is None else self.start + self.length
        while stop is None or index < stop:
            image, caption, _ = sample(index, self.seed)
            yield {"image": to_model_input(torch.from_numpy(image)[None])[0], "caption": caption, "index": index}
            index += workers
