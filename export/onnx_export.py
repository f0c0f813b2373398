"""ONNX export of one bucket: a thin module around the pure pruned forward.

:class:`BucketModule` calls :func:`tokprune.pruning.forward.pruned_forward` with
``inplace=False`` (a pure function of its inputs), taking its inputs positionally in
:meth:`BucketSpec.inputs` order and returning its outputs in :meth:`BucketSpec.outputs`
order, so the graph's names come from the spec and nowhere else.

Reduced precision: :func:`cast_for_export` casts the transformer's weights
to fp16 / bf16 but keeps every LayerNorm / RMSNorm in fp32 (explicit casts around them), and
:func:`precision_patches` makes attention compute its softmax in fp32 while tracing. The
PyTorch reference of the equivalence check runs under the same patches.

Example::

    spec = BucketSpec(geometry, image_keep=128)
    exporter = export_bucket_onnx(transformer, spec, Path("raw/model.onnx"))   # "dynamo"
    model = finalize_onnx(Path("raw/model.onnx"), spec)   # loaded, stripped, I/O checked
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokprune.export.errors import ExportError
from tokprune.export.spec import BucketSpec, Precision

logger = logging.getLogger(__name__)

__all__ = ["OPSET", "BucketModule", "cast_for_export", "export_bucket_onnx", "finalize_onnx", "precision_patches"]

#: ONNX opset of every export. The dynamo exporter needs >= 18; TensorRT >= 10.9 parses 18.
OPSET = 18

_NORM_CLASS_NAMES = frozenset({"LayerNorm", "RMSNorm", "FP32LayerNorm"})
_PRECISION_ATTR = "_tokprune_export_precision"


def call_pruned(
    model: torch.nn.Module,
    geometry: Any,
    inputs: Sequence[Any],
    outputs: Sequence[Any],
    tensors: Sequence[torch.Tensor],
    *,
    reuse: str,
    record_text: bool = False,
    cached: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The traced body of every exported graph: positional inputs (named by ``inputs``: latent, timestep,
    the family's conditions, indices, caches) -> the family's pure pruned forward -> positional outputs.
    ``cached``: a step-caching bucket (passed on only when set: families with step caching take it)."""
    from tokprune.pruning.family import get_family

    family = get_family(geometry.family)
    feed = {t.name: x for t, x in zip(inputs, tensors)}
    caches = {t.cache: feed[t.name] for t in inputs if t.cache is not None}
    conditions = {name: feed[name] for name in family.condition_specs(geometry)}
    out = family.pruned_forward(
        model,
        geometry,
        latent=feed["latent"],
        timestep=feed["timestep"],
        conditions=conditions,
        img_idx=feed["img_idx"],
        txt_idx=feed.get("txt_idx"),
        caches=caches or None,
        prev_noise=feed.get("prev_noise"),
        reuse=reuse,
        inplace=False,
        record_text=record_text,
        **({"cached": True} if cached else {}),
    )
    results = []
    for t in outputs:
        if t.name == "noise":
            results.append(out.noise)
        elif t.name == "text_mass":
            results.append(out.text_mass.float())
        else:
            results.append(out.fresh[t.cache])
    return tuple(results)


class PrunedGraphModule(torch.nn.Module):
    """``forward(*inputs) -> tuple(outputs)``: the family's pure pruned forward with the positional I/O of
    an exported graph (what is traced). :class:`BucketModule` is one bucket's; the dynamic-K graph's is
    :class:`tokprune.export.dynamic.GraphModule`."""

    def __init__(self, model: torch.nn.Module, geometry: Any, io: Any, *, reuse: str, precision: Any,
                 record_text: bool = False, what: str = "the graph", cached: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self._geometry = geometry
        self._io = io  # has inputs() / outputs() / input_names() / output_names()
        self._inputs = io.inputs()
        self._outputs = io.outputs()
        self._reuse, self._precision, self._record_text, self._what = reuse, precision, record_text, what
        self._cached = cached

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(tensors) != len(self._inputs):
            raise ExportError(f"{self._what} takes {len(self._inputs)} inputs, got {len(tensors)}")
        return call_pruned(
            self.model, self._geometry, self._inputs, self._outputs, tensors, reuse=self._reuse,
            record_text=self._record_text, cached=self._cached,
        )

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eager reference: the same call as the graph, by name, under the graph's precision patches."""
        check = getattr(self._io, "check_feed", None)
        if check is not None:
            check(feed)
        with torch.no_grad(), precision_patches(self._precision):
            outs = self(*(feed[name] for name in self._io.input_names()))
        return dict(zip(self._io.output_names(), outs))


class BucketModule(PrunedGraphModule):
    """One bucket's traced module, names and order from ``spec``."""

    def __init__(self, model: torch.nn.Module, spec: BucketSpec) -> None:
        super().__init__(model, spec.geometry, spec, reuse=spec.reuse, precision=spec.precision,
                         record_text=spec.record_text, what=f"bucket {spec.key}", cached=spec.cached)  # fmt: skip
        self.spec = spec


# ---- reduced precision ----------------------------------------------------------------------
def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__ in _NORM_CLASS_NAMES


def cast_for_export(model: torch.nn.Module, precision: Precision | str) -> torch.nn.Module:
    """Cast ``model`` in place to ``precision``; norms keep fp32 weights and compute in fp32.

    Each LayerNorm / RMSNorm gets an instance-level ``forward`` that upcasts its input to fp32
    and casts the result back, so the exported graph carries explicit ``Cast`` nodes around
    every normalisation (TensorRT's strongly typed mode obeys them). Idempotent for the same
    precision; refuses to re-cast a model already cast to another one.
    """
    precision = Precision.parse(precision)
    done = getattr(model, _PRECISION_ATTR, None)
    if done is not None:
        if done != precision:
            raise ExportError(f"the transformer was already cast for {done.value} export; reload it for {precision.value}")
        return model
    # nn.Module.to, not diffusers' override: the latter warns on every dtype change (a tokprune export casts on purpose)
    torch.nn.Module.to(model, precision.torch_dtype)
    if precision is not Precision.FP32:
        for module in model.modules():
            if _is_norm(module):
                module.float()
                module.forward = _fp32_forward(module)  # instance attribute shadows the class method
    object.__setattr__(model, _PRECISION_ATTR, precision)
    return model


def _fp32_forward(module: torch.nn.Module):
    original = type(module).forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return original(module, x.float(), *args, **kwargs).to(x.dtype)

    return forward


def _sdpa_fp32_softmax(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Attention with the scores' softmax in fp32: (B, H, Sq, hd) x (B, H, Sk, hd) -> (B, H, Sq, hd)."""
    if is_causal or dropout_p:
        raise ExportError("the fp32-softmax attention used for reduced-precision export supports no causal mask/dropout")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = ((query * scale) @ key.transpose(-1, -2)).float()  # (B, H, Sq, Sk), scaled first: no fp16 overflow
    if attn_mask is not None:  # boolean (keep = True) or additive, as torch's sdpa takes it
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return probs @ value


@contextlib.contextmanager
def precision_patches(precision: Precision | str) -> Iterator[None]:
    """While active (reduced precision only), ``F.scaled_dot_product_attention`` takes its softmax in fp32."""
    precision = Precision.parse(precision)
    if precision is Precision.FP32:
        yield
        return
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _sdpa_fp32_softmax
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


# ---- export ------------------------------------------------------------------------------------
def export_bucket_onnx(
    model: torch.nn.Module, spec: BucketSpec, path: Path, *, opset: int = OPSET, seed: int = 0
) -> str:
    """Trace one bucket to ``path`` (weights as external data next to it). Returns the exporter used.

    Uses ``torch.onnx.export(dynamo=True)``; falls back to the TorchScript exporter only if the
    dynamo exporter raises, logging why. Shapes are static (the sample inputs' shapes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = BucketModule(model, spec).eval()
    args = tuple(spec.sample_inputs(seed).values())
    names = dict(input_names=spec.input_names(), output_names=spec.output_names(), opset_version=opset)
    with torch.no_grad(), precision_patches(spec.precision), _quiet_exporter():
        try:
            torch.onnx.export(module, args, str(path), dynamo=True, external_data=True, optimize=True, verbose=False, **names)
            return "dynamo"
        except Exception as exc:  # noqa: BLE001 - any dynamo failure triggers the documented fallback
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            logger.warning(
                "dynamo ONNX export of bucket %s failed (%s); falling back to the deprecated TorchScript exporter",
                spec.key,
                reason,
            )
        for stale in path.parent.glob(path.name + "*"):  # the model and its external data
            stale.unlink()
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, do_constant_folding=True, **names)
        except Exception as exc:
            raise ExportError(f"ONNX export of bucket {spec.key} failed with both exporters: {exc}") from exc
        return "torchscript"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints progress lines and torchvision warnings; keep them out of the CLI output."""
    with contextlib.redirect_stdout(_NullWriter()):
        noisy = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch._export")]
        levels = [lg.level for lg in noisy]
        for lg in noisy:
            lg.setLevel(logging.ERROR)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                for lg, level in zip(noisy, levels):
                    lg.setLevel(level)


class _NullWriter:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None


_ONNX_DTYPES = {"float32": 1, "float16": 10, "bfloat16": 16, "int64": 7}  # TensorProto.DataType


def finalize_onnx(path: Path, spec: BucketSpec):
    """Load an exported bucket with its weights, strip debug metadata, check its I/O against ``spec``.

    The dynamo exporter attaches a stack trace to every node (``metadata_props``); they triple
    the graph's size and are dropped. Raises :class:`ExportError` naming each input/output
    whose name, order, shape or dtype differs from :meth:`BucketSpec.io`.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.metadata_props[:]
    model.doc_string = ""
    problems = []
    for kind, declared, expected in (
        ("input", list(model.graph.input), spec.inputs()),
        ("output", list(model.graph.output), spec.outputs()),
    ):
        got_names = [v.name for v in declared]
        if got_names != [t.name for t in expected]:
            problems.append(f"{kind} names {got_names}, expected {[t.name for t in expected]}")
            continue
        for value, t in zip(declared, expected):
            tt = value.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim)
            if shape != t.shape:
                problems.append(f"{kind} {t.name}: shape {shape}, expected {t.shape}")
            if tt.elem_type != _ONNX_DTYPES[t.dtype]:
                problems.append(
                    f"{kind} {t.name}: dtype {onnx.TensorProto.DataType.Name(tt.elem_type)}, expected {t.dtype}"
                )
    if problems:
        raise ExportError(f"exported graph of bucket {spec.key} does not match its BucketSpec: " + "; ".join(problems))
    _splat_constants_to_nodes(model)
    return model


def _splat_constants_to_nodes(model, *, min_bytes: int = 1024) -> int:
    """Replace large initializers holding one repeated value (zeros) by ``ConstantOfShape`` nodes.

    They are buffers, not weights: storing them would cost disk and ``weights.bin`` space for
    nothing. Returns how many were replaced.
    """
    import onnx

    replaced = []
    for init in model.graph.initializer:
        data = init.raw_data
        if len(data) < min_bytes or not init.dims:
            continue
        item = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        if data != data[:item] * (len(data) // item):
            continue
        replaced.append(init)
    nodes = []
    for init in replaced:
        item = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        shape = onnx.helper.make_tensor(f"{init.name}__shape", onnx.TensorProto.INT64, [len(init.dims)], list(init.dims))
        value = onnx.TensorProto(data_type=init.data_type, dims=[1], raw_data=init.raw_data[:item])
        model.graph.initializer.append(shape)
        nodes.append(onnx.helper.make_node("ConstantOfShape", [shape.name], [init.name], name=f"{init.name}__splat", value=value))
    for init in replaced:
        model.graph.initializer.remove(init)
    for i, node in enumerate(nodes):
        model.graph.node.insert(i, node)
    return len(replaced)
