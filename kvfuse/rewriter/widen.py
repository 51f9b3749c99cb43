"""bfloat16 graphs widened to float32, so that they can be checked on a CPU.

onnxruntime 1.31's CPU provider has no bfloat16 kernels for MatMul, GroupQueryAttention,
ReduceMax (Softmax), Mul or Expand (its CUDA provider has them), so a bfloat16 export and its
rewrite cannot run here as written. Widened, they can: every bfloat16 weight becomes the
float32 of the same value (exact: a bfloat16 is a float32 whose low 16 mantissa bits are zero),
and every bfloat16 type, Cast target and constant becomes float32, the same way in both graphs.

    bf16 weight W        ─▶ float32 W (same value)
    value typed bf16     ─▶ typed float32
    Cast(to=bfloat16)    ─▶ Cast(to=float)    (an identity where its input was widened)
    Constant bf16 tensor ─▶ float32 tensor

The two widened graphs then compute in float32 arithmetic the functions the bfloat16 graphs
compute without their intermediate roundings to bfloat16: comparing them proves the rewrite
computes the same function over the same bfloat16 weights; it does not measure how bfloat16
kernels round (that is onnxruntime's CUDA provider's business).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

BF16, FP32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT
DTYPE_ATTRIBUTES = ("to", "dtype")  # Cast's target, EyeLike/Random*'s output type


def has_bfloat16(model: ir.Model) -> bool:
    """Whether any graph input or weight of `model` is bfloat16 (a bf16 export or rewrite)."""
    values = [*model.graph.inputs, *model.graph.initializers.values()]
    return any(value.dtype == BF16 for value in values)


def widen_bfloat16(model: ir.Model) -> int:
    """Rewrite every bfloat16 of `model` to float32, in place (weights are converted lazily,
    tensor by tensor, when the model is saved or run).

    Args:
        model: any model; one without bfloat16 is left as it is.

    Returns:
        The number of values, weights and attributes changed.
    """
    changed = 0
    graph = model.graph
    for value in graph.initializers.values():
        if value.const_value is not None and value.const_value.dtype == BF16:
            value.const_value = _widened_tensor(value.const_value)
            changed += 1
    for value in _values(graph):
        if value.dtype == BF16:
            value.dtype = FP32
            changed += 1
    for node in ir.traversal.RecursiveGraphIterator(graph):
        changed += _widen_attributes(node)
    return changed


def _values(graph: ir.Graph):
    """Every value of `graph` and its subgraphs: inputs, outputs, initializers, node outputs."""
    yield from graph.inputs
    yield from graph.outputs
    yield from graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs
        for attribute in node.attributes.values():
            if attribute.type == ir.AttributeType.GRAPH:
                yield from attribute.value.inputs


def _widen_attributes(node: ir.Node) -> int:
    changed = 0
    for name, attribute in list(node.attributes.items()):
        if attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype == BF16:
            node.attributes[name] = ir.AttrTensor(name, _widened_tensor(attribute.value))
            changed += 1
        elif attribute.type == ir.AttributeType.TENSORS and any(
            t.dtype == BF16 for t in attribute.value
        ):
            tensors = [_widened_tensor(t) if t.dtype == BF16 else t for t in attribute.value]
            node.attributes[name] = ir.AttrTensors(name, tensors)
            changed += 1
        elif (
            name in DTYPE_ATTRIBUTES
            and attribute.type == ir.AttributeType.INT
            and attribute.value == BF16
        ):
            node.attributes[name] = ir.AttrInt64(name, FP32)
            changed += 1
    return changed


def _widened_tensor(tensor) -> ir.LazyTensor:
    """`tensor` as float32, read (from memory or its external file) only when needed."""

    def convert(source=tensor) -> ir.Tensor:
        return ir.Tensor(np.asarray(source.numpy(), dtype=np.float32))

    return ir.LazyTensor(convert, FP32, ir.Shape(list(tensor.shape)), name=tensor.name)
