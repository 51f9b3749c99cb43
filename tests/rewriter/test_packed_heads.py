"""Golden tests of the packed-parts passes on tiny fused projections, run in onnxruntime (its
own optimisations off) before and after: GPT-NeoX's per-head interleaved QKV, Falcon's
[.., Hkv, G + 2, D] grid, and the shapes TorchScript's `expand` guard hides."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxscript import optimizer

from kvfuse.rewriter import packed_heads, shapes

RNG = np.random.default_rng(0)
X = RNG.normal(size=(2, 3, 8)).astype(np.float32)


def build(nodes, outputs, initializers) -> onnx.ModelProto:
    """A graph of `nodes` whose `outputs` are read through a Neg (a part is never itself a
    graph output in an export: attention reads it; an Identity would be folded away)."""
    nodes = nodes + [helper.make_node("Neg", [name], [f"{name}_out"]) for name in outputs]
    outputs = [f"{name}_out" for name in outputs]
    graph = helper.make_graph(
        nodes,
        "packed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [onnx.numpy_helper.from_array(np.asarray(a), name) for name, a in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def run(model: onnx.ModelProto) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": X})


def rewrite(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Shape inference, then the passes as the clean-up runs them."""
    model = ir.from_proto(proto)
    optimizer.fold_constants(model)
    shapes.resolve_shapes(model)
    parts = packed_heads.split_packed_parts(model.graph)
    optimizer.remove_unused_nodes(model)
    gathers = packed_heads.fold_column_gathers(model.graph)
    optimizer.remove_unused_nodes(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    return out, {"parts": parts, "gathers": gathers}


def ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def neox_qkv(extra_output: bool = False) -> onnx.ModelProto:
    """GPT-NeoX, 2 heads of 4: qkv.view(B, S, H, 3·D).transpose(1, 2), then q, k, v = thirds
    of the last axis (each head's q, k and v side by side in the projection)."""
    ints = {
        "w": RNG.normal(size=(8, 24)).astype(np.float32),
        "b": RNG.normal(size=24).astype(np.float32),
        "grid": np.array([0, 0, 2, 12], np.int64),
        "axis": np.array([-1], np.int64),
        **{f"at{i}": np.array([4 * i], np.int64) for i in range(4)},
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["b", "xw"], ["qkv"]),
        helper.make_node("Reshape", ["qkv", "grid"], ["heads"]),
        helper.make_node("Transpose", ["heads"], ["heads_t"], perm=[0, 2, 1, 3]),
    ] + [
        helper.make_node("Slice", ["heads_t", f"at{i}", f"at{i + 1}", "axis"], [name])
        for i, name in enumerate(["q", "k", "v"])
    ]
    outputs = ["q", "k", "v"] + (["qkv"] if extra_output else [])
    return build(nodes, outputs, ints)


def test_neox_per_head_interleaved_parts_become_contiguous_permuted_weights():
    """Three parts rewritten; the column Gather folds into the weight and bias (no Gather left);
    each part is Slice → Reshape → Transpose; outputs equal."""
    before = neox_qkv()
    after, counts = rewrite(before)
    assert counts == {"parts": 3, "gathers": 1}
    histogram = ops(after)
    assert "Gather" not in histogram
    assert histogram["Slice"] == 3 and histogram["Reshape"] == 3 and histogram["Transpose"] == 3
    matmul = next(node for node in after.graph.node if node.op_type == "MatMul")
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in after.graph.initializer}
    # q of head 0, q of head 1, then k of both heads, then v: column h·3D + part·D + j
    columns = [h * 12 + part * 4 + j for part in range(3) for h in range(2) for j in range(4)]
    original = {i.name: onnx.numpy_helper.to_array(i) for i in before.graph.initializer}
    np.testing.assert_array_equal(weights[matmul.input[1]], original["w"][:, columns])
    for a, b in zip(run(before), run(after), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_a_split_of_the_grid_is_read_as_three_parts():
    """GPT-NeoX's dynamo export splits the [B, H, S, 3·D] view with one Split (equal thirds):
    the same three parts, the same permuted weights, the same outputs."""
    sliced = neox_qkv()
    graph = sliced.graph
    slices = [n for n in graph.node if n.op_type == "Slice"]
    split = helper.make_node("Split", ["heads_t"], ["q", "k", "v"], axis=3, num_outputs=3)
    for node in slices:
        graph.node.remove(node)
    graph.node.insert(4, split)
    before = run(sliced)
    after, counts = rewrite(sliced)
    assert counts == {"parts": 3, "gathers": 1}
    assert "Split" not in ops(after) and "Gather" not in ops(after)
    for a, b in zip(before, run(after), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_a_projection_read_elsewhere_keeps_its_weights_and_a_gather():
    """The fused projection is also a graph output: its weight cannot be permuted, so the
    Gather stays (the parts are still rewritten) and the results do not change."""
    before = neox_qkv(extra_output=True)
    after, counts = rewrite(before)
    assert counts == {"parts": 3, "gathers": 0}
    assert ops(after)["Gather"] == 1
    for a, b in zip(run(before), run(after), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_two_slices_of_one_head_tensor_are_not_a_fused_projection():
    """Partial RoPE's x[..., :R] and x[..., R:] of one head tensor: nothing is rewritten."""
    ints = {
        "w": RNG.normal(size=(8, 8)).astype(np.float32),
        "grid": np.array([0, 0, 2, 4], np.int64),
        "axis": np.array([-1], np.int64),
        "zero": np.array([0], np.int64),
        "two": np.array([2], np.int64),
        "end": np.array([4], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["proj"]),
        helper.make_node("Reshape", ["proj", "grid"], ["heads"]),
        helper.make_node("Slice", ["heads", "zero", "two", "axis"], ["rotated"]),
        helper.make_node("Slice", ["heads", "two", "end", "axis"], ["passed"]),
    ]
    before = build(nodes, ["rotated", "passed"], ints)
    after, counts = rewrite(before)
    assert counts == {"parts": 0, "gathers": 0}
    assert ops(after) == ops(before)


def falcon_gqa_qkv() -> onnx.ModelProto:
    """Falcon (new_decoder_architecture), Hkv 2, G 2, D 4: the projection viewed as
    [B, S, Hkv, G + 2, D]; q = [..., :-2, :] reshaped to [B, S, 4, 4], k and v = Gathers of
    [-2] and [-1] keeping a size-1 axis."""
    ints = {
        "w": RNG.normal(size=(8, 32)).astype(np.float32),
        "grid": np.array([0, 0, 2, 4, 4], np.int64),
        "q_heads": np.array([0, 0, 4, 4], np.int64),
        "zero": np.array([0], np.int64),
        "minus_two": np.array([-2], np.int64),
        "minus_one": np.array([-1], np.int64),
        "axis": np.array([3], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["qkv"]),
        helper.make_node("Reshape", ["qkv", "grid"], ["grid5"]),
        helper.make_node("Slice", ["grid5", "zero", "minus_two", "axis"], ["q5"]),
        helper.make_node("Reshape", ["q5", "q_heads"], ["q"]),
        helper.make_node("Gather", ["grid5", "minus_two"], ["k"], axis=3),
        helper.make_node("Gather", ["grid5", "minus_one"], ["v"], axis=3),
    ]
    return build(nodes, ["q", "k", "v"], ints)


def test_falcon_grid_parts_become_blocks_with_the_kv_unit_axis_unsqueezed():
    """Three parts; k and v are [B, S, Hkv, D] blocks unsqueezed (the form of a kv head
    repeat); the query is reshaped once, straight from its block; outputs equal."""
    before = falcon_gqa_qkv()
    after, counts = rewrite(before)
    assert counts == {"parts": 3, "gathers": 1}
    histogram = ops(after)
    assert histogram["Unsqueeze"] == 2 and "Gather" not in histogram
    producers = {out: node for node in after.graph.node for out in node.output}
    query = producers[producers["q_out"].input[0]]
    assert query.op_type == "Reshape" and producers[query.input[0]].op_type == "Slice"
    for a, b in zip(run(before), run(after), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_expand_behind_torchscripts_minus_one_guard_gets_its_shape():
    """`x.expand(B, S, 2, 2, 4)` exported as Expand(x, Where(Equal(sizes, -1), 1, sizes)):
    the output shape is followed through the guard, symbolic batch and sequence included."""
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    guard (float[B, S, 2, 1, 4] x) => (float[?, ?, ?, ?, ?] y) {
        lead = Shape<start = 0, end = 2>(x)
        rest = Constant<value = int64[3] {2, 2, 4}>()
        sizes = Concat<axis = 0>(lead, rest)
        count = Constant<value = int64[1] {5}>()
        ones = ConstantOfShape<value = int64[1] {1}>(count)
        minus = Constant<value = int64 {-1}>()
        unset = Mul(ones, minus)
        is_unset = Equal(sizes, unset)
        target = Where(is_unset, ones, sizes)
        y = Expand(x, target)
    }
    """
    model = ir.from_proto(onnx.parser.parse_model(text))
    optimizer.fold_constants(model)  # as the clean-up does first
    shapes.resolve_shapes(model)
    y = model.graph.outputs[0]
    assert [shapes._dim(d) for d in y.shape] == ["B", "S", 2, 2, 4]
