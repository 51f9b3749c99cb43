"""Optimum exports of tiny random models run in onnxruntime and match PyTorch."""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import torch

from kvfuse.exporters.reference import ConcatCacheRunner
from kvfuse.models.architectures import ARCHITECTURES, POSITION_ARCHITECTURES, parity_exporters
from kvfuse.models.tiny import TINY_CONFIGS

# fp32 through different kernels: logits of these tiny models are O(1), differences O(1e-7)
ATOL = 1e-4
# the families the default run exports with Optimum (the others: dynamo, see their data)
# (the positions families: the exporters' parity test; a pending tiny config: the coverage table)
OPTIMUM = [
    name
    for name in sorted(TINY_CONFIGS)
    if name in ARCHITECTURES
    and name not in POSITION_ARCHITECTURES
    and "optimum" in parity_exporters(name)
]


@pytest.mark.parametrize("name", OPTIMUM)
def test_export_matches_pytorch_prefill_and_decode(tiny_export, name):
    """Prefill of a 2×7 batch and one decode step with past match PyTorch logits."""
    from transformers import AutoModelForCausalLM

    hf_dir, out = tiny_export(name)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = np.random.default_rng(0).integers(3, 250, size=(2, 7))
    next_ids = np.array([[5], [9]])
    with torch.no_grad():
        expected_prefill = model(torch.tensor(ids)).logits.numpy()
        full = torch.tensor(np.concatenate([ids, next_ids], axis=1))
        expected_step = model(full).logits.numpy()[:, -1:]

    runner = ConcatCacheRunner(out / "model.onnx")
    prefill = runner.prefill(ids)
    step = runner.step(next_ids)

    np.testing.assert_allclose(prefill, expected_prefill, atol=ATOL, rtol=0)
    np.testing.assert_allclose(step, expected_step, atol=ATOL, rtol=0)
    assert all(p.shape[2] == 8 for p in runner.past.values()), "past grew to 7 + 1 positions"


@pytest.mark.parametrize("name", OPTIMUM)
def test_export_metadata_records_architecture_facts(tiny_export, name):
    """kvfuse-export.json holds the facts the rewriter needs, consistent with the graph."""
    from kvfuse.models.tiny import tiny_config

    _, out = tiny_export(name)
    record = json.loads((out / "kvfuse-export.json").read_text())
    facts = record["model"]
    config = tiny_config(name)
    assert facts["architecture"] == config.model_type
    assert facts["num_layers"] == 2
    assert facts["num_heads"] == config.num_attention_heads
    # GPT-NeoX's tiny config has head dim 64 (see kvfuse/models/tiny.py); Gemma's is 256
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert facts["head_dim"] == head_dim
    runner = ConcatCacheRunner(out / "model.onnx")
    assert len(runner.past_names) == 2 * facts["num_layers"]
    kv_heads_in_graph = runner.inputs["past_key_values.0.key"].shape[1]
    assert kv_heads_in_graph == facts["cache_kv_heads"]
    assert facts["positions"] == ("learned" if name == "gpt2" else "rope")
    if name == "gpt_neox":
        assert facts["rotary_dim"] == 16  # rotary_pct 0.25 of head_dim 64
    assert record["source"]["kind"] == "hf-directory"
    assert record["versions"]["optimum-onnx"] == importlib.metadata.version("optimum-onnx")


def test_grouped_kv_heads_where_architecture_allows(tiny_export):
    """The tiny Llama-family models really are GQA, Falcon really is multi-query."""
    pairs = [
        ("llama", 2),
        ("mistral", 2),
        ("qwen2", 2),
        ("phi3", 2),
        ("falcon", 1),
        ("falcon_gqa", 2),
    ]
    for name, kv_heads in pairs:
        _, out = tiny_export(name)
        assert json.loads((out / "kvfuse-export.json").read_text())["model"]["num_kv_heads"] == (
            kv_heads
        )
