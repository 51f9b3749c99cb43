"""Weight-only block quantization of MatMuls and of the embedding, in kvfuse's own ops.

    x ─ MatMul(W [K, N] const)                →  x ─ BlockQuantMatMul(codes, scales, zp[, offsets])
    x ─ MatMul(Transpose(E [V, E] const))     →  x ─ BlockQuantMatMul(blocks of E)   ┐ one copy
    ids ─ Gather(E, axis 0)                   →  ids ─ BlockQuantGather(blocks of E) ┘ of E

Blocks run along K (the reduction axis): rows of Wᵀ, rows of E. A tied embedding and LM head
read the same initializers, so the model holds one quantized copy. The head and the embedding
take `head_bits` (8 by default: peers keep the head at 8 bits, an int4 head caused repetition
on phi-4-mini), every other MatMul `bits`. A weight source (`BlockSource`, e.g. a GGUF file's
own blocks) may supply the blocks; what it cannot supply is quantized round-to-nearest and
listed with the reason. Each new node records what it holds in `kvfuse.quant` (JSON).

Runs after the packed-Q/K/V and retained-state stages of a target's lowering (so the packed
projection is one weight) and before the target lowers these ops (`patterns.lower_quant`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from typing import Protocol

import numpy as np
import onnx_ir as ir

from kvfuse.patterns.blocks import Blocks, quantize_rtn
from kvfuse.rewriter.rules import (
    KVFUSE_DOMAIN,
    REPLACED_TAG,
    RULE_TAG,
    add_initializer,
    replaced_by,
    take_over,
)

QUANT_TAG = "kvfuse.quant"
MATMUL_OP, GATHER_OP = "BlockQuantMatMul", "BlockQuantGather"


class BlockSource(Protocol):
    """Supplies a weight's blocks from elsewhere (a GGUF file), or says why it cannot."""

    def blocks_for(self, weight_NK: np.ndarray) -> tuple[Blocks | None, str]: ...


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What to quantize, and how.

    bits/head_bits: 4 or 8 (head_bits None keeps the head and embedding in fp32);
    exclude: fnmatch patterns over input-graph node names (a MatMul whose name, or any node it
    stands for, matches stays fp32); source: blocks to take as they are, before RTN; zero_points:
    RTN asymmetric with a zero point per block, else symmetric (patterns.blocks.quantize_rtn)."""

    bits: int
    block_size: int = 32
    head_bits: int | None = 8
    exclude: tuple[str, ...] = ()
    source: BlockSource | None = None
    zero_points: bool = False


def quantize_weights(model: ir.Model, spec: QuantSpec) -> dict[str, int]:
    """Replace every eligible MatMul and the token embedding by block-quantized kvfuse ops."""
    graph = model.graph
    counts = {"quant/matmul": 0, "quant/head": 0, "quant/embedding": 0, "quant/skipped": 0}
    shared: dict[int, tuple[Blocks, list[ir.Value], str]] = {}  # id(E) → its blocks
    head = _head_node(graph)
    for node in list(graph):
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            kind = _quantize_matmul(graph, node, spec, node is head, shared)
        elif node.op_type == "Gather" and _is_embedding(graph, node):
            kind = _quantize_gather(graph, node, spec, shared)
        else:
            continue
        counts[kind] += 1
    return counts


def _quantize_matmul(graph, node, spec: QuantSpec, is_head: bool, shared) -> str:
    weight, transposed = _constant_weight(node.inputs[1])
    bits = spec.head_bits if is_head else spec.bits
    if weight is None or bits is None or _excluded(node, spec.exclude):
        return "quant/skipped"
    array = weight.const_value.numpy()
    weight_NK = array if transposed else array.T
    if weight_NK.shape[1] % spec.block_size:
        return "quant/skipped"
    blocks, values, note = _blocks_of(graph, weight, weight_NK, bits, spec, shared)
    new = ir.node(MATMUL_OP, [node.inputs[0], *values], domain=KVFUSE_DOMAIN, name=node.name)
    new.attributes["bits"] = ir.AttrInt64("bits", blocks.bits)
    new.attributes["block_size"] = ir.AttrInt64("block_size", blocks.block_size)
    _tag(new, node, blocks, note, array.nbytes, weight.name)
    _replace(graph, node, new)
    return "quant/head" if is_head else "quant/matmul"


def _quantize_gather(graph, node, spec: QuantSpec, shared) -> str:
    table = node.inputs[0]
    if spec.head_bits is None or _excluded(node, spec.exclude):
        return "quant/skipped"
    array = table.const_value.numpy()
    if array.shape[1] % spec.block_size:
        return "quant/skipped"
    blocks, values, note = _blocks_of(graph, table, array, spec.head_bits, spec, shared)
    codes, scales, zero_points = values[:3]
    new = ir.node(GATHER_OP, [codes, node.inputs[1], scales, zero_points], domain=KVFUSE_DOMAIN)
    new.name = node.name
    new.attributes["bits"] = ir.AttrInt64("bits", blocks.bits)
    new.attributes["block_size"] = ir.AttrInt64("block_size", blocks.block_size)
    _tag(new, node, blocks, note, array.nbytes, table.name)
    _replace(graph, node, new)
    return "quant/embedding"


def _blocks_of(graph, weight: ir.Value, weight_NK, bits, spec: QuantSpec, shared):
    """The blocks (and their initializers) of one weight, made once per weight value."""
    key = id(weight)
    if key not in shared:
        blocks, note = None, ""
        if spec.source is not None:
            blocks, note = spec.source.blocks_for(weight_NK)
        if blocks is None:
            blocks = quantize_rtn(weight_NK, bits, spec.block_size, spec.zero_points)
        name = weight.name or "weight"
        values = [
            add_initializer(graph, f"{name}.codes", blocks.codes),
            add_initializer(graph, f"{name}.scales", blocks.scales),
            add_initializer(graph, f"{name}.zero_points", blocks.zero_points),
        ]
        if blocks.offsets is not None:
            values.append(add_initializer(graph, f"{name}.offsets", blocks.offsets))
        shared[key] = (blocks, values, note)
    return shared[key]


def _tag(new, old: ir.Node, blocks: Blocks, note: str, fp32_bytes: int, weight: str) -> None:
    n, k = blocks.shape
    record = {
        "symmetric": blocks.symmetric,
        "weight": weight,
        "bits": blocks.bits,
        "block_size": blocks.block_size,
        "source": blocks.source,
        "k": k,
        "n": n,
        "offsets": blocks.offsets is not None,
        "fp32_bytes": fp32_bytes,
        "bytes": blocks.nbytes(),
        **({"fallback": note} if note else {}),
    }
    new.metadata_props[QUANT_TAG] = json.dumps(record)
    new.metadata_props[RULE_TAG] = "quant/" + ("gather" if new.op_type == GATHER_OP else "matmul")
    new.metadata_props[REPLACED_TAG] = json.dumps(replaced_by(old))


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    graph.insert_before(old, new)
    output = new.outputs[0]
    output.dtype = old.outputs[0].dtype
    if old.outputs[0].shape is not None:
        output.shape = ir.Shape(old.outputs[0].shape)
    take_over(graph, old.outputs[0], output)
    graph.remove(old, safe=True)


def _constant_weight(value: ir.Value) -> tuple[ir.Value | None, bool]:
    """(W, False) for a constant 2-D fp32 W; (E, True) for Transpose(E) of one; else None."""
    if value.const_value is not None:
        return (value, False) if _is_matrix(value) else (None, False)
    producer = value.producer()
    if producer is None or producer.op_type != "Transpose":
        return None, False
    source = producer.inputs[0]
    perm = list(producer.attributes.get_ints("perm", [1, 0]))
    if source.const_value is None or not _is_matrix(source) or perm != [1, 0]:
        return None, False
    return source, True


def _is_matrix(value: ir.Value) -> bool:
    tensor = value.const_value
    return len(tensor.shape) == 2 and tensor.dtype == ir.DataType.FLOAT


def _is_embedding(graph: ir.Graph, node: ir.Node) -> bool:
    """A Gather of rows of a constant fp32 table by the token ids (not RoPE tables)."""
    table, indices = node.inputs[0], node.inputs[1]
    ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
    axis = node.attributes.get_int("axis", 0)
    return table.const_value is not None and _is_matrix(table) and indices is ids and axis == 0


def _head_node(graph: ir.Graph) -> ir.Node | None:
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    return logits.producer() if logits is not None else None


def _excluded(node: ir.Node, patterns: tuple[str, ...]) -> bool:
    names = [node.name or ""] + [name for name, _ in replaced_by(node)]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns for name in names)


def quantized_nodes(model_or_graph) -> list[dict]:
    """The `kvfuse.quant` record of every quantized node, with its name and op."""
    graph = getattr(model_or_graph, "graph", model_or_graph)
    return [
        {"node": node.name, "op": node.op_type, **json.loads(node.metadata_props[QUANT_TAG])}
        for node in graph
        if QUANT_TAG in node.metadata_props
    ]
