"""Weights once: one ONNX graph whose keep count K is a dynamic axis, run at every bucket's shapes.

The static layout (:mod:`.onnx_export`) traces one graph per bucket. They share ``weights.bin`` on
disk, but every ONNX Runtime session and every TensorRT engine built from them holds its own copy
of the weights in memory: GPU weight memory times the number of buckets (SD3.5-large fp16 is
about 16 GB, times 4). This module traces **one** graph for all buckets of an export:

- ``img_idx`` is ``(B, K)`` and every ``fresh.*`` output ``(..., K, ...)`` with ``K`` symbolic;
  ``txt_idx`` ``(B, K_txt)`` is present (``K_txt`` symbolic) when any bucket prunes text;
- the caches and ``prev_noise`` are always inputs, and every call takes the *generic* path of
  :func:`~tokprune.pruning.forward.pruned_forward`: fresh rows are scattered into the caches and
  the K rows of the noise prediction into ``prev_noise``. The dense bucket is K = N through the
  same path: its ``img_idx`` is a permutation of all N tokens, so every cache row and every noise
  row is overwritten and the inputs' contents do not matter (equal to the dense forward up to the
  summation order of attention; tested ≤ 1e-4 in fp32).

So no branch depends on K and the graph is valid for every K in [1, N]. The dense probe variant
(``record_text``, schedules that prune text) keeps its own static graph: it has an extra output
and runs at one or two steps.

:class:`GraphSpec` is the graph's I/O table, derived from the buckets' :meth:`BucketSpec.io`
(never a second shape formula); :meth:`GraphSpec.profiles` gives each bucket's concrete shapes,
which are TensorRT's optimisation profiles (min = opt = max) and ONNX Runtime's feed shapes;
:meth:`GraphSpec.adapt_feed` turns a bucket's feed into the graph's (adding zero stand-ins for
the caches a dense call does not read).

Example::

    from tokprune.export.dynamic import GraphSpec, export_graph_onnx, finalize_graph_onnx
    graph = GraphSpec.from_buckets(specs)                      # BucketSpecs of one export
    export_graph_onnx(transformer, graph, Path("raw/model.onnx"))
    proto = finalize_graph_onnx(Path("raw/model.onnx"), graph)
    graph.profiles()["k0512-t0109"]["img_idx"]                 # (2, 512)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokprune.export.errors import ExportError
from tokprune.export.onnx_export import PrunedGraphModule
from tokprune.export.spec import INPUT, OUTPUT, BucketSpec, Precision, TensorSpec

from tokprune.errors import ConfigError, ShapeError

logger = logging.getLogger(__name__)

__all__ = [
    "GRAPH_FILE",
    "KEEP_DIM",
    "LAYOUTS",
    "TEXT_DIM",
    "GraphModule",
    "GraphSpec",
    "export_graph_onnx",
    "finalize_graph_onnx",
]

GRAPH_FILE = "graph.onnx"  # the single dynamic graph of an export (weights in the shared weights.bin)
KEEP_DIM = "K"  # symbolic image keep count
TEXT_DIM = "K_txt"  # symbolic text keep count (present when a bucket prunes text)
#: Engine layouts: one dynamic graph / TensorRT engine with a profile per bucket, or one static graph per bucket.
LAYOUTS = ("single", "per-bucket")

Dim = int | str  # a concrete size, or KEEP_DIM / TEXT_DIM


@dataclass(frozen=True)
class GraphTensor:
    """One tensor of the dynamic graph: its shape may name :data:`KEEP_DIM` / :data:`TEXT_DIM`."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str
    role: str
    cache: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "role": self.role}
        if self.cache is not None:
            d["cache"] = self.cache
        return d


@dataclass(frozen=True)
class GraphSpec:
    """The I/O table of one export's dynamic graph and the buckets it serves.

    Args:
        buckets: the export's non-probe :class:`BucketSpec` s (one geometry, reuse mode and precision).
    """

    buckets: tuple[BucketSpec, ...]

    def __post_init__(self) -> None:
        specs = [s for s in self.buckets]
        if not specs:
            raise ConfigError("a dynamic graph needs at least one bucket")
        first = specs[0]
        for s in specs:
            if s.record_text:
                raise ConfigError(f"bucket {s.key} is the dense probe variant; it keeps its own static graph")
            if (s.geometry, s.reuse, s.precision) != (first.geometry, first.reuse, first.precision):
                raise ConfigError(
                    f"buckets {first.key} and {s.key} differ in geometry, reuse or precision; one graph serves one export"
                )
        keys = [s.key for s in specs]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"duplicate buckets {keys}")

    @classmethod
    def from_buckets(cls, specs: Sequence[BucketSpec] | Mapping[str, BucketSpec]) -> GraphSpec:
        """The graph of an export's buckets; the probe variant, if any, is left out (own static graph)."""
        values = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
        return cls(tuple(s for s in values if not s.record_text))

    # ---- shared views ---------------------------------------------------------------------
    @property
    def geometry(self) -> Any:
        return self.buckets[0].geometry

    @property
    def reuse(self) -> str:
        return self.buckets[0].reuse

    @property
    def precision(self) -> Precision:
        return self.buckets[0].precision

    @property
    def prunes_text(self) -> bool:
        """Some bucket prunes text: the graph takes ``txt_idx`` (the others pass all T rows)."""
        return any(s.prunes_text for s in self.buckets)

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.buckets]

    def _variant(self, keep: int, text_keep: int | None) -> BucketSpec:
        """A pruned bucket spec of this export (caches, prev_noise; txt_idx when text is pruned anywhere)."""
        return BucketSpec(self.geometry, keep, text_keep, reuse=self.reuse, precision=self.precision)

    # ---- the I/O table -------------------------------------------------------------------
    def io(self) -> list[GraphTensor]:
        """Every input then every output, in graph order; K and K_txt axes named symbolically.

        The symbolic axes are found, not assumed: they are the axes whose size differs between
        two pruned buckets' :meth:`BucketSpec.io` at different K (and K_txt).
        """
        g = self.geometry
        if g.num_tokens < 3 or (self.prunes_text and g.text_tokens < 3):
            raise ShapeError(f"a dynamic graph needs N >= 3 image (and T >= 3 text) tokens, got N={g.num_tokens}, "
                             f"T={g.text_tokens}")
        wide = self._variant(g.num_tokens - 1, g.text_tokens - 1 if self.prunes_text else None).io()
        narrow = self._variant(1, 1 if self.prunes_text else None).io()
        out = []
        for a, b in zip(wide, narrow):
            shape = tuple(d if d == e else (TEXT_DIM if a.name == "txt_idx" else KEEP_DIM)
                          for d, e in zip(a.shape, b.shape))
            out.append(GraphTensor(a.name, shape, a.dtype, a.role, a.cache))
        return out

    def inputs(self) -> list[GraphTensor]:
        return [t for t in self.io() if t.role == INPUT]

    def outputs(self) -> list[GraphTensor]:
        return [t for t in self.io() if t.role == OUTPUT]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs()]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs()]

    def dims(self, spec: BucketSpec) -> dict[str, int]:
        """``{"K": ..., "K_txt": ...}`` of one bucket."""
        d = {KEEP_DIM: spec.image_keep}
        if self.prunes_text:
            d[TEXT_DIM] = spec.text_keep
        return d

    def shapes(self, spec: BucketSpec) -> dict[str, tuple[int, ...]]:
        """Every graph tensor's concrete shape at ``spec``'s bucket."""
        self._check_member(spec)
        dims = self.dims(spec)
        return {t.name: tuple(dims[d] if isinstance(d, str) else d for d in t.shape) for t in self.io()}

    def profiles(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Bucket key -> input name -> shape: one static optimisation profile per bucket (min = opt = max)."""
        out = {}
        for spec in self.buckets:
            shapes = self.shapes(spec)
            out[spec.key] = {t.name: shapes[t.name] for t in self.inputs()}
        return out

    def _check_member(self, spec: BucketSpec) -> None:
        if spec not in self.buckets:
            raise ShapeError(f"bucket {spec.key} is not one of this graph's buckets {self.keys}")

    # ---- feeds -----------------------------------------------------------------------------
    def adapt_feed(
        self, spec: BucketSpec, feed: Mapping[str, torch.Tensor], stand_ins: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """A bucket's feed (its :meth:`BucketSpec.inputs`) as the graph's feed, in graph input order.

        Inputs the bucket does not read (a dense bucket's caches and ``prev_noise``; ``txt_idx``
        of a bucket that keeps all text) come from ``stand_ins`` (name -> tensor, e.g. persistent
        zero buffers) or are made: zeros, ``arange(T)`` for ``txt_idx``. Their contents never
        reach the outputs (every row they hold is overwritten, or the gather is the identity).
        """
        self._check_member(spec)
        shapes = self.shapes(spec)
        stand_ins = stand_ins or {}
        out: dict[str, torch.Tensor] = {}
        ref = feed["latent"]
        for t in self.inputs():
            x = feed.get(t.name)
            if x is None:
                x = stand_ins.get(t.name)
            if x is None:
                dtype = TensorSpec(t.name, shapes[t.name], t.dtype, t.role).torch_dtype
                if t.name == "txt_idx":
                    rows = torch.arange(self.geometry.text_tokens, device=ref.device, dtype=torch.int64)
                    x = rows.expand(shapes[t.name][0], -1).contiguous()
                else:
                    x = torch.zeros(shapes[t.name], dtype=dtype, device=ref.device)
            out[t.name] = x
        return out

    def stand_in_specs(self, spec: BucketSpec) -> list[TensorSpec]:
        """The graph inputs ``spec``'s bucket does not feed (what :meth:`adapt_feed` fills in)."""
        own = set(spec.input_names())
        shapes = self.shapes(spec)
        return [TensorSpec(t.name, shapes[t.name], t.dtype, t.role, t.cache) for t in self.inputs() if t.name not in own]

    def stand_in_buffers(self, spec: BucketSpec, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Zero buffers for the graph inputs ``spec``'s bucket does not feed, one allocation per distinct
        (shape, dtype): every cache input of a dense call points at the *same* buffer (read, never
        written, contents irrelevant), so a dense call costs one cache's memory, not all of them."""
        shared: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}
        out = {}
        for t in self.stand_in_specs(spec):
            if t.name == "txt_idx":
                rows = torch.arange(self.geometry.text_tokens, device=device, dtype=torch.int64)
                out[t.name] = rows.expand(t.shape[0], -1).contiguous()
                continue
            buf = shared.get((t.shape, t.dtype))
            if buf is None:
                buf = shared[(t.shape, t.dtype)] = torch.zeros(t.shape, dtype=t.torch_dtype, device=device)
            out[t.name] = buf
        return out

    def sample_inputs(self, spec: BucketSpec, seed: int = 0) -> dict[str, torch.Tensor]:
        """``spec.sample_inputs(seed)`` adapted to the graph (random caches / prev_noise for dense too,
        so a test shows their contents do not matter)."""
        feed = spec.sample_inputs(seed)
        gen = torch.Generator().manual_seed(int(seed) + 7919)
        extra = {}
        for t in self.stand_in_specs(spec):
            if t.name != "txt_idx":
                extra[t.name] = torch.randn(t.shape, generator=gen).to(t.torch_dtype)
        return self.adapt_feed(spec, feed, extra)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's description of the graph (not its file)."""
        return {
            "dims": {KEEP_DIM: [1, self.geometry.num_tokens], **({TEXT_DIM: [1, self.geometry.text_tokens]}
                                                                   if self.prunes_text else {})},
            "io": [t.to_dict() for t in self.io()],
            "profiles": [{"bucket": k, "shapes": {n: list(s) for n, s in p.items()}} for k, p in self.profiles().items()],
        }


# ---- the module traced --------------------------------------------------------------------------
class GraphModule(PrunedGraphModule):
    """The dynamic graph's traced module: the family's pruned forward on the dynamic geometry (a
    ``num_tokens`` no K equals, so every K traces the generic path)."""

    def __init__(self, model: torch.nn.Module, graph: GraphSpec) -> None:
        super().__init__(model, graph.geometry.as_dynamic(), graph, reuse=graph.reuse, precision=graph.precision,
                         what="the dynamic graph")  # fmt: skip
        self.graph = graph


# ---- export ---------------------------------------------------------------------------------------
def export_graph_onnx(model: torch.nn.Module, graph: GraphSpec, path: Path, *, opset: int = 18, seed: int = 0) -> str:
    """Trace the dynamic graph to ``path`` (weights as external data). Returns the exporter used.

    ``torch.onnx.export(dynamo=True)`` with ``dynamic_shapes`` naming K (and K_txt); falls back to
    the TorchScript exporter with ``dynamic_axes`` if the dynamo exporter raises, logging why.
    The sample is the first pruned bucket (K < N), so tracing never sees K = N.
    """
    from tokprune.export.onnx_export import _quiet_exporter, precision_patches

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = GraphModule(model, graph).eval()
    pruned = [s for s in graph.buckets if not s.dense]
    sample = pruned[0] if pruned else graph.buckets[0]
    device = next(model.parameters()).device  # trace where the model lives (a GPU host exports on the GPU)
    args = tuple(x.to(device) for x in graph.sample_inputs(sample, seed).values())
    names = dict(input_names=graph.input_names(), output_names=graph.output_names(), opset_version=opset)
    axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in graph.io()}
    axes = {n: a for n, a in axes.items() if a}
    n, txt = graph.geometry.num_tokens, graph.geometry.text_tokens
    with torch.no_grad(), precision_patches(graph.precision), _quiet_exporter():
        try:
            keep = torch.export.Dim(KEEP_DIM, min=1, max=n)
            text = torch.export.Dim(TEXT_DIM, min=1, max=txt)
            dims = {KEEP_DIM: keep, TEXT_DIM: text}
            shapes = tuple({i: dims[d] for i, d in axes[t.name].items()} if t.name in axes else None
                           for t in graph.inputs())
            torch.onnx.export(module, args, str(path), dynamo=True, external_data=True, optimize=True, verbose=False,
                              dynamic_shapes=(shapes,), **names)  # forward(*tensors): one varargs entry
            return "dynamo"
        except Exception as exc:  # noqa: BLE001 - any dynamo failure triggers the documented fallback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            logger.warning("dynamo export of the dynamic graph failed (%s: %s); falling back to TorchScript",
                           type(exc).__name__, first)
        for stale in path.parent.glob(path.name + "*"):
            stale.unlink()
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, do_constant_folding=True, dynamic_axes=axes, **names)
        except Exception as exc:
            raise ExportError(f"ONNX export of the dynamic graph failed with both exporters: {exc}") from exc
        return "torchscript"


_ONNX_DTYPES = {"float32": 1, "float16": 10, "bfloat16": 16, "int64": 7}


def finalize_graph_onnx(path: Path, graph: GraphSpec):
    """Load the traced graph with its weights, strip debug metadata, rename its symbolic axes to
    ``K`` / ``K_txt`` and check every input/output against :meth:`GraphSpec.io`."""
    import onnx
    from tokprune.export.onnx_export import _splat_constants_to_nodes

    model = onnx.load(str(path), load_external_data=True)
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.metadata_props[:]
    model.doc_string = ""
    problems = []
    for kind, declared, expected in (("input", list(model.graph.input), graph.inputs()),
                                     ("output", list(model.graph.output), graph.outputs())):
        got = [v.name for v in declared]
        if got != [t.name for t in expected]:
            problems.append(f"{kind} names {got}, expected {[t.name for t in expected]}")
            continue
        for value, t in zip(declared, expected):
            tt = value.type.tensor_type
            if len(tt.shape.dim) != len(t.shape):
                problems.append(f"{kind} {t.name}: rank {len(tt.shape.dim)}, expected {len(t.shape)}")
                continue
            for d, want in zip(tt.shape.dim, t.shape):
                if isinstance(want, str):
                    d.Clear()
                    d.dim_param = want  # the exporter's own names (s0, ...) -> K / K_txt
                elif d.HasField("dim_value") and d.dim_value != want:
                    problems.append(f"{kind} {t.name}: shape {_shape(tt)}, expected {t.shape}")
                    break
                elif not d.HasField("dim_value"):  # TorchScript leaves static output dims symbolic
                    d.Clear()
                    d.dim_value = want
            if tt.elem_type != _ONNX_DTYPES[t.dtype]:
                problems.append(f"{kind} {t.name}: dtype {tt.elem_type}, expected {t.dtype}")
    if problems:
        raise ExportError("the exported dynamic graph does not match its GraphSpec: " + "; ".join(problems))
    _splat_constants_to_nodes(model)
    return model


def _shape(tt: Any) -> tuple[Any, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim)


# ---- inside an export directory ------------------------------------------------------------------
def export_graph_into(
    work: Path, specs: Sequence[BucketSpec], model: torch.nn.Module, store: Any, *, opset: int = 18, seed: int = 0
) -> dict[str, Any]:
    """Trace the export's dynamic graph into ``work/graph.onnx`` (weights into the shared ``store``:
    the bytes are the buckets' own, so nothing new is stored), check it with ``onnx.checker``, the
    TensorRT lint and ONNX Runtime vs PyTorch at every bucket's shapes. Returns the manifest's
    ``graph`` entry. Raises :class:`ExportError` if a bucket differs beyond tolerance."""
    import shutil
    import time

    import onnx
    from tokprune.export.lint import lint_model
    from tokprune.export.manifest import file_entry

    t0 = time.perf_counter()
    graph = GraphSpec.from_buckets(specs)
    raw = Path(work) / "raw" / "graph" / "model.onnx"
    if raw.parent.exists():
        shutil.rmtree(raw.parent)
    exporter = export_graph_onnx(model, graph, raw, opset=opset, seed=seed)
    proto = finalize_graph_onnx(raw, graph)
    stats = store.externalize(proto)
    onnx.save_model(proto, str(Path(work) / GRAPH_FILE))
    del proto
    shutil.rmtree(raw.parent)
    onnx.checker.check_model(str(Path(work) / GRAPH_FILE))
    lint = [issue.to_dict() for issue in lint_model(Path(work) / GRAPH_FILE)]
    from tokprune.export.equivalence import check_graph_equivalence

    equivalence = check_graph_equivalence(model, graph, Path(work) / GRAPH_FILE, seed=seed)
    failed = {k: r["worst"] for k, r in equivalence.items() if r["status"] == "failed"}
    if failed:
        raise ExportError(f"the dynamic graph differs from PyTorch beyond tolerance at buckets {failed} "
                          f"(tolerance {next(iter(equivalence.values()))['tolerance']})")
    store.sync()
    logger.info("dynamic graph: %d buckets, %d new weight bytes (%d reused)", len(graph.buckets), stats.new_bytes,
                stats.reused_bytes)
    return {
        "layout": "dynamic",
        "file": file_entry(work, GRAPH_FILE),
        "exporter": exporter,
        "export_seconds": round(time.perf_counter() - t0, 3),
        **graph.to_dict(),
        "lint": lint,
        "equivalence": equivalence,
        "weights": stats.to_dict(),
    }


def graph_from_manifest(data: Mapping[str, Any], specs: Mapping[str, BucketSpec]) -> GraphSpec | None:
    """The :class:`GraphSpec` a manifest's ``graph`` entry describes, checked against what this tokprune
    derives from the buckets; None when the export has no dynamic graph (made before it existed)."""
    from tokprune.errors import ManifestError

    entry = data.get("graph")
    if not entry:
        return None
    graph = GraphSpec.from_buckets(specs)
    if [p["bucket"] for p in entry.get("profiles", [])] != graph.keys or entry.get("io") != [t.to_dict() for t in graph.io()]:
        raise ManifestError("the manifest's dynamic graph (io, profiles) differs from the one this tokprune derives from "
                            "its buckets; re-export it (tokprune-export ... --force)")
    return graph
