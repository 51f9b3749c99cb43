"""End to end on Optimum exports of tiny Llama-family models: every layer fused, verified."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest

from kvfuse.exporters.reference import ConcatCacheRunner
from kvfuse.models.architectures import (
    ARCHITECTURES,
    POSITION_ARCHITECTURES,
    ROTARY_ARCHITECTURES,
    expected_fusions,
)
from kvfuse.optimize import optimize
from kvfuse.rewriter.verify import FixedCacheRunner

# the rotary-coverage families are proven end to end by test_exporters_parity.py
FUSING = sorted(set(ARCHITECTURES) - set(ROTARY_ARCHITECTURES) - set(POSITION_ARCHITECTURES))
# ops of the mask builder, the RoPE builder and the growing cache: all must be gone
BUILDER_OPS = {"Softmax", "IsNaN", "Cos", "Sin", "Range", "Where", "Neg", "Equal", "LessOrEqual"}


@pytest.fixture(scope="module")
def optimized(tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("optimized")

    cache = {}

    def run(name: str):
        if name not in cache:
            _, export_dir = tiny_export(name)
            (out / name).mkdir()
            cache[name] = optimize(
                export_dir, out / name / f"{name}.onnx", max_context=64, quiet=True
            )
        return cache[name]

    return run


@pytest.mark.parametrize("name", FUSING)
def test_all_layers_fuse_into_retained_state_gqa(optimized, name):
    """Attention fusions == layers, RMSNorm fused, mask/RoPE builders and Concat cache gone."""
    result = optimized(name)
    expected = expected_fusions(name, num_layers=2)
    ops = result.ops_after
    assert result.fused_layers == 2 == len(result.layers)
    assert ops["GroupQueryAttention"] == expected["GroupQueryAttention"]
    norms = ops.get("SkipSimplifiedLayerNormalization", 0) + ops.get(
        "SimplifiedLayerNormalization", 0
    )
    assert norms == expected["rms_norms"]
    assert not BUILDER_OPS & set(ops), BUILDER_OPS & set(ops)
    model = onnx.load(result.output)
    past_readers = {n.op_type for n in model.graph.node for i in n.input if i.startswith("past")}
    assert past_readers == {"GroupQueryAttention"}  # no Concat cache left
    assert result.nodes_after < result.nodes_before * ARCHITECTURES[name]["max_nodes_ratio"]
    assert result.verification.passed and result.verification.tokens_equal
    assert result.verification.max_abs_diff < 1e-4
    assert len(result.verification.steps) == 9  # prefill + 8 decode steps


@pytest.mark.parametrize("name", FUSING)
def test_signature_is_fixed_shape_retained_state(optimized, tiny_export, name):
    """Past inputs and present outputs are the same fixed [B, Hkv, max_context, D] shape."""
    result = optimized(name)
    facts = json.loads((tiny_export(name)[1] / "kvfuse-export.json").read_text())["model"]
    model = onnx.load(result.output)
    # the `ort` target uses onnxruntime's SimplifiedLayerNormalization, which it registers in
    # the default domain; onnx.checker rejects that by design, so the proof is a session load
    ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(model.graph.input) + list(model.graph.output)
    }
    for past, present in result.signature.pairs:
        kv_shape = ["batch_size", facts["num_kv_heads"], 64, facts["head_dim"]]
        assert dims[past] == dims[present] == kv_shape
    assert {"seqlens_k", "total_sequence_length"} <= set(dims)
    assert "attention_mask" not in dims
    # RoPE positions come from seqlens_k; learned positions (GPT-2) still need position_ids
    assert ("position_ids" in dims) == (facts["positions"] == "learned")
    metadata = json.loads({p.key: p.value for p in model.metadata_props}["kvfuse"])
    assert metadata["max_context"] == 64 and len(metadata["kv_pairs"]) == 4
    sidecar = json.loads(result.output.with_name(f"{name}.kvfuse.json").read_text())
    assert sidecar["verification"]["passed"] is True
    assert sidecar["nodes_after"] == result.nodes_after


def test_greedy_tokens_match_original_over_sixteen_steps(optimized, tiny_export):
    """The rewritten Llama generates the original's greedy tokens for 16 steps."""
    import numpy as np

    result = optimized("llama")
    _, export_dir = tiny_export("llama")
    original = ConcatCacheRunner(export_dir / "model.onnx")
    rewritten = FixedCacheRunner(result.output, result.signature.pairs, [1, 2, 64, 16])
    ids = np.array([[5, 17, 33, 2, 101, 7]])
    a, b = original.prefill(ids), rewritten.prefill(ids)
    tokens_a, tokens_b = [], []
    for _ in range(16):
        tokens_a.append(int(a[0, -1].argmax()))
        tokens_b.append(int(b[0, -1].argmax()))
        a = original.step(np.array([[tokens_a[-1]]]))
        b = rewritten.step(np.array([[tokens_b[-1]]]))
    assert tokens_a == tokens_b
    assert len(set(tokens_a)) > 1  # the random model does not just repeat one token


def test_wrong_rewrite_is_caught_and_the_first_diverging_layer_named(
    tiny_export, tmp_path, monkeypatch
):
    """A rule that gets the scale wrong fails verification, names layer 0, writes nothing."""
    from kvfuse.errors import KvfuseError
    from kvfuse.patterns.attention import sdpa

    real_scale = sdpa.attention_scale
    monkeypatch.setattr(sdpa, "attention_scale", lambda *a: 2 * real_scale(*a))
    _, export_dir = tiny_export("llama")
    with pytest.raises(KvfuseError, match="FAILED first at prefill") as failure:
        optimize(export_dir, tmp_path / "bad.onnx", max_context=64, quiet=True)
    assert "first divergence at layer 0: /model/layers.0/" in str(failure.value)
    assert "nothing was written" in str(failure.value)
    assert not (tmp_path / "bad.onnx").exists()


def test_batch_size_becomes_static(tiny_export, tmp_path):
    """--batch-size 2: every batch dim of the I/O is 2; verification runs at batch 2."""
    _, export_dir = tiny_export("qwen2")
    result = optimize(export_dir, tmp_path / "b2.onnx", max_context=32, batch_size=2, quiet=True)
    model = onnx.load(result.output)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert "batch_size" not in dims, (value.name, dims)
        if value.name != "total_sequence_length":
            assert dims[0] == 2, (value.name, dims)
    # the batch plumbing folded away; one Shape reads the new-token count for the logits index
    assert result.ops_after.get("Shape", 0) == 1 and "Concat" not in result.ops_after
    assert result.verification.passed


def test_last_position_logits(tiny_export, tmp_path):
    """--logits last: [B, 1, vocab] holding each row's last position, equal to the full
    logits' row at that position — also for right-padded rows of a batch."""
    import numpy as np

    _, export_dir = tiny_export("mistral")
    full = optimize(export_dir, tmp_path / "all.onnx", max_context=32, logits="all", quiet=True)
    last = optimize(export_dir, tmp_path / "last.onnx", max_context=32, quiet=True)
    assert last.rule_counts["logits/last_position"] == 1
    runners = [FixedCacheRunner(r.output, r.signature.pairs, [2, 2, 32, 16]) for r in (full, last)]
    ids = np.array([[5, 9, 11, 3, 0, 0], [7, 1, 4, 8, 2, 6]])  # row 0 has 4 real tokens
    outputs = []
    for runner in runners:
        runner.cache = {p: np.zeros([2, 2, 32, 16], np.float32) for p, _ in runner.pairs}
        feed = {
            "input_ids": ids,
            "seqlens_k": np.array([3, 5], np.int32),
            "total_sequence_length": np.array(6, np.int32),
            **runner.cache,
        }
        outputs.append(runner.session.run(["logits"], feed)[0])
    every, only_last = outputs
    assert only_last.shape == (2, 1, 256)
    np.testing.assert_allclose(only_last[0, 0], every[0, 3], atol=1e-5)
    np.testing.assert_allclose(only_last[1, 0], every[1, 5], atol=1e-5)


def test_mistral_sliding_window_becomes_gqa_local_window(
    optimized, tiny_export, tmp_path, monkeypatch
):
    """Mistral's window (8, shorter than the 12 + 8 verified tokens) is lowered to GQA's
    local_window_size, read from each layer's own mask (the export's model-wide fact is not
    needed); without a window the same rewrite fails verification."""
    from kvfuse.errors import KvfuseError
    from kvfuse.rewriter import retained_state

    def windows(path) -> set[int]:
        nodes = onnx.load(str(path), load_external_data=False).graph.node
        return {
            onnx.helper.get_attribute_value(a)
            for n in nodes
            if n.op_type == "GroupQueryAttention"
            for a in n.attribute
            if a.name == "local_window_size"
        }

    assert windows(optimized("mistral").output) == {8}
    convert = retained_state.convert_to_retained_state
    monkeypatch.setattr(
        retained_state,
        "convert_to_retained_state",
        lambda m, c, b, lower, sliding_window=None: convert(m, c, b, lower, None),
    )
    _, export_dir = tiny_export("mistral")
    from_masks = optimize(export_dir, tmp_path / "from-masks.onnx", max_context=64, quiet=True)
    assert from_masks.verification.passed and windows(from_masks.output) == {8}
    monkeypatch.setattr(retained_state, "_layer_window", lambda *_args: None)
    with pytest.raises(KvfuseError, match="verification FAILED"):
        optimize(export_dir, tmp_path / "no-window.onnx", max_context=64, quiet=True)
