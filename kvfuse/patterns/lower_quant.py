"""Lowering of the block-quantized kvfuse ops, per target.

`ort`:  BlockQuantMatMul → com.microsoft.MatMulNBits (B uint8 [N, K/bs, bs·bits/8], uint8 zero
        points, packed like B for 4 bits), BlockQuantGather → com.microsoft.GatherBlockQuantized
        over the same bytes as a 2-D [N, K·bits/8] table (the tied head reads it through a
        Reshape, which onnxruntime folds into a copy that MatMulNBits pre-packs and lets go;
        the file's table stays mapped, its pages read as rows are gathered — B itself shared
        by both ops measured 27 MB more resident for SmolLM2, every page touched by the
        pre-pack). GatherBlockQuantized's zero points are always explicit (CPU and CUDA
        defaults differ); MatMulNBits gets none for symmetric round-to-nearest blocks (its
        default 2^(bits−1): ~20–30% faster on x86), explicit ones otherwise.
`onnx`: BlockQuantMatMul → DequantizeLinear(codes [K, N] uint4/uint8, axis 0, block_size) →
        MatMul (onnxruntime fuses this pair into MatMulNBits itself); a tied head and the
        embedding read one DequantizeLinear of E [V, E] (axis 1): Gemm(transB) and Gather.

Blocks with offsets (GGUF Q4_1, K-quants: w = q·s + m) add the exact offset term

    Σ_k x_k · m_b(k) = Σ_b m_b · (Σ_{k∈b} x_k)      (a [.., K/bs] block sum of x · [K/bs, N])

one block sum per input and block size, shared by every weight that reads that input.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx_ir as ir

from kvfuse.patterns.blocks import pack_nibbles
from kvfuse.patterns.quantize import GATHER_OP, MATMUL_OP, QUANT_TAG
from kvfuse.rewriter.rules import KVFUSE_DOMAIN, REPLACED_TAG, RULE_TAG, add_initializer, take_over

MS_DOMAIN = "com.microsoft"


def lower_ort(model: ir.Model, accuracy_level: int = 4) -> dict[str, int]:
    """MatMulNBits and GatherBlockQuantized at `accuracy_level` (4: int8 activations, the
    only fast setting on AVX-512 VNNI CPUs; 0: fp32 activations, exact)."""
    graph, counts = model.graph, {"lower/matmul_nbits": 0, "lower/gather_block_quantized": 0}
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    packed: dict[int, tuple[ir.Value, ...]] = {}
    sums: dict[tuple[int, int], ir.Value] = {}
    nodes_of_weight, tied = _quantized(graph), _tied(graph)
    for node in nodes_of_weight:
        bits, block = _attrs(node)
        tensors = _ort_tensors(graph, node, _codes(node), bits, block, packed, tied)
        if node.op_type == GATHER_OP:
            table, scales, zero_points = tensors
            new = _ms(
                "GatherBlockQuantized",
                [table, node.inputs[1], scales, zero_points],
                gather_axis=0,
                quantize_axis=1,
                block_size=block,
                bits=bits,
            )
            _swap(graph, node, [new], new)
            counts["lower/gather_block_quantized"] += 1
        else:
            _matmul_nbits(graph, node, tensors, accuracy_level, sums)
            counts["lower/matmul_nbits"] += 1
    return counts


def _matmul_nbits(graph, node: ir.Node, tensors, accuracy_level: int, sums) -> None:
    """One BlockQuantMatMul → MatMulNBits (+ the offset term); a tied table is read through a
    Reshape to B's [N, K/bs, bs·bits/8]."""
    table, scales, zero_points = tensors
    bits, block = _attrs(node)
    n, k = _codes(node).const_value.shape
    nodes, weight = [], table
    if table.const_value.numpy().ndim == 2:
        shape = _const(graph, f"{table.name}.shape", [n, k // block, block * bits // 8])
        nodes.append(ir.node("Reshape", [table, shape]))
        weight = nodes[-1].outputs[0]
    inputs, offsets = [node.inputs[0], weight, scales], _offsets(node)
    if not json.loads(node.metadata_props.get(QUANT_TAG, "{}")).get("symmetric"):
        inputs.append(zero_points)  # symmetric RTN blocks take the kernel's default instead
    matmul = _ms(
        "MatMulNBits",
        inputs,
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )
    nodes.append(matmul)
    nodes += _offset_term(graph, node, matmul.outputs[0], block, sums, offsets)
    _swap(graph, node, nodes, matmul)


def _ort_tensors(graph, node, codes: ir.Value, bits: int, block: int, packed, tied) -> tuple:
    """(table [N, K·bits/8] or B [N, K/bs, bs·bits/8], scales, zero points) of one weight,
    made once however many nodes read it."""
    key = id(codes)
    if key not in packed:
        array = codes.const_value.numpy()
        n, k = array.shape
        data = pack_nibbles(array) if bits == 4 else array
        if not tied[key] and node.op_type == MATMUL_OP:
            data = data.reshape(n, k // block, block * bits // 8)
        zero_points = node.inputs[3].const_value.numpy()
        if bits == 4:
            zero_points = pack_nibbles(zero_points)
        packed[key] = (
            add_initializer(graph, f"{codes.name}.q{bits}", data),
            node.inputs[2],
            add_initializer(graph, f"{codes.name}.zp{bits}", zero_points),
        )
    return packed[key]


def _offsets(node: ir.Node) -> np.ndarray | None:
    """The blocks' offsets m [N, K/bs], if they carry any."""
    if len(node.inputs) < 5 or node.inputs[4] is None:
        return None
    return node.inputs[4].const_value.numpy()


def _offset_term(graph, node: ir.Node, product: ir.Value, block: int, sums, offsets):
    """Nodes adding Σ_b m_b · Σ_{k∈b} x_k to `product` when the blocks carry `offsets`."""
    if offsets is None:
        return []
    x = node.inputs[0]
    nodes = []
    key = (id(x), block)
    if key not in sums:
        kb = offsets.shape[1]
        shape = _const(graph, f"{node.name}.block_shape", [0, 0, kb, block])
        reshape = ir.node("Reshape", [x, shape])
        axes = _const(graph, f"{node.name}.block_axes", [-1])
        total = ir.node("ReduceSum", [reshape.outputs[0], axes], attributes={"keepdims": 0})
        nodes += [reshape, total]
        sums[key] = total.outputs[0]
    table = add_initializer(graph, f"{node.name}.offsets_T", np.ascontiguousarray(offsets.T))
    term = ir.node("MatMul", [sums[key], table])
    add = ir.node("Add", [product, term.outputs[0]])
    return [*nodes, term, add]


def lower_onnx(model: ir.Model) -> dict[str, int]:
    """Standard blocked DequantizeLinear + MatMul / Gemm / Gather (opset ≥ 21)."""
    graph, counts = model.graph, {"lower/dequantize_matmul": 0, "lower/dequantize_gather": 0}
    tables: dict[int, ir.Value] = {}
    sums: dict[tuple[int, int], ir.Value] = {}
    nodes_of_weight, tied_weights = _quantized(graph), _tied(graph)
    for node in nodes_of_weight:
        bits, block = _attrs(node)
        codes = _codes(node)
        tied = tied_weights[id(codes)]
        nodes: list[ir.Node] = []
        if tied or node.op_type == GATHER_OP:
            if id(codes) not in tables:
                nodes.append(_dequantize(graph, node, codes, bits, block, axis=1))
                tables[id(codes)] = nodes[-1].outputs[0]
            weight_NK = tables[id(codes)]
        if node.op_type == GATHER_OP:
            nodes.append(ir.node("Gather", [weight_NK, node.inputs[1]], attributes={"axis": 0}))
            _swap(graph, node, nodes, nodes[-1])
            counts["lower/dequantize_gather"] += 1
            continue
        if tied:
            nodes += _gemm_transposed(graph, node, weight_NK)
        else:
            nodes.append(_dequantize(graph, node, codes, bits, block, axis=0))
            nodes.append(ir.node("MatMul", [node.inputs[0], nodes[-1].outputs[0]]))
        main = nodes[-1]
        nodes += _offset_term(graph, node, main.outputs[0], block, sums, _offsets(node))
        _swap(graph, node, nodes, main)
        counts["lower/dequantize_matmul"] += 1
    return counts


def _dequantize(graph, node, codes: ir.Value, bits: int, block: int, axis: int) -> ir.Node:
    """DequantizeLinear over [N, K] (axis 1) or its transpose [K, N] (axis 0)."""
    dtype = ml_dtypes.uint4 if bits == 4 else np.uint8
    index = 3
    arrays = [codes.const_value.numpy(), node.inputs[2].const_value.numpy()]
    arrays.append(node.inputs[index].const_value.numpy())
    if axis == 0:
        arrays = [np.ascontiguousarray(a.T) for a in arrays]
    q, scales, zero_points = arrays
    suffix = "" if axis == 1 else ".T"
    values = [
        add_initializer(graph, f"{codes.name}.u{bits}{suffix}", q.astype(dtype)),
        add_initializer(graph, f"{codes.name}.s{suffix}", scales),
        add_initializer(graph, f"{codes.name}.z{bits}{suffix}", zero_points.astype(dtype)),
    ]
    attributes = {"axis": axis, "block_size": block}
    return ir.node("DequantizeLinear", values, attributes=attributes)


def _gemm_transposed(graph, node: ir.Node, weight_NK: ir.Value) -> list[ir.Node]:
    """x [.., K] · Wᵀ as Reshape → Gemm(transB) → Reshape (no transposed copy of W)."""
    x, out = node.inputs[0], node.outputs[0]
    width = weight_NK.producer().inputs[0].const_value.shape[1]
    flat = _const(graph, f"{node.name}.rows", [-1, width])
    dims = [d if isinstance(d, int) else -1 for d in out.shape]
    back = _const(graph, f"{node.name}.back", dims)
    rows = ir.node("Reshape", [x, flat])
    gemm = ir.node("Gemm", [rows.outputs[0], weight_NK], attributes={"transB": 1})
    return [rows, gemm, ir.node("Reshape", [gemm.outputs[0], back])]


def _quantized(graph: ir.Graph) -> list[ir.Node]:
    ops = (MATMUL_OP, GATHER_OP)
    return [n for n in graph if n.domain == KVFUSE_DOMAIN and n.op_type in ops]


def _codes(node: ir.Node) -> ir.Value:
    return node.inputs[0] if node.op_type == GATHER_OP else node.inputs[1]


def _tied(graph: ir.Graph) -> dict[int, bool]:
    """id(codes) → whether more than one quantized op reads those codes (embedding + head)."""
    readers: dict[int, int] = {}
    for node in _quantized(graph):
        readers[id(_codes(node))] = readers.get(id(_codes(node)), 0) + 1
    return {key: count > 1 for key, count in readers.items()}


def _attrs(node: ir.Node) -> tuple[int, int]:
    return node.attributes.get_int("bits"), node.attributes.get_int("block_size")


def _ms(op_type: str, inputs, **attributes) -> ir.Node:
    return ir.node(op_type, inputs, domain=MS_DOMAIN, attributes=attributes)


def _const(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    return add_initializer(graph, name, np.array(values, dtype=np.int64))


def _swap(graph: ir.Graph, old: ir.Node, nodes: list[ir.Node], main: ir.Node) -> None:
    """Insert `nodes` (the last one computes `old`'s output) and remove `old`; every new node
    keeps its provenance, `main` (the op that reads the weight) its `kvfuse.quant` record."""
    for new in nodes:
        for tag in (RULE_TAG, REPLACED_TAG):
            if tag in old.metadata_props:
                new.metadata_props[tag] = old.metadata_props[tag]
    main.metadata_props[QUANT_TAG] = old.metadata_props[QUANT_TAG]
    main.name = old.name
    graph.insert_before(old, nodes)
    result, output = nodes[-1].outputs[0], old.outputs[0]
    result.dtype = output.dtype
    if output.shape is not None:
        result.shape = ir.Shape(output.shape)
    take_over(graph, output, result)
    graph.remove(old, safe=True)
