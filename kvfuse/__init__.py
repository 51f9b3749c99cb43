"""kvfuse: rewrite exported ONNX LLMs into fused attention with fixed-size, in-place KV caches.

    kvfuse.export(source, out_dir)       Hugging Face dir / GGUF / "default" → ONNX (Optimum)
    kvfuse.optimize(model, out.onnx)     fused attention, retained-state KV, verified
    kvfuse.load(out.onnx).generate(...)  planned-memory generation on onnxruntime
    kvfuse.serve.start(out.onnx)         an OpenAI/TGI server, continuous batching (serve extra)

Names load on first use, so running a deployed model needs only onnxruntime, numpy and
tokenizers — not the exporter's or the rewriter's dependencies.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "KvfuseError": "kvfuse.errors",
    "export": "kvfuse.exporters.export",
    "ExportResult": "kvfuse.exporters.export",
    "optimize": "kvfuse.optimize",
    "OptimizeResult": "kvfuse.optimize",
    "load": "kvfuse.runtime.generate",
    "Generator": "kvfuse.runtime.generate",
    "GenerationConfig": "kvfuse.runtime.generate",
    "Sampling": "kvfuse.runtime.sampling",
    "diff": "kvfuse.report.diff",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name == "serve":  # the server's package (its libraries are the `serve` extra)
        return importlib.import_module("kvfuse.serve")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvfuse' has no attribute {name!r}")
