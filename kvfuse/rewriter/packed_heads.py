"""Fused QKV projections read through a grid: make each part one contiguous block of columns.

Legend: B batch, S new tokens, H heads, Hkv kv heads, G = H / Hkv, D head dim, N the fused
projection's width. Models with one fused projection reshape it into a grid and slice q, k
and v out of one grid axis:

    GPT-NeoX   [B, S, N] → [B, S, H, 3·D] (→ Transpose [B, H, S, 3·D]); q, k, v = thirds of
               the last axis: each head's q, k and v sit side by side (per-head interleaved)
    Falcon     new_decoder_architecture: [B, S, N] → [B, S, Hkv, G + 2, D]; q = [.., :G, :],
               k = [.., G, :], v = [.., G + 1, :] (a 1-element Gather keeping the axis)
    Falcon     multi-query: [B, S, N] → [B, S, H + 2, D]; q = [.., :H, :], k, v one head each

A part is a contiguous run of columns only when the sliced axis is the outermost grid axis
(Falcon multi-query). `split_packed_parts` rewrites every such slice as

    x ─ [Gather(columns, axis=-1)] ─ Slice(part's run) ─ Reshape([.., part grid]) ─ [Transpose]

the Gather putting each part's columns together (omitted when they already are), so that each
part is an ordinary projection reshaped into heads, the form every attention rule matches.
A part that is reshaped again (Falcon's query, [.., Hkv, G, D] → [.., H, D]) is reshaped once.
`fold_column_gathers` then moves the Gather into the projection's weight (and bias): a
permutation of columns, free at run time. A part grid with a size-1 axis other than its last
two (Falcon's [.., Hkv, 1, D] k and v) is reshaped without it and unsqueezed, which is how
every other exporter writes the kv head repeat that follows.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from kvfuse.rewriter.rules import add_constant, add_initializer
from kvfuse.rewriter.shapes import (
    Dim,
    _dim,
    collapse_reshape,
    remove_identity_reshapes,
    symbolic_ints,
)


@dataclasses.dataclass
class _Part:
    """One consumer of the grid: a Slice or Gather of `start:end` on grid axis `axis`."""

    node: ir.Node
    axis: int  # in the grid (0 = the first axis the projection's width is split into)
    start: int
    end: int
    keep_axis: bool  # False for a Gather with a scalar index (it drops the axis)
    perm: list[int] | None  # the Transpose between the Reshape and the slice, if any


def split_packed_parts(graph: ir.Graph) -> int:
    """Rewrite the parts sliced out of a reshaped fused projection as blocks of its columns;
    returns how many parts were rewritten."""
    rewritten = 0
    for split in [n for n in graph if n.op_type == "Split" and n.domain in ("", "ai.onnx")]:
        _slice_grid_split(graph, split)
    for reshape in [n for n in graph if n.op_type == "Reshape" and n.domain in ("", "ai.onnx")]:
        grid = _grid(reshape)
        parts = _parts(reshape.outputs[0], len(reshape.inputs[0].shape)) if grid else None
        # q, k and v: three parts at least (two slices of one head tensor are partial RoPE's
        # rotated and passed-through dims, not a fused projection)
        if not parts or len(parts) < 3 or len({p.axis for p in parts}) != 1:
            continue
        if not _disjoint(parts):
            continue
        columns = [_columns(grid, part) for part in parts]
        source = _gather_columns(graph, reshape, np.concatenate(columns))
        offset = 0
        for part, block in zip(parts, columns, strict=True):
            _rewrite_part(graph, source, part, grid, offset, len(block))
            offset += len(block)
        rewritten += len(parts)
    return rewritten


def _slice_grid_split(graph: ir.Graph, split: ir.Node) -> None:
    """A Split of a reshaped projection's grid (through at most one Transpose) → one Slice per
    output, the parts `split_packed_parts` reads. GPT-NeoX's dynamo export splits its
    [B, H, S, 3·D] view with one Split where Optimum's slices it three times."""
    source = split.inputs[0]
    producer = source.producer()
    if producer is not None and producer.op_type == "Transpose":
        producer = producer.inputs[0].producer()
    if producer is None or producer.op_type != "Reshape" or _grid(producer) is None:
        return
    axis = split.attributes.get_int("axis", 0) % len(source.shape)
    size, count = source.shape[axis], len(split.outputs)
    sizes = ir.convenience.get_const_tensor(split.inputs[1]) if len(split.inputs) > 1 else None
    if sizes is not None:
        widths = [int(w) for w in sizes.numpy()]
    elif isinstance(size, int) and size % count == 0:
        widths = [size // count] * count
    else:
        return
    start = 0
    for output, width in zip(split.outputs, widths, strict=True):
        bounds = [
            add_constant(graph, split, np.array(v, np.int64))
            for v in ([start], [start + width], [axis])
        ]
        sliced = ir.node("Slice", [source, *bounds], name=f"{split.name}/slice_{start}")
        graph.insert_before(split, sliced)
        sliced.outputs[0].shape, sliced.outputs[0].dtype = output.shape, output.dtype
        ir.convenience.replace_all_uses_with(output, sliced.outputs[0])
        start += width
    graph.remove(split, safe=True)


def _grid(reshape: ir.Node) -> list[int] | None:
    """The static grid the Reshape splits its input's last axis into, if that is all it does."""
    source, shaped = reshape.inputs[0], reshape.outputs[0]
    if source.shape is None or shaped.shape is None or shaped.is_graph_output():
        return None
    dims_in, dims_out = [_dim(d) for d in source.shape], [_dim(d) for d in shaped.shape]
    lead = len(dims_in) - 1
    grid = dims_out[lead:]
    if len(grid) < 2 or None in dims_in[:lead] or dims_in[:lead] != dims_out[:lead]:
        return None
    if not all(isinstance(d, int) for d in grid) or dims_in[-1] != math.prod(grid):
        return None
    return grid


def _parts(shaped: ir.Value, rank_in: int) -> list[_Part] | None:
    """Every reader of the grid as a part (through at most one Transpose), or None if any
    reader is something else."""
    parts = []
    for user, _ in shaped.uses():
        if user.op_type == "Transpose" and not user.outputs[0].is_graph_output():
            perm = list(user.attributes.get_ints("perm"))
            readers = [_part(reader, perm, rank_in) for reader, _ in user.outputs[0].uses()]
        else:
            readers = [_part(user, None, rank_in)]
        if not readers or None in readers:
            return None
        parts.extend(readers)
    return sorted(parts, key=lambda p: p.start) if parts else None


def _part(node: ir.Node, perm: list[int] | None, rank_in: int) -> _Part | None:
    output, source = node.outputs[0], node.inputs[0]
    if node.domain not in ("", "ai.onnx") or output.is_graph_output() or source.shape is None:
        return None
    found = _bounds(node)
    if found is None:
        return None
    axis, start, stop, keep = found
    axis %= len(source.shape)
    source_axis = perm[axis] if perm is not None else axis
    size = source.shape[axis]
    if source_axis < rank_in - 1 or not isinstance(size, int):
        return None
    first, last, _ = slice(start, stop).indices(size)
    if first >= last:
        return None
    return _Part(node, source_axis - (rank_in - 1), first, last, keep, perm)


def _bounds(node: ir.Node) -> tuple[int, int, int | None, bool] | None:
    """(axis, start, stop, keeps the axis) of a static Slice, or of a Gather of one index."""
    if node.op_type == "Gather":
        index = ir.convenience.get_const_tensor(node.inputs[1])
        if index is None or index.size != 1:
            return None
        start = int(index.numpy().reshape(-1)[0])
        # index -1 is the slice -1: (stop 0 would be empty); a scalar index drops the axis
        return node.attributes.get_int("axis", 0), start, start + 1 or None, index.shape.rank() == 1
    if node.op_type != "Slice" or len(node.inputs) < 4:
        return None
    bounds = [symbolic_ints(v) for v in node.inputs[1:4]]
    steps = symbolic_ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
    if steps != [1] or any(b is None or len(b) != 1 or not isinstance(b[0], int) for b in bounds):
        return None
    (start,), (stop,), (axis,) = bounds
    return axis, start, stop, True


def _disjoint(parts: list[_Part]) -> bool:
    return all(a.end <= b.start for a, b in zip(parts, parts[1:], strict=False))


def _columns(grid: list[int], part: _Part) -> np.ndarray:
    """The flat columns of the part's grid entries, in the part's own row-major order."""
    index = [slice(None)] * len(grid)
    index[part.axis] = slice(part.start, part.end)
    return np.arange(math.prod(grid)).reshape(grid)[tuple(index)].reshape(-1)


def _gather_columns(graph: ir.Graph, reshape: ir.Node, columns: np.ndarray) -> ir.Value:
    source = reshape.inputs[0]
    if np.array_equal(columns, np.arange(len(columns))):
        return source  # already contiguous and in order (Falcon multi-query)
    indices = add_constant(graph, reshape, columns.astype(np.int64))
    gather = ir.node("Gather", [source, indices], attributes={"axis": -1})
    gather.outputs[0].shape = ir.Shape([*source.shape[:-1], len(columns)])
    gather.outputs[0].dtype = source.dtype
    graph.insert_before(reshape, gather)
    return gather.outputs[0]


def _rewrite_part(graph, source: ir.Value, part: _Part, grid, offset: int, width: int) -> None:
    """source[.., offset:offset + width] reshaped into the part's grid, unit axes unsqueezed."""
    anchor = part.node
    lead = list(source.shape[:-1])
    part_grid = [*grid[: part.axis], part.end - part.start, *grid[part.axis + 1 :]]
    # interior size-1 axes ([.., Hkv, 1, D]) become an Unsqueeze; the heads axis stays
    unit_axes = [i for i in range(1, len(part_grid) - 1) if part_grid[i] == 1]
    if not part.keep_axis:  # a scalar Gather drops the axis
        part_grid.pop(part.axis)
        unit_axes = []
    dense_grid = [d for i, d in enumerate(part_grid) if i not in unit_axes]
    bounds = [[offset], [offset + width], [-1], [0] * len(lead) + dense_grid]
    first, last, axis, target = (add_constant(graph, anchor, np.array(b, np.int64)) for b in bounds)
    sliced = _insert(graph, anchor, "Slice", [source, first, last, axis], [*lead, width], source)
    value = _insert(graph, anchor, "Reshape", [sliced, target], [*lead, *dense_grid], source)
    if unit_axes:
        axes = add_constant(graph, anchor, np.array([len(lead) + i for i in unit_axes], np.int64))
        value = _insert(graph, anchor, "Unsqueeze", [value, axes], [*lead, *part_grid], source)
    if part.perm is not None:
        dims = [*lead, *part_grid]
        permuted = [dims[axis] for axis in part.perm]
        value = _insert(graph, anchor, "Transpose", [value], permuted, source, perm=part.perm)
    ir.convenience.replace_all_uses_with(anchor.outputs[0], value)
    graph.remove(anchor, safe=True)
    # Falcon reshapes its [.., Hkv, G, D] query part to [.., H, D]: one Reshape of the block
    for reader, _ in list(value.uses()):
        if reader.op_type == "Reshape" and reader.domain in ("", "ai.onnx"):
            collapse_reshape(reader)


def _insert(graph, anchor, op_type, inputs, dims: list[Dim], like: ir.Value, **attributes):
    node = ir.node(op_type, inputs, attributes=attributes)
    graph.insert_before(anchor, node)
    node.outputs[0].shape, node.outputs[0].dtype = ir.Shape(dims), like.dtype
    return node.outputs[0]


def fold_column_gathers(graph: ir.Graph) -> int:
    """`Gather(MatMul(x, W) [+ b], columns, axis=-1)` with constant W (and b) read by nothing
    else → `MatMul(x, W[:, columns]) [+ b[columns]]`; returns how many were folded."""
    folded = 0
    for gather in [n for n in graph if n.op_type == "Gather" and n.domain in ("", "ai.onnx")]:
        found = _projection_of(gather)
        if found is None:
            continue
        matmul, add, columns = found
        weight = matmul.inputs[1]
        permuted = weight.const_value.numpy()[:, columns]
        matmul.replace_input_with(1, add_initializer(graph, f"{weight.name}.columns", permuted))
        output = matmul.outputs[0]
        if add is not None:
            index = next(i for i, v in enumerate(add.inputs) if v.const_value is not None)
            bias = add.inputs[index]
            permuted = bias.const_value.numpy()[columns]
            add.replace_input_with(index, add_initializer(graph, f"{bias.name}.columns", permuted))
            output = add.outputs[0]
        if gather.outputs[0].shape is not None:
            for value in (matmul.outputs[0], output):
                value.shape = ir.Shape(gather.outputs[0].shape)
        ir.convenience.replace_all_uses_with(gather.outputs[0], output)
        graph.remove(gather, safe=True)
        folded += 1
    return folded


def _projection_of(gather: ir.Node):
    """(MatMul, bias Add or None, columns) if the Gather permutes the columns of a constant
    projection that nothing else reads."""
    columns = ir.convenience.get_const_tensor(gather.inputs[1])  # a Constant node's too
    rank = len(gather.inputs[0].shape or [])
    if columns is None or columns.numpy().ndim != 1 or not rank:
        return None
    if gather.attributes.get_int("axis", 0) % rank != rank - 1:
        return None
    value, add = gather.inputs[0], None
    node = value.producer()
    if node is not None and node.op_type == "Add" and len(value.uses()) == 1:
        constants = [v for v in node.inputs if v.const_value is not None]
        if len(constants) != 1 or constants[0].const_value.numpy().ndim != 1:
            return None
        add, value = node, next(v for v in node.inputs if v.const_value is None)
        node = value.producer()
    if node is None or node.op_type != "MatMul" or len(value.uses()) != 1:
        return None
    weight = node.inputs[1].const_value
    if weight is None or weight.numpy().ndim != 2 or value.is_graph_output():
        return None
    return node, add, columns.numpy()


def split_parts_stage(model: ir.Model) -> dict[str, int]:
    """The two passes as a pipeline stage, for grids that canonicalisation rules (e.g.
    `layout/index_as_slice` on a dynamo export) exposed after the clean-up ran."""
    identities = remove_identity_reshapes(model.graph)
    parts = split_packed_parts(model.graph)
    return {
        "shape/identities": identities,
        "shape/packed_parts": parts,
        "shape/column_gathers": fold_column_gathers(model.graph),
    }
