"""kvfuse: rewrite exported ONNX LLMs into fused attention with fixed-size, in-place KV caches."""

from __future__ import annotations

from kvfuse.errors import KvfuseError
from kvfuse.exporters.export import ExportResult, export

__all__ = ["ExportResult", "KvfuseError", "export"]
__version__ = "0.1.0"
