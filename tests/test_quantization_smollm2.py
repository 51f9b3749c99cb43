"""SmolLM2 quantized two ways: the GGUF's own blocks (exact) and int4 round-to-nearest; both
verified, measured, and still answering the README's question."""

from __future__ import annotations

import onnx
import pytest

from tests.runtime.test_smollm2_runtime import ask_paris

pytestmark = pytest.mark.slow
VOCAB, HIDDEN = 49152, 576


@pytest.mark.parametrize("mode", ["gguf", "int4"])
def test_quantized_model_answers_paris(quantized_smollm2, mode):
    result = quantized_smollm2(mode)
    assert result.verification.passed and result.verification.tokens_equal
    done = ask_paris(result.output)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_gguf_blocks_are_the_files_own(quantized_smollm2):
    """Every weight maps onto the GGUF's Q4_1/Q8_0 blocks (none re-quantized); with fp32
    activations the model is the fp32 export (KLD ≈ 0), at level 4 only int8 activations
    differ; the tied embedding and head are one 8-bit table."""
    quant = quantized_smollm2("gguf").quantization
    assert quant["fallbacks"] == []
    assert {n["source"] for n in quant["nodes"]} == {"Q4_1", "Q8_0"}
    level4, level0 = quant["quality"]
    assert (level4["accuracy_level"], level0["accuracy_level"]) == (4, 0)
    assert level0["kld_mean"] < 1e-6 and level0["same_top1"] == 1.0
    assert level0["kld_mean"] < level4["kld_mean"] < 0.05
    model = onnx.load(str(quantized_smollm2("gguf").output))
    tables = [t for t in model.graph.initializer if VOCAB in t.dims]
    assert [
        (list(t.dims), t.data_type) for t in tables if len(t.dims) == 2 and HIDDEN in t.dims
    ] == [([VOCAB, HIDDEN], onnx.TensorProto.UINT8)]
