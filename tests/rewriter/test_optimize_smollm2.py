"""The real model: SmolLM2-135M's Optimum export → verified retained-state GQA, on real text."""

from __future__ import annotations

import numpy as np
import pytest

from kvfuse.exporters.reference import ConcatCacheRunner
from kvfuse.rewriter.verify import FixedCacheRunner

pytestmark = pytest.mark.slow


def test_all_thirty_layers_fuse_with_far_fewer_nodes(optimized_smollm2):
    """30/30 attention layers fused, 61 RMSNorms lowered, ~7,400 nodes down to a few hundred."""
    result = optimized_smollm2
    assert result.fused_layers == 30 == len(result.layers)
    assert result.ops_after["GroupQueryAttention"] == 30
    norms = result.ops_after["SkipSimplifiedLayerNormalization"] + result.ops_after.get(
        "SimplifiedLayerNormalization", 0
    )
    assert norms == 61
    assert result.nodes_before > 7000 and result.nodes_after < 500
    assert result.verification.passed, result.verification.summary()
    print(
        f"SmolLM2 nodes {result.nodes_before} -> {result.nodes_after}; "
        f"{result.verification.summary()}"
    )


def test_greedy_text_matches_the_original(optimized_smollm2, smollm2_export):
    """On real text, 24 greedy tokens of the optimized model equal the original's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_export.out_dir)
    ids = np.array([tokenizer("The capital of France is")["input_ids"]])
    signature = optimized_smollm2.signature
    original = ConcatCacheRunner(smollm2_export.onnx_path)
    rewritten = FixedCacheRunner(optimized_smollm2.output, signature.pairs, [1, 3, 256, 64])
    a, b = original.prefill(ids), rewritten.prefill(ids)
    tokens_a, tokens_b = [], []
    for _ in range(24):
        tokens_a.append(int(a[0, -1].argmax()))
        tokens_b.append(int(b[0, -1].argmax()))
        np.testing.assert_allclose(b[0, -1], a[0, -1], atol=1e-3, rtol=1e-3)
        a = original.step(np.array([[tokens_a[-1]]]))
        b = rewritten.step(np.array([[tokens_b[-1]]]))
    assert tokens_a == tokens_b
    assert "Paris" in tokenizer.decode(tokens_b)
