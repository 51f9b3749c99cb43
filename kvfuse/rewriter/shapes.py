"""Resolve the shape plumbing exporters emit around Reshape, so that static dims become known.

Exporters build Reshape targets at run time (`Concat(Unsqueeze(Gather(Shape(x), 0)), ..., -1,
D)`), which ONNX shape inference cannot see through: every tensor after such a Reshape has an
unknown shape and every `Shape → Gather` of it stays in the graph. Here the target is evaluated
symbolically — dims are ints or named symbols like `batch_size` — and the Reshape output gets
the shape it really has; ordinary constant folding then removes the plumbing whose dims are now
static (head counts, head dims, half head dims for RoPE slices).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

Dim = int | str | None  # a static size, a symbolic size, or unknown


def symbolic_ints(value: ir.Value | None) -> list[Dim] | None:
    """The elements of a 1-D int64 shape tensor as dims, or None if it cannot be followed."""
    if value is None:
        return None
    if value.const_value is not None:
        array = value.const_value.numpy()
        return [int(x) for x in array.reshape(-1)] if array.ndim <= 1 else None
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Concat":
        parts = [symbolic_ints(v) for v in node.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if node.op_type in ("Unsqueeze", "Cast", "Identity", "Reshape"):
        scalar = symbolic_scalar(node.inputs[0])
        inner = symbolic_ints(node.inputs[0]) if scalar is None else [scalar]
        return inner
    if node.op_type == "Shape":
        return _shape_slice(node)
    if node.op_type == "Slice" and len(node.inputs) >= 3:  # GPT-2: Shape(v)[-1:] for the scale
        dims = symbolic_ints(node.inputs[0])
        bounds = [symbolic_scalar(v) for v in node.inputs[1:3]]
        axes = symbolic_ints(node.inputs[3]) if len(node.inputs) > 3 else [0]
        steps = symbolic_ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
        if (
            dims is not None
            and all(isinstance(b, int) for b in bounds)
            and axes in ([0], [-1])
            and steps == [1]
        ):
            return dims[bounds[0] : bounds[1]]
    if node.op_type in ("ConstantOfShape", "Mul", "Equal", "Where"):
        return _elementwise_ints(node)
    return None


def _elementwise_ints(node: ir.Node) -> list[Dim] | None:
    """TorchScript writes `x.expand(sizes)` with a -1 guard over the sizes:
    `Where(Equal(sizes, ConstantOfShape(n, 1) · -1), ConstantOfShape(n, 1), sizes)`. Followed
    here element by element; a symbolic size is a dim, so never -1, and equals only itself."""
    if node.op_type == "ConstantOfShape":
        count = symbolic_ints(node.inputs[0])
        fill = node.attributes.get("value")
        fill = int(fill.as_tensor().numpy().reshape(-1)[0]) if fill is not None else 0
        return [fill] * count[0] if count is not None and isinstance(count[0], int) else None
    parts = [
        symbolic_ints(v) if symbolic_scalar(v) is None else [symbolic_scalar(v)]
        for v in node.inputs
    ]
    if any(p is None for p in parts):
        return None
    size = max(len(p) for p in parts)
    if any(len(p) not in (1, size) for p in parts):
        return None
    rows = zip(*(p * size if len(p) == 1 else p for p in parts), strict=True)
    values = [_element(node.op_type, *row) for row in rows]
    return None if any(v is None for v in values) else values


def _element(op_type: str, *args: Dim) -> Dim:
    if op_type == "Mul":
        a, b = args
        return a * b if isinstance(a, int) and isinstance(b, int) else None
    if op_type == "Equal":
        a, b = args
        if isinstance(a, int) and isinstance(b, int):
            return int(a == b)
        if isinstance(a, str) and isinstance(b, str) and a == b:
            return 1
        return 0 if (isinstance(a, int) and a < 0) or (isinstance(b, int) and b < 0) else None
    condition, when_true, when_false = args  # Where
    return None if not isinstance(condition, int) else when_true if condition else when_false


def symbolic_scalar(value: ir.Value | None) -> Dim:
    """A scalar (or 1-element) int value as a dim, or None if unknown."""
    if value is None:
        return None
    if value.const_value is not None:
        array = value.const_value.numpy()
        return int(array.reshape(-1)[0]) if array.size == 1 else None
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Gather":
        dims = symbolic_ints(node.inputs[0])
        index = symbolic_scalar(node.inputs[1])
        if dims is not None and isinstance(index, int) and -len(dims) <= index < len(dims):
            return dims[index]
    if node.op_type in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        return symbolic_scalar(node.inputs[0])
    if node.op_type in ("Mul", "Div"):
        a, b = (symbolic_scalar(v) for v in node.inputs)
        if isinstance(a, int) and isinstance(b, int):
            return a * b if node.op_type == "Mul" else (a // b if b else None)
    return None


def _shape_slice(node: ir.Node) -> list[Dim] | None:
    shape = node.inputs[0].shape if node.inputs[0] is not None else None
    if shape is None:
        return None
    dims = [_dim(d) for d in shape]
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", len(dims))
    return dims[start:end]


def _dim(d) -> Dim:
    if isinstance(d, int):
        return d
    return d.value if isinstance(d, ir.SymbolicDim) and d.value else None


def reshape_output_dims(node: ir.Node) -> list[Dim] | None:
    """The output dims of a Reshape from its symbolic target and its input's shape."""
    target = symbolic_ints(node.inputs[1])
    source = node.inputs[0].shape
    if target is None or source is None:
        return None
    source_dims = [_dim(d) for d in source]
    allow_zero = node.attributes.get_int("allowzero", 0)
    dims = [
        source_dims[i] if d == 0 and not allow_zero and i < len(source_dims) else d
        for i, d in enumerate(target)
    ]
    if -1 in dims:
        dims[dims.index(-1)] = _inferred_dim(source_dims, [d for d in dims if d != -1])
    return dims


def _inferred_dim(source: list[Dim], known: list[Dim]) -> Dim:
    """Size of the -1 dim: product(source) / product(known), cancelling equal symbols."""
    numerator, denominator = list(source), list(known)
    for d in list(denominator):
        if isinstance(d, str) and d in numerator:
            numerator.remove(d)
            denominator.remove(d)
    if not all(isinstance(d, int) for d in numerator + denominator):
        return None
    top, bottom = math.prod(numerator), math.prod(denominator)
    return top // bottom if bottom and top % bottom == 0 else None


def expand_output_dims(node: ir.Node) -> list[Dim] | None:
    """The output dims of an Expand: its input broadcast against its symbolic target."""
    target, source = symbolic_ints(node.inputs[1]), node.inputs[0].shape
    if target is None or source is None:
        return None
    source_dims = [_dim(d) for d in source]
    rank = max(len(target), len(source_dims))
    target = [1] * (rank - len(target)) + target
    source_dims = [1] * (rank - len(source_dims)) + source_dims
    return [_broadcast(a, b) for a, b in zip(source_dims, target, strict=True)]


def _broadcast(a: Dim, b: Dim) -> Dim:
    if a == 1 or a == b:
        return b
    if b == 1 or (isinstance(a, int) and a > 1):
        return a
    return b if isinstance(b, int) and b > 1 else None


def transpose_output_dims(node: ir.Node) -> list[Dim] | None:
    """A Transpose's input dims permuted. (ONNX inference keeps the placeholder dims it made
    up for a value, `unk__N`, even once its input's shape becomes known.)"""
    source, perm = node.inputs[0].shape, node.attributes.get_ints("perm", None)
    if source is None or perm is None or len(perm) != len(source):
        return None
    return [_dim(source[axis]) for axis in perm]


_OUTPUT_DIMS = {
    "Reshape": reshape_output_dims,
    "Expand": expand_output_dims,
    "Transpose": transpose_output_dims,
}


def propagate_reshape_shapes(graph: ir.Graph) -> int:
    """Give every Reshape, Expand and Transpose output the shape its symbolic target (or
    input) implies; returns how many."""
    changed = 0
    for node in graph:
        if node.op_type not in _OUTPUT_DIMS or node.domain not in ("", "ai.onnx"):
            continue
        dims = _OUTPUT_DIMS[node.op_type](node)
        if dims is None or any(d is None for d in dims):
            continue
        shape = ir.Shape(dims)
        if node.outputs[0].shape != shape:
            node.outputs[0].shape = shape
            changed += 1
    return changed


def fold_static_dims(graph: ir.Graph) -> int:
    """Replace `Shape`/`Gather(Shape)`/`Concat` int tensors whose dims are all static by constants.

    Returns how many values were replaced; run the constant folder afterwards to fold what
    consumed them (Div, Unsqueeze, Slice bounds, ...).
    """
    replaced = 0
    for node in list(graph):
        if node.op_type not in ("Shape", "Gather", "Concat", "Slice") or node.domain not in (
            "",
            "ai.onnx",
        ):
            continue
        output = node.outputs[0]
        if output.dtype != ir.DataType.INT64 or not output.uses() and not output.is_graph_output():
            continue
        if node.op_type == "Gather":
            scalar = symbolic_scalar(output)
            index = node.inputs[1].const_value
            if not isinstance(scalar, int) or index is None or index.numpy().size != 1:
                continue
            # the output has the index's rank (a scalar index gathers a scalar)
            array = np.array(scalar, dtype=np.int64).reshape(index.numpy().shape)
        else:
            dims = symbolic_ints(output)
            if dims is None or not all(isinstance(d, int) for d in dims):
                continue
            array = np.array(dims, dtype=np.int64)
        constant = ir.node("Constant", [], attributes={"value": ir.tensor(array)})
        graph.insert_before(node, constant)
        constant.outputs[0].shape = ir.Shape(array.shape)
        constant.outputs[0].dtype = ir.DataType.INT64
        ir.convenience.replace_all_uses_with(output, constant.outputs[0])
        replaced += 1
    return replaced


def fold_copied_dims(graph: ir.Graph) -> int:
    """Reshape targets whose symbolic dims are the reshaped tensor's own dims at the same
    positions (GPT-J's `x.flatten(-2)`: `Concat(Shape(x)[:-2], [-1])`) become constants that
    copy those dims (0, as Reshape reads it); returns how many targets were replaced."""
    replaced = 0
    for node in list(graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        if node.attributes.get_int("allowzero", 0) or node.inputs[0].shape is None:
            continue
        target = symbolic_ints(node.inputs[1])
        if target is None or all(isinstance(d, int) for d in target):
            continue
        source = [_dim(d) for d in node.inputs[0].shape]
        copied = [
            0 if isinstance(d, str) and i < len(source) and source[i] == d else d
            for i, d in enumerate(target)
        ]
        if not all(isinstance(d, int) for d in copied):
            continue
        constant = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(copied))})
        graph.insert_before(node, constant)
        constant.outputs[0].shape = ir.Shape([len(copied)])
        constant.outputs[0].dtype = ir.DataType.INT64
        node.replace_input_with(1, constant.outputs[0])
        replaced += 1
    return replaced


def resolve_shapes(model: ir.Model, max_rounds: int = 6) -> int:
    """Alternate ONNX shape inference (with data propagation) and the symbolic Reshape pass,
    folding the dims that become static, until nothing changes. Returns values folded."""
    from onnx_ir.passes.common import ShapeInferencePass
    from onnxscript import optimizer

    folded_total = 0
    for _ in range(max_rounds):
        ShapeInferencePass(strict_mode=False)(model)
        changed = propagate_reshape_shapes(model.graph)
        folded = fold_static_dims(model.graph) + fold_copied_dims(model.graph)
        folded_total += folded
        if folded:
            optimizer.fold_constants(model)
            optimizer.remove_unused_nodes(model)
        if not changed and not folded:
            break
    return folded_total


def canonicalize_concat_axes(graph: ir.Graph) -> int:
    """Write every Concat axis as a non-negative index (rank permitting), so rules match one
    spelling: TorchScript writes the cache concat as axis=-2, hand-written graphs as 2."""
    changed = 0
    for node in graph:
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            continue
        axis = node.attributes.get_int("axis", 0)
        rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
        if axis < 0 and rank:
            node.attributes["axis"] = ir.AttrInt64("axis", axis % rank)
            changed += 1
    return changed


def infer_shapes(model: ir.Model) -> dict[str, int]:
    """ONNX shape inference over the graph; kvfuse ops keep the shapes their rules gave them."""
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass(strict_mode=False)(model)
    return {}


def specialize_batch(model: ir.Model, batch_size: int | None) -> dict[str, int]:
    """Make every graph input/output dim named like a batch (e.g. `batch_size`) static, before
    clean-up, so the shape plumbing that reads the batch size folds away."""
    if batch_size is None:
        return {}
    changed = 0
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is None:
            continue
        dims = [
            batch_size if isinstance(d, ir.SymbolicDim) and "batch" in str(d.value) else d
            for d in value.shape
        ]
        if dims != list(value.shape):
            value.shape = ir.Shape(dims)
            changed += 1
    return {"shape/static_batch": changed}


def remove_full_slices(graph: ir.Graph) -> int:
    """Drop Slices that keep a whole axis (start 0, end ≥ its static size, step 1): Phi-3's
    "partial" RoPE over the full head dim leaves `x[..., :D]`, which hides the rotary input."""
    removed = 0
    for node in list(graph):
        if node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 4:
            continue
        source, starts, ends, axes = node.inputs[:4]
        steps = node.inputs[4] if len(node.inputs) > 4 else None
        values = [symbolic_ints(v) for v in (starts, ends, axes)]
        step = symbolic_ints(steps) if steps is not None else [1]
        if None in values or step != [1] or source.shape is None:
            continue
        (start,), (end,), (axis,) = (v if len(v) == 1 else (None,) for v in values)
        size = source.shape[axis] if axis is not None else None
        if start == 0 and isinstance(size, int) and isinstance(end, int) and end >= size:
            removed += _bypass(graph, node)
    return removed


def _bypass(graph: ir.Graph, node: ir.Node) -> int:
    """Let `node`'s readers read its input instead and drop it (1), unless its output is a
    graph output (0)."""
    if node.outputs[0].is_graph_output():
        return 0
    ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
    graph.remove(node, safe=True)
    return 1


def remove_identity_reshapes(graph: ir.Graph) -> int:
    """Drop Reshapes whose output shape is their input's, dim for dim (Falcon reshapes each
    head tensor to the shape it already has), and Identity nodes (rewrites of a dynamo export
    leave some between a head's Unsqueeze and Expand)."""
    removed = 0
    for node in list(graph):
        if node.op_type not in ("Reshape", "Identity") or node.domain not in ("", "ai.onnx"):
            continue
        source, output = node.inputs[0], node.outputs[0]
        if node.op_type == "Identity":
            removed += _bypass(graph, node)
            continue
        if source.shape is None or output.shape is None:
            continue
        dims_in, dims_out = [_dim(d) for d in source.shape], [_dim(d) for d in output.shape]
        if None not in dims_in and dims_in == dims_out:
            removed += _bypass(graph, node)
    return removed


def collapse_reshapes(graph: ir.Graph) -> int:
    """Reshape(Reshape(x, a), b) → Reshape(x, b) everywhere it is exact (CodeGen splits its
    projection into [B, S, mp, H/mp, D] groups and merges them straight back into heads):
    the attention rules then see one head reshape of the projection."""
    return sum(
        collapse_reshape(node)
        for node in list(graph)
        if node.op_type == "Reshape"
        and node.domain in ("", "ai.onnx")
        and _single_use_reshape(node.inputs[0])
    )


def _single_use_reshape(value: ir.Value) -> bool:
    """A Reshape output read once (a Reshape read elsewhere too is a tensor of its own)."""
    node = value.producer()
    return node is not None and node.op_type == "Reshape" and len(value.uses()) == 1


def _copies_agree(node: ir.Node, source: ir.Value, other: ir.Value) -> bool:
    """Whether every dim `node`'s target copies (a 0) is the same in `source` and `other`."""
    target = symbolic_ints(node.inputs[1])
    if target is None:
        return False
    if node.attributes.get_int("allowzero", 0):
        return True
    copied = [i for i, d in enumerate(target) if d == 0]
    return all(
        _dim(source.shape[i]) is not None and _dim(source.shape[i]) == _dim(other.shape[i])
        for i in copied
    )


def read_through_sibling_reshapes(graph: ir.Graph) -> int:
    """Reshape(e, flat) → Reshape(Reshape(e, heads), flat) where the graph also reshapes e into
    `heads`, one rank lower than e (the same elements in the same order, so exact). The dynamo
    exporter repeats Gemma's single KV head as Expand [B, 1, n, T, D] → [B, n, T, D] and
    flattens the Expand straight to [B·n, T, D] for Q·Kᵀ: read through, the head repeat and
    the key transpose are each what their rules know. Returns how many were rewired."""
    rewired = 0
    for node in list(graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        source, output = node.inputs[0], node.outputs[0]
        if source.shape is None or output.shape is None:
            continue
        for user, _ in source.uses():
            sibling = user.outputs[0]
            if (
                user is not node
                and user.op_type == "Reshape"
                and sibling.shape is not None
                and len(sibling.shape) == len(source.shape) - 1 > len(output.shape)
                and _copies_agree(node, source, sibling)
            ):
                node.replace_input_with(0, sibling)
                rewired += 1
                break
    return rewired


def collapse_reshape(node: ir.Node) -> bool:
    """Reshape(Reshape(x, a), b) → Reshape(x, b), unless b copies (0) a dim that differs
    between x and Reshape(x, a). Returns whether `node` (the outer Reshape) was changed."""
    inner = node.inputs[0].producer()
    if inner is None or inner.op_type != "Reshape" or node.op_type != "Reshape":
        return False
    source, middle = inner.inputs[0], inner.outputs[0]
    target = symbolic_ints(node.inputs[1])
    if target is None or source.shape is None or middle.shape is None:
        return False
    copies = [i for i, d in enumerate(target) if d == 0]
    if not node.attributes.get_int("allowzero", 0) and any(
        i >= min(len(source.shape), len(middle.shape))
        or _dim(source.shape[i]) is None
        or _dim(source.shape[i]) != _dim(middle.shape[i])
        for i in copies
    ):
        return False
    node.replace_input_with(0, source)
    return True
