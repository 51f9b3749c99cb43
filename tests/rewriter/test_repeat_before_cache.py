"""KV heads repeated to every query head before the cache (Falcon's new_decoder_architecture):
the fused op caches the kv heads only, and still computes what the original computes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from kvfuse.optimize import PartialFusion, optimize
from tests.rewriter.synthetic import build_lm


def run(tmp_path, model: onnx.ModelProto):
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    return optimize(source, tmp_path / "out.onnx", max_context=32, quiet=True)


@pytest.mark.parametrize("layout", ["BHSD", "BSHD", "SBHD"])
def test_heads_repeated_before_the_cache_become_gqa_over_kv_heads(tmp_path, layout):
    """The export caches 4 heads made of 2; GQA caches the 2 and verification passes."""
    model = build_lm(layout, kv_heads=2, repeat="before_cache")
    past = next(i for i in model.graph.input if i.name == "past_key_values.0.key")
    head_axis = layout.index("H")
    assert past.type.tensor_type.shape.dim[head_axis].dim_value == 4  # the export's cache
    result = run(tmp_path, model)
    assert result.rule_counts["attention/repeat_kv"] == 2  # k and v, before the cache
    assert result.rule_counts[f"attention/cached_{layout.lower()}_rope"] == 1
    assert result.ops_after["GroupQueryAttention"] == 1
    assert not {"Softmax", "Concat", "Tile"} & set(result.ops_after)
    output = onnx.load(result.output)
    gqa = next(n for n in output.graph.node if n.op_type == "GroupQueryAttention")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert (attributes["num_heads"], attributes["kv_num_heads"]) == (4, 2)
    for value in output.graph.input:
        if value.name.startswith("past_key_values"):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == ["batch_size", 2, 32, 16]
    assert result.signature.kv_heads == 2
    assert result.verification.passed, result.verification.summary()
    assert result.verification.max_abs_diff < 1e-5


def test_keys_repeated_before_and_values_after_the_cache_fuse_too(tmp_path):
    """Where each of K and V is repeated does not matter: both caches become kv heads."""
    result = run(tmp_path, build_lm("BHSD", kv_heads=2, repeat="mixed"))
    assert result.signature.kv_heads == 2
    assert result.verification.passed, result.verification.summary()


def test_a_key_that_reaches_attention_as_a_five_d_view_is_refused(tmp_path):
    """K and V viewed as [B, S, Hkv, 1, D] by a Reshape (no Unsqueeze) and expanded: no head
    repeat is recognised, and the cached rule must not take the 5-D view for a projection."""
    model = build_lm("BHSD", kv_heads=2, repeat="before_cache")
    producers = {out: node for node in model.graph.node for out in node.output}
    view = onnx.numpy_helper.from_array(np.array([0, 0, 2, 1, 16], np.int64), "view_5d")
    model.graph.initializer.append(view)
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.input else None
        if node.op_type == "Unsqueeze" and source is not None and source.op_type == "Reshape":
            node.op_type, node.input[1] = "Reshape", "view_5d"
    with pytest.raises(PartialFusion) as failure:
        run(tmp_path, model)
    reasons = [m.reason for m in failure.value.result.layers[0].near_misses]
    assert any("projections are not [B, S, static width]" in r for r in reasons), reasons
