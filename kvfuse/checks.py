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

# onnxruntime ops registered in the ONNX domain that onnx has no schema for (an optimized model
# holds them); checked as onnxruntime ops, by onnxruntime
ORT_OPS_IN_ONNX_DOMAIN = {"SimplifiedLayerNormalization"}
KNOWN_DOMAINS = {"": onnx.defs.onnx_opset_version(), "ai.onnx": onnx.defs.onnx_opset_version()}
_FIX = "re-export it, or restore the original file"


def check_model_file(path: Path, proto: onnx.ModelProto) -> None:
    """Raise a one-line `KvfuseError` if `proto` (read from `path` without its external data)
    is not a model kvfuse can safely read."""
    _check_opsets(path, proto)
    check_external_data(path, proto)
    _check_inline_data(path, proto.graph)
    _check_io(path, proto.graph)
    _check_type_attributes(path, proto.graph)
    _check_graph(path, proto)


def check_external_data(path: Path, proto: onnx.ModelProto) -> None:
    """Every external tensor lies inside the model's folder, in a file that holds it whole."""
    root = Path(path).parent.resolve()
    for tensor in _stored_tensors(proto.graph):
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
                f"{path}: {location} is missing (the weights file of tensor {tensor.name}); "
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
                f"{path}: tensor {tensor.name} lies outside {location} (it ends at byte "
                f"{end}, the file has {file.stat().st_size}); the weights file is truncated or "
                "not this model's"
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


def _check_type_attributes(path: Path, graph: onnx.GraphProto) -> None:
    """Attributes naming a tensor type (Cast's `to`, a `dtype`) name one that exists: the
    checker lets any integer through."""
    valid = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name in ("to", "dtype") and attribute.type == attribute.INT:
                if attribute.i not in valid:
                    raise KvfuseError(
                        f"{path}: node {node.name or node.op_type} has {attribute.name}="
                        f"{attribute.i}, which is no ONNX tensor type; {_FIX}"
                    )


def _stored_tensors(graph: onnx.GraphProto):
    """The initializers and the Constant nodes' tensors (Optimum's > 2 GB exports keep
    Constants of over 1 KiB in the external data file too)."""
    yield from graph.initializer
    for node in graph.node:
        yield from (a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)


def _external_constant(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attribute in node.attribute:
        tensor = attribute.t if attribute.type == onnx.AttributeProto.TENSOR else None
        if tensor is not None and tensor.data_location == onnx.TensorProto.EXTERNAL:
            return tensor
    return None


def _check_graph(path: Path, proto: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(_weightless(proto), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise KvfuseError(f"{path} is not a valid ONNX model ({reason}); {_FIX}") from error
    except UnicodeDecodeError as error:  # the checker quotes a name that is not UTF-8
        raise KvfuseError(
            f"{path} is not a valid ONNX model (a name in it is not UTF-8 text); {_FIX}"
        ) from error


def _weightless(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each initializer replaced by a graph input of its type and dims."""
    light = onnx.ModelProto()
    light.ir_version, light.producer_name = proto.ir_version, proto.producer_name
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    source, graph = proto.graph, light.graph
    graph.name = source.name
    # a Constant whose tensor is in the external file: an input of its type and dims instead
    external = {n.output[0]: _external_constant(n) for n in source.node if _external_constant(n)}
    graph.node.extend(n for n in source.node if not (n.output and n.output[0] in external))
    graph.input.extend(
        onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims))
        for name, t in external.items()
    )
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in ORT_OPS_IN_ONNX_DOMAIN:
            node.domain = "com.microsoft"  # a domain onnx.checker leaves to onnxruntime
    if not any(entry.domain == "com.microsoft" for entry in light.opset_import):
        light.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    graph.input.extend(source.input)
    # Declared output and intermediate shapes are left out: onnxruntime only warns when they
    # disagree with what the graph computes (stale value_info after hand edits is common), and
    # onnx.checker wants a shape on every output, which tools adding debug outputs omit
    graph.output.extend(v for v in source.output if v.type.tensor_type.HasField("shape"))
    for value in graph.output:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            dim.dim_param = f"{value.name}:{axis}"
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
