"""The real SmolLM2 through `--target cuda` on a CPU machine: verified, all float16, answers."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto

from kvfuse.optimize import optimize

pytestmark = pytest.mark.slow


def test_smollm2_cuda_target_is_verified_float16(smollm2_export, tmp_path):
    """30/30 layers in the ort ops, every weight float16 (nothing out of range in SmolLM2),
    both verifications passed; the float16 model answers the README's question on the CPU."""
    from kvfuse.runtime.generate import GenerationConfig, load

    result = optimize(
        smollm2_export.out_dir, tmp_path / "model.onnx", target="cuda", max_context=256, quiet=True
    )
    assert result.fused_layers == 30 and result.ops_after["GroupQueryAttention"] == 30
    assert result.rule_counts["fuse/packed_siblings"] == 30
    assert result.precision.kept == []
    assert result.rewrite_verification.passed and result.verification.tokens_equal
    model = onnx.load(result.output)
    assert {t.data_type for t in model.graph.initializer if t.dims} <= {
        TensorProto.FLOAT16,
        TensorProto.INT64,
    }
    completion = load(result.output).generate(
        "What is the capital of France?", GenerationConfig(max_new_tokens=12)
    )
    assert "Paris" in completion.texts[0], completion.texts
