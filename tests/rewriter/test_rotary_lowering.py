"""RoPE of any width and style, however its tables are built, and Q/K normalised per head:
each fuses, and each layer takes the lowering that can express it (never a refusal)."""

from __future__ import annotations

import json

import onnx
import pytest

from kvfuse.errors import KvfuseError
from kvfuse.optimize import optimize
from tests.rewriter.synthetic import build_lm


def run(tmp_path, model: onnx.ModelProto, **kwargs):
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    return optimize(source, tmp_path / "out.onnx", max_context=32, quiet=True, **kwargs)


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("layout", ["BHSD", "BSHD", "SBHD"])
@pytest.mark.parametrize("rope", ["half", "interleaved"])
def test_rotary_gqa_cannot_rotate_runs_as_its_own_op_before_gqa(tmp_path, layout, rope):
    """4 of 16 dims (GQA's fused rotary takes multiples of 16 only): RoPE becomes two
    com.microsoft.RotaryEmbedding ops over the baked tables, GQA runs without do_rotary, the
    layer's lowering says so and why, and the outputs agree with the original's."""
    result = run(tmp_path, build_lm(layout, rope=rope, rotary_dim=4))
    assert result.rule_counts[f"rotary/{'half' if rope == 'half' else 'interleaved'}"] == 2
    assert result.rule_counts["rotary/partial"] == 2
    model = onnx.load(result.output)
    rotaries = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    assert [n.domain for n in rotaries] == ["com.microsoft"] * 2
    assert all(_attributes(n)["rotary_embedding_dim"] == 4 for n in rotaries)
    assert all(_attributes(n)["interleaved"] == (rope == "interleaved") for n in rotaries)
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    assert _attributes(gqa)["do_rotary"] == 0 and len(gqa.input) == 7  # no cos/sin caches
    (layer,) = result.layers
    assert layer.lowering == "rotary-op+gqa"
    assert "rotates a multiple of 16 dims" in layer.lowering_reason
    assert "this layer rotates 4" in layer.lowering_reason
    assert result.verification.passed, result.verification.summary()
    assert result.verification.max_abs_diff < 1e-5


def test_rotary_gqa_can_rotate_stays_fused_and_the_record_says_so(tmp_path):
    """16 of 32 dims: GQA rotates them itself; kvfuse.json records each layer's lowering."""
    result = run(tmp_path, build_lm("BHSD", rope="interleaved", rotary_dim=16, head_dim=32))
    assert "RotaryEmbedding" not in result.ops_after
    assert result.layers[0].lowering == "gqa-rotary"
    sidecar = json.loads((tmp_path / "out.kvfuse.json").read_text())
    assert sidecar["layers"] == [
        {"layer": "0", "lowering": "gqa-rotary", "reason": result.layers[0].lowering_reason}
    ]
    assert result.verification.passed


@pytest.mark.parametrize("rope", ["half", "interleaved"])
def test_narrow_rotary_on_the_onnx_target_uses_the_standard_op(tmp_path, rope):
    """The standard RotaryEmbedding rotates any width: 4 of 16 dims on `onnx --static`."""
    result = run(
        tmp_path,
        build_lm("BHSD", rope=rope, rotary_dim=4),
        target="onnx",
        static=True,
        prefill_len=16,
    )
    assert result.layers[0].lowering == "rotary-op+attention"
    assert result.verification.passed, result.verification.summary()


@pytest.mark.parametrize("positions", ["table", "shapes"])
@pytest.mark.parametrize("layout", ["BHSD", "SBHD"])
def test_rope_tables_are_baked_whatever_route_the_builder_takes(tmp_path, positions, layout):
    """cos/sin gathered from a cached table by position_ids (GPT-J), or computed from
    positions the builder makes from the past key's and the embeddings' shapes (Gemma's
    Optimum export): baked from the model's own builder, verified."""
    result = run(tmp_path, build_lm(layout, positions=positions))
    assert result.ops_after["GroupQueryAttention"] == 1
    assert not {"Cos", "Sin", "Range"} & set(result.ops_after)
    assert result.verification.passed, result.verification.summary()


def test_rope_builder_reading_token_values_is_refused_with_the_reason(tmp_path):
    """Tables computed from input_ids' values are not positions: refused in words, nothing
    written (never a traceback from onnxruntime)."""
    model = build_lm("BHSD")
    cast = next(n for n in model.graph.node if n.name == "/model/rotary_emb/Cast")
    cast.input[0] = "input_ids"
    with pytest.raises(KvfuseError, match=r"computed from the values of \['input_ids'\]"):
        run(tmp_path, model)
    assert not (tmp_path / "out.onnx").exists()


def test_interleaved_pairs_flattened_by_their_own_shape_fuse(tmp_path):
    """GPT-J flattens the stacked pairs with a target read from their own shape (the Shape read
    used to block the match: "Matched nodes have other uses"); it folds, and interleaved
    partial RoPE fuses."""
    result = run(tmp_path, build_lm("BHSD", rope="interleaved", rotary_dim=8, flatten="shape"))
    assert result.rule_counts["rotary/interleaved"] == 2
    assert result.rule_counts["rotary/partial"] == 2
    assert result.verification.passed, result.verification.summary()


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_per_head_qk_norm_before_rope_fuses(tmp_path, norm, layout):
    """Q and K normalised per head between the head reshape and RoPE (Qwen3): the fused
    attention takes the normalised projections; outputs agree."""
    result = run(tmp_path, build_lm(layout, qk_norm=norm))
    assert result.ops_after["GroupQueryAttention"] == 1
    lowered = "SimplifiedLayerNormalization" if norm == "rms" else "LayerNormalization"
    assert result.ops_after[lowered] == 2  # q and k, per head
    assert result.verification.passed, result.verification.summary()


def test_per_head_norm_after_rope_is_explained_in_words(tmp_path):
    """A per-head norm on the rotated heads is not matched (it does not commute with RoPE):
    the model is refused naming that structure, not the matcher's "OpType mismatch"."""
    from kvfuse.optimize import PartialFusion

    with pytest.raises(PartialFusion) as refusal:
        run(tmp_path, build_lm("BHSD", qk_norm="rms", qk_norm_at="after"))
    (layer,) = refusal.value.result.layers
    assert not layer.fused
    assert layer.near_misses[0].reason.startswith("per-head RMSNorm on K after RoPE is not matched")
    assert "OpType mismatch" not in str(refusal.value)
    assert not (tmp_path / "out.onnx").exists()


def test_optimize_summary_and_explain_say_which_lowering_and_why(tmp_path):
    """`kvfuse optimize --explain`: the summary names each lowering with its layers and reason,
    the per-layer table repeats it."""
    from tests.exporters.test_export_errors import run_cli

    onnx.save(build_lm("BHSD", rotary_dim=4), tmp_path / "in.onnx")
    args = [str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--max-context", "32"]
    done = run_cli("optimize", *args, "--explain")
    assert done.returncode == 0, done.stderr
    assert "lowering rotary-op+gqa: layers 0 (GroupQueryAttention's fused rotary" in " ".join(
        done.stdout.split()
    )
    assert "rotary-op+gqa" in done.stderr  # the --explain table (on stderr)
