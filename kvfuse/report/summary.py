"""A quick structural summary of an ONNX model, read without loading its weights."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import onnx

from kvfuse.errors import KvfuseError


@dataclasses.dataclass
class GraphSummary:
    path: str
    file_bytes: int
    nodes: int
    op_histogram: dict[str, int]
    opsets: dict[str, int]
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    initializers: int


def load_structure(path: Path) -> onnx.ModelProto:
    """Load an ONNX model's graph without its external weights, with a one-line error if bad."""
    path = Path(path)
    if not path.is_file():
        raise KvfuseError(f"{path} does not exist; give the path of an .onnx file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError, ValueError, ... for a corrupt file
        raise KvfuseError(
            f"{path} is not a readable ONNX model ({type(error).__name__}); "
            "re-export it or check the file is complete"
        ) from error


def summarize(path: Path) -> GraphSummary:
    """Count nodes and op types, list I/O with their dims, and measure files on disk."""
    path = Path(path)
    model = load_structure(path)
    graph = model.graph
    histogram = collections.Counter(node.op_type for node in graph.node)
    return GraphSummary(
        path=str(path),
        file_bytes=bytes_on_disk(path, model),
        nodes=len(graph.node),
        op_histogram=dict(histogram.most_common()),
        opsets={entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
        inputs={v.name: _dims(v) for v in graph.input},
        outputs={v.name: _dims(v) for v in graph.output},
        initializers=len(graph.initializer),
    )


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    shape = value.type.tensor_type.shape
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in shape.dim]


def bytes_on_disk(path: Path, model: onnx.ModelProto) -> int:
    """The model file plus every external-data file it references (each counted once)."""
    files = {path.resolve()}
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add((path.parent / entry.value).resolve())
    return sum(f.stat().st_size for f in files if f.is_file())
