"""Checks of a model file handed to kvfuse (untrusted input), before any of it is used.

A damaged or hand-edited ONNX file — truncated, a node reading a value no one produces, a
dropped node, an op that does not exist, an attribute out of range, an initializer whose data
disagrees with its dims, external data that is missing, too short or outside the model's
folder, an opset from the future, a negative dim, a duplicated output — is refused here with
one line naming the file and what is wrong. The weights are never read: inline data is
measured, external data is checked against the size of its file, and the graph is checked by
onnx.checker with strict shape inference on a copy whose initializers are replaced by typed
inputs (a multi-GB model checks in the time of its graph).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from kvfuse.errors import KvfuseError

KNOWN_DOMAINS = {"": onnx.defs.onnx_opset_version(), "ai.onnx": onnx.defs.onnx_opset_version()}
_FIX = "re-export it, or restore the original file"


def check_model_file(path: Path, proto: onnx.ModelProto, *, graph: bool = True) -> None:
    """Raise a one-line `KvfuseError` if `proto` (read from `path` without its external data)
    is not a model kvfuse can safely read. `graph`: also onnx.checker with strict shape
    inference (for exports; an optimized model's onnxruntime ops in the ONNX domain, such as
    SimplifiedLayerNormalization, are unknown to onnx — onnxruntime checks those graphs)."""
    _check_opsets(path, proto)
    check_external_data(path, proto)
    _check_inline_data(path, proto.graph)
    _check_io(path, proto.graph)
    if graph:
        _check_graph(path, proto)


def check_external_data(path: Path, proto: onnx.ModelProto) -> None:
    """Every external tensor lies inside the model's folder, in a file that holds it whole."""
    root = Path(path).parent.resolve()
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        file = (root / location).resolve()
        if root not in file.parents:
            raise KvfuseError(
                f"{path} points its weights outside its directory ({location}); refusing to read it"
            )
        if not file.is_file():
            raise KvfuseError(
                f"{path}: the weights file {location} (tensor {tensor.name}) is missing; "
                "copy it beside the model"
            )
        try:
            offset, length = int(entries.get("offset", 0)), entries.get("length")
        except ValueError as error:
            raise KvfuseError(f"{path}: tensor {tensor.name} has a bad offset; {_FIX}") from error
        expected = _tensor_bytes(tensor)
        if length is not None and expected is not None and int(length) != expected:
            raise KvfuseError(
                f"{path}: tensor {tensor.name} says {length} bytes in {location}, its dims need "
                f"{expected}; {_FIX}"
            )
        end = offset + (expected if expected is not None else int(length or 0))
        if offset < 0 or end > file.stat().st_size:
            raise KvfuseError(
                f"{path}: {location} is {file.stat().st_size} bytes, too short for tensor "
                f"{tensor.name} (ends at byte {end}); the weights file is truncated or not "
                "this model's"
            )


def _check_opsets(path: Path, proto: onnx.ModelProto) -> None:
    for entry in proto.opset_import:
        latest = KNOWN_DOMAINS.get(entry.domain)
        if latest is not None and not 1 <= entry.version <= latest:
            raise KvfuseError(
                f"{path} asks for ONNX opset {entry.version}; onnx {onnx.__version__} knows "
                f"opsets 1 to {latest}; {_FIX}"
            )


def _check_inline_data(path: Path, graph: onnx.GraphProto) -> None:
    for tensor in graph.initializer:
        if any(d < 0 for d in tensor.dims):
            raise KvfuseError(f"{path}: initializer {tensor.name} has a negative dim; {_FIX}")
        expected = _tensor_bytes(tensor)
        if tensor.data_location == onnx.TensorProto.EXTERNAL or expected is None:
            continue
        if tensor.HasField("raw_data") and len(tensor.raw_data) != expected:
            raise KvfuseError(
                f"{path}: initializer {tensor.name} holds {len(tensor.raw_data)} bytes, its dims "
                f"{list(tensor.dims)} need {expected}; {_FIX}"
            )


def _check_io(path: Path, graph: onnx.GraphProto) -> None:
    names = [value.name for value in graph.output]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise KvfuseError(f"{path} lists the output {repeated[0]} more than once; {_FIX}")
    for value in [*graph.input, *graph.output, *graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        if any(d.HasField("dim_value") and d.dim_value < 0 for d in dims):
            raise KvfuseError(f"{path}: {value.name} has a negative dim; {_FIX}")


def _check_graph(path: Path, proto: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(_weightless(proto), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise KvfuseError(f"{path} is not a valid ONNX model ({reason}); {_FIX}") from error


def _weightless(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each initializer replaced by a graph input of its type and dims."""
    light = onnx.ModelProto()
    light.ir_version, light.producer_name = proto.ir_version, proto.producer_name
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    source, graph = proto.graph, light.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    declared = {value.name for value in source.input}
    graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in source.initializer
        if t.name not in declared
    )
    return light


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dims and type need, or None for types without a fixed width."""
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if tensor.data_type in _SUB_BYTE or tensor.data_type == onnx.TensorProto.STRING:
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


_SUB_BYTE = {
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, name)
}
