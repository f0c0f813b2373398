"""Weights stored once: every bucket's ONNX graph points into one shared ``weights.bin``.

Each static-shape bucket is a separate ONNX graph, and every graph would normally carry a
full copy of the transformer's weights (~4 GB fp16 for SD3-medium, per bucket).
:class:`SharedWeights` is an append-only, content-addressed file: an initializer's raw bytes
are hashed (sha256) and written once; every graph that holds the same bytes — under the same
name or not — gets an ONNX external-data reference (``location=weights.bin``, ``offset``,
``length``) to that single copy. ONNX Runtime, ``onnx.checker`` and TensorRT's ONNX parser
all read external data by offset, so nothing else changes.

Small initializers (< ``min_bytes``, shape constants and the like) stay inline in the graph.
Tensors are 64-byte aligned. The index (hash -> offset, length; name -> hash) is part of the
exporter's resumable state, so an interrupted export truncates the file back to its last
committed size and goes on.

Example::

    store = SharedWeights(Path("out/weights.bin"))
    stats = store.externalize(model_proto)     # rewrites the proto's initializers in place
    onnx.save_model(model_proto, "out/k0128-t0333.onnx")
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokprune.export.errors import ExportError
from tokprune.hashing import sha256_bytes

logger = logging.getLogger(__name__)

__all__ = ["WEIGHTS_FILE", "SharedWeights", "WeightStats"]

WEIGHTS_FILE = "weights.bin"
_ALIGN = 64


@dataclass
class WeightStats:
    """What one :meth:`SharedWeights.externalize` call did."""

    tensors: int = 0  # initializers moved to the shared file
    new_bytes: int = 0  # bytes appended (content not seen before)
    reused_bytes: int = 0  # bytes that pointed at an existing copy
    inline_bytes: int = 0  # bytes left inline (small tensors)
    renamed: list[str] = field(default_factory=list)  # names whose bytes differ from an earlier graph's

    def to_dict(self) -> dict[str, int]:
        """The manifest's ``weights`` entry of one graph."""
        return {"tensors": self.tensors, "new_bytes": self.new_bytes, "reused_bytes": self.reused_bytes,
                "inline_bytes": self.inline_bytes}


class SharedWeights:
    """Append-only content-addressed weight file shared by every bucket of an export."""

    def __init__(self, path: Path, state: dict[str, Any] | None = None, *, min_bytes: int = 1024) -> None:
        self.path = Path(path)
        self.min_bytes = int(min_bytes)
        state = state or {}
        self.index: dict[str, tuple[int, int]] = {h: (int(o), int(n)) for h, (o, n) in state.get("index", {}).items()}
        self.names: dict[str, str] = dict(state.get("names", {}))
        self.size = int(state.get("size", 0))
        self._open_at_committed_size()

    def _open_at_committed_size(self) -> None:
        """Truncate bytes written after the last commit (an interrupted bucket); refuse a short file."""
        actual = self.path.stat().st_size if self.path.exists() else 0
        if actual < self.size:
            raise ExportError(
                f"{self.path} holds {actual} bytes but the export state says {self.size} were committed; "
                "the partial export is damaged: re-run with --force to start over"
            )
        if actual > self.size or not self.path.exists():
            with open(self.path, "ab") as fh:
                fh.truncate(self.size)

    def state(self) -> dict[str, Any]:
        """JSON-native index to persist with the export's progress."""
        return {"size": self.size, "index": {h: list(v) for h, v in self.index.items()}, "names": dict(self.names)}

    def _append(self, data: bytes) -> int:
        offset = -(-self.size // _ALIGN) * _ALIGN
        with open(self.path, "r+b") as fh:
            fh.seek(self.size)
            fh.write(b"\0" * (offset - self.size))
            fh.write(data)
        self.size = offset + len(data)
        return offset

    def externalize(self, model: Any) -> WeightStats:
        """Point every initializer of ``model`` (an ``onnx.ModelProto`` with loaded data) at the shared file.

        Bytes are compared by sha256: equal contents are stored once whatever their names.
        A name already seen with different bytes is legal (the exporter's ``val_*`` constants are
        per-graph) and is listed in :attr:`WeightStats.renamed`; a parameter name (``model.*``)
        with different bytes means two buckets were exported from different weights and raises.
        """
        import onnx
        from onnx import external_data_helper, numpy_helper

        stats = WeightStats()
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise ExportError(f"initializer {tensor.name!r} still refers to external data; load the model with its data")
            if not tensor.HasField("raw_data"):  # typed fields (float_data, ...) -> raw bytes
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
            data = tensor.raw_data
            if len(data) < self.min_bytes:
                stats.inline_bytes += len(data)
                continue
            digest = sha256_bytes(data)
            previous = self.names.get(tensor.name)
            if previous is not None and previous != digest:
                if tensor.name.startswith("model."):
                    raise ExportError(
                        f"parameter {tensor.name!r} has different bytes in this bucket than in an earlier one; "
                        "all buckets must be exported from the same weights and precision"
                    )
                stats.renamed.append(tensor.name)
            self.names[tensor.name] = digest
            if digest in self.index:
                offset, length = self.index[digest]
                stats.reused_bytes += length
            else:
                offset, length = self._append(data), len(data)
                self.index[digest] = (offset, length)
                stats.new_bytes += length
            external_data_helper.set_external_data(tensor, location=self.path.name, offset=offset, length=length)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            stats.tensors += 1
        return stats

    def sync(self) -> None:
        """Flush the file to disk (call before recording the state that commits it)."""
        if self.path.exists():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
