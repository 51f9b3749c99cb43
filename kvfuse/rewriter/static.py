"""Fully static specialisations: a prefill graph (S = prefill length) and a decode graph (S = 1)
that share one external weights file.

Both are cut from the same rewritten model, so their weights are the same tensors by name and
content. Each gets every input dim fixed, the shape plumbing folded away (no Shape or Size
left) and must come out of ONNX shape inference with no unknown dim. The weights file is
written once: each tensor is stored at one offset that both graphs point at, so the second
graph adds no bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir

from kvfuse.errors import KvfuseError

SEQUENCE_INPUTS = ("input_ids", "position_ids")
PLUMBING_OPS = {"Shape", "Size"}
STANDARD_DOMAINS = {"", "ai.onnx"}
EXTERNAL_MIN_BYTES = 1024  # smaller tensors (folded index constants) stay inline
ALIGNMENT = 4096  # page-aligned offsets, so a runtime can map tensors straight from the file


def specialize(proto: onnx.ModelProto, seq_len: int, clean_up: Callable) -> onnx.ModelProto:
    """A copy of `proto` with the new-token dim fixed to `seq_len`, plumbing folded, shapes
    inferred from scratch; raises if a dynamic dim or a shape op is left."""
    model = ir.serde.deserialize_model(proto)
    inputs = {v.name: v for v in model.graph.inputs}
    symbol = inputs["input_ids"].shape[1]
    if isinstance(symbol, int):
        raise KvfuseError(f"input_ids already has a fixed length {symbol}; cannot specialise it")
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is not None:
            value.shape = ir.Shape([seq_len if d == symbol else d for d in value.shape])
    for value in model.graph.inputs:  # position-like inputs may name S differently
        if value.name in SEQUENCE_INPUTS and value.shape is not None:
            value.shape = ir.Shape([value.shape[0], seq_len])
    clean_up(model)
    static = ir.serde.serialize_model(model)
    del static.graph.value_info[:]  # infer every shape anew rather than trust the old ones
    try:
        static = onnx.shape_inference.infer_shapes(static, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as error:
        first = str(error).strip().splitlines()[0]
        raise KvfuseError(f"shape inference fails on the S={seq_len} graph: {first}") from error
    check_static(static, f"the S={seq_len} graph")
    check_standard(static, full=False)  # strict shape inference just ran
    return static


def check_standard(proto: onnx.ModelProto, full: bool = True) -> None:
    """onnx.checker over a standard-ops model (full: with strict shape inference)."""
    try:
        onnx.checker.check_model(proto, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first = str(error).strip().splitlines()[0]
        raise KvfuseError(f"the rewritten model fails onnx.checker: {first}") from error


def check_static(proto: onnx.ModelProto, what: str) -> None:
    """Raise unless every tensor has a known, fixed shape and only standard, non-shape ops."""
    graph = proto.graph
    vendor = sorted({n.domain for n in graph.node if n.domain not in STANDARD_DOMAINS})
    if vendor:
        raise KvfuseError(f"{what} still has non-standard ops (domains {', '.join(vendor)})")
    plumbing = [n.name or n.op_type for n in graph.node if n.op_type in PLUMBING_OPS]
    if plumbing:
        raise KvfuseError(f"{what} still computes shapes at run time: {', '.join(plumbing[:5])}")
    produced = {out for node in graph.node for out in node.output if out}
    typed = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
    unknown = [
        name
        for name in sorted(produced | {v.name for v in graph.input})
        if name not in typed or not _static(typed[name])
    ]
    if unknown:
        raise KvfuseError(
            f"{what} has {len(unknown)} tensors without a fixed shape (first: "
            f"{', '.join(unknown[:3])}); this model cannot be made fully static"
        )


def _static(value: onnx.ValueInfoProto) -> bool:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return False
    return all(d.HasField("dim_value") for d in tensor.shape.dim)


@dataclasses.dataclass
class SharedWeights:
    """What `write_shared` stored: the one file, its tensors, and what stayed in each graph."""

    file: str
    bytes_total: int
    tensors: int
    inline_bytes: dict[str, int]  # graph role → bytes of its own small tensors kept inline


def write_shared(graphs: dict[str, onnx.ModelProto], weights: Path) -> SharedWeights:
    """Store every large initializer the graphs have in common (same name and content) once
    in the file `weights` and point every graph at it; what only one graph has (constants
    folded from its own S, a few KB) stays inline in that graph. The graphs must be written
    in the same directory as `weights`."""
    keys = {role: {_key(t): t for t in proto.graph.initializer} for role, proto in graphs.items()}
    common = set.intersection(*(set(tensors) for tensors in keys.values()))
    stored: dict[tuple[str, bytes], tuple[int, int]] = {}
    inline = {role: 0 for role in graphs}
    with open(weights, "wb") as file:
        for role, tensors in keys.items():
            for key, tensor in tensors.items():
                data = _raw(tensor)
                if key not in common or len(data) < EXTERNAL_MIN_BYTES:
                    inline[role] += len(data)
                    continue
                if key not in stored:
                    file.write(b"\0" * (-file.tell() % ALIGNMENT))
                    stored[key] = (file.tell(), len(data))
                    file.write(data)
                _point_at(tensor, weights.name, *stored[key])
        total = file.tell()
    return SharedWeights(weights.name, total, len(stored), inline)


def _key(tensor: onnx.TensorProto) -> tuple[str, bytes]:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise KvfuseError(f"initializer {tensor.name} is external already")
    return tensor.name, hashlib.sha256(_raw(tensor)).digest()


def _raw(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    array = onnx.numpy_helper.to_array(tensor)
    return array.tobytes()


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
        tensor.ClearField(field)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
