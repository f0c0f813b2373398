"""Read a shapes scene back off its pixels and score it against the scene it should show.

For every stated object the checker looks only inside the object's grid cell:

1. each pixel takes the nearest palette colour (background included);
2. the largest 4-connected foreground component is the object (``present`` when it has at
   least :data:`MIN_PIXELS` pixels and is no wider than :data:`MAX_EXTENT`, i.e. looks like
   one object and not a smear over the cell: this is the *position* attribute);
3. *colour* is the component's majority palette colour;
4. *size* is ``large`` when its bounding box spans more than half-way between the two sizes;
5. *shape* is the template (same renderer as the dataset, fitted to the bounding box,
   +-1 px) with the highest IoU against the component.

Cells no object was stated in must be empty (``extra`` counts those with a component of
:data:`MIN_PIXELS` or more, object-like or not).
Ground-truth images score 1.0 on every attribute (tested on hundreds of samples).

Example::

    from tokprune.yardstick.dataset import sample, parse_caption
    from tokprune.yardstick.checker import score
    image, caption, spec = sample(3)
    score([image], [parse_caption(caption)])["mean"]   # 1.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tokprune.errors import ShapeError
from tokprune.yardstick.dataset import (
    BACKGROUND,
    CELL_EDGES,
    COLOURS,
    GRID,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    SceneSpec,
    shape_mask,
)

ATTRIBUTES: tuple[str, ...] = ("position", "colour", "shape", "size")
_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.int32)  # (1 + C, 3)
_COLOUR_NAMES = list(COLOURS)
# A component smaller than a quarter of the smallest small shape (~190 px) is not an object.
MIN_PIXELS = 45
# Doubled half extent between small (18) and large (32): 25.
_SIZE_THRESHOLD = SIZES["small"] + SIZES["large"]
# Widest plausible object in pixels: a large one (33 px) plus 6 px of slack for soft edges.
MAX_EXTENT = 2 * SIZES["large"] + 1 + 6


@dataclasses.dataclass(frozen=True)
class Reading:
    """What one grid cell shows: its largest foreground component and what it looks like."""

    pixels: int
    extent: int = 0  # bounding-box side in pixels (the larger of width and height)
    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    shape_iou: float = 0.0

    @property
    def occupied(self) -> bool:
        """Something is drawn here (object or smear)."""
        return self.pixels >= MIN_PIXELS

    @property
    def present(self) -> bool:
        """An object-sized thing is drawn here."""
        return self.occupied and self.extent <= MAX_EXTENT


@dataclasses.dataclass(frozen=True)
class ImageCheck:
    """Per stated object: which attributes hold (``{"position": bool, ...}``), plus extra objects."""

    objects: tuple[dict[str, bool], ...]
    readings: tuple[Reading, ...]
    extra: int  # non-empty cells where nothing was stated

    @property
    def correct(self) -> bool:
        return self.extra == 0 and all(all(o.values()) for o in self.objects)


def as_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8 from uint8 HWC, float HWC in [0, 1] (``output_type="np"``), a PIL image or a torch tensor."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ShapeError(f"image shape {arr.shape}; expected ({IMAGE_SIZE}, {IMAGE_SIZE}, 3) (HWC)")
    return arr


def palette_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) int: 0 = background, 1 + i = ``list(COLOURS)[i]``, by nearest RGB distance."""
    x = image.reshape(-1, 3).astype(np.float32)
    p = _PALETTE.astype(np.float32)
    d = (p * p).sum(1)[None, :] - 2.0 * x @ p.T  # (H*W, 1 + C): squared distance minus |x|^2
    return d.argmin(1).reshape(image.shape[:2])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (min-label propagation, no SciPy)."""
    if not mask.any():
        return mask
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    pad = np.full((h + 2, w + 2), big, dtype=lab.dtype)
    while True:
        pad[1:-1, 1:-1] = lab
        new = np.minimum(np.minimum(pad[:-2, 1:-1], pad[2:, 1:-1]), np.minimum(pad[1:-1, :-2], pad[1:-1, 2:]))
        np.minimum(new, lab, out=new)
        new[~mask] = big
        if np.array_equal(new, lab):
            break
        lab = new
    ids, counts = np.unique(lab[mask], return_counts=True)
    return lab == ids[counts.argmax()]


def _bbox(component: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(component)
    return int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())


def _classify_shape(component: np.ndarray, bbox: tuple[int, int, int, int]) -> tuple[str, float]:
    """Best template for a component, fitted to its bounding box: (shape, IoU)."""
    x0, x1, y0, y1 = bbox
    r2 = max(x1 - x0, y1 - y0)  # doubled half extent
    coords_x = 2 * np.arange(component.shape[1])[None, :] + 1  # (1, w) doubled units
    coords_y = 2 * np.arange(component.shape[0])[:, None] + 1  # (h, 1)
    best = ("", -1.0)
    for shape in SHAPES:
        for oy in (-2, 0, 2):
            for ox in (-2, 0, 2):
                tmpl = shape_mask(shape, coords_x - (x0 + x1 + 1 + ox), coords_y - (y0 + y1 + 1 + oy), r2)
                iou = float((tmpl & component).sum() / (tmpl | component).sum())
                if iou > best[1]:
                    best = (shape, iou)
    return best


def cell_component(labels: np.ndarray, row: int, col: int, mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of ``mask`` inside grid cell ``(row, col)``, as an image-sized bool mask.

    The checker's object segmentation: ``mask = labels > 0`` gives the cell's object; ``labels == c``
    its component of palette colour ``c`` (used by the fidelity metric's per-object IoU).
    """
    ys = slice(CELL_EDGES[row], CELL_EDGES[row + 1])
    xs = slice(CELL_EDGES[col], CELL_EDGES[col + 1])
    out = np.zeros(labels.shape, dtype=bool)
    out[ys, xs] = _largest_component(mask[ys, xs])
    return out


def read_cell(labels: np.ndarray, row: int, col: int) -> Reading:
    """What cell ``(row, col)`` of a palette-label map shows."""
    cell = labels[CELL_EDGES[row] : CELL_EDGES[row + 1], CELL_EDGES[col] : CELL_EDGES[col + 1]]
    component = _largest_component(cell > 0)
    pixels = int(component.sum())
    if pixels < MIN_PIXELS:
        return Reading(pixels)
    bbox = _bbox(component)
    r2 = max(bbox[1] - bbox[0], bbox[3] - bbox[2])
    if r2 + 1 > MAX_EXTENT:  # a smear, not an object: nothing to read
        return Reading(pixels, r2 + 1)
    shape, iou = _classify_shape(component, bbox)
    colour = _COLOUR_NAMES[int(np.bincount(cell[component]).argmax()) - 1]
    return Reading(pixels, r2 + 1, colour, shape, "large" if r2 > _SIZE_THRESHOLD else "small", iou)


def check(image, spec: SceneSpec) -> ImageCheck:
    """Check one image against its scene (a :class:`SceneSpec`, or one parsed from a caption)."""
    labels = palette_labels(as_uint8(image))
    objects, readings = [], []
    for o in spec.objects:
        r = read_cell(labels, o.row, o.col)
        readings.append(r)
        objects.append(
            {"position": r.present, "colour": r.colour == o.colour, "shape": r.shape == o.shape, "size": r.size == o.size}
        )
    stated = spec.cells()
    extra = sum(read_cell(labels, i, j).occupied for i in range(GRID) for j in range(GRID) if (i, j) not in stated)
    return ImageCheck(tuple(objects), tuple(readings), extra)


def score(images: Sequence, specs: Sequence[SceneSpec]) -> dict[str, float]:
    """Attribute accuracy over many images.

    Returns ``position, colour, shape, size`` (fraction of stated objects with that attribute
    right; a missing object counts wrong on all four), ``mean`` of those four, ``object``
    (all four right), ``image`` (every object right and no extra object), ``extra`` (extra
    objects per image), and the counts ``n_images``, ``n_objects``.
    """
    if len(images) != len(specs):
        raise ShapeError(f"{len(images)} images but {len(specs)} specs; expected one spec per image")
    checks = [check(img, spec) for img, spec in zip(images, specs)]
    objs = [o for c in checks for o in c.objects]
    out = {a: float(np.mean([o[a] for o in objs])) for a in ATTRIBUTES}
    out["mean"] = float(np.mean([out[a] for a in ATTRIBUTES]))
    out["object"] = float(np.mean([all(o.values()) for o in objs]))
    out["image"] = float(np.mean([c.correct for c in checks]))
    out["extra"] = float(np.mean([c.extra for c in checks]))
    out["n_images"], out["n_objects"] = len(checks), len(objs)
    return out
