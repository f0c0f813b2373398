"""Errors raised by the export package (all subclasses of :class:`tokprune.errors.TokpruneError`)."""

from __future__ import annotations

from tokprune.errors import TokpruneError


class ExportError(TokpruneError):
    """Exporting a bucket failed: the exporter, the I/O check or the equivalence check."""


class LintError(ExportError):
    """An ONNX graph uses an operator, attribute or dtype TensorRT does not support."""


class DiskFullError(ExportError, OSError):
    """The disk filled up while writing an export (errno ENOSPC)."""
