"""Module substitution before a dynamo export: an MoE block's data-dependent expert loop is
replaced by an all-experts forward with the same outputs, checked against the original."""

from __future__ import annotations

import pytest
import torch

from kvfuse.errors import KvfuseError
from kvfuse.exporters import dynamo
from kvfuse.exporters.metadata import ModelFacts
from kvfuse.models import substitutions
from kvfuse.models.tiny import tiny_config


@pytest.fixture
def mixtral():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("mixtral")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    facts = ModelFacts.from_config(config)
    wrapper = dynamo.FlatCacheLM(model, facts.num_layers).eval()
    return wrapper, dynamo._example_inputs(model, facts)


def test_moe_blocks_are_substituted_with_the_same_outputs(mixtral):
    """Both MoE blocks swapped, logits and presents within 1e-4 of the expert loop's, and the
    record says what was replaced, how often and why."""
    wrapper, arguments = mixtral
    with torch.no_grad():
        before = wrapper(*arguments)
    record = dynamo._substitute_and_check(wrapper, arguments)
    assert [(r["module"], r["count"]) for r in record] == [("MixtralSparseMoeBlock", 2)]
    assert record[0]["replacement"].endswith("dense_top_k_moe")
    assert record[0]["max_abs_diff"] <= dynamo.SUBSTITUTION_TOLERANCE
    with torch.no_grad():
        after = wrapper(*arguments)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_substitution_that_changes_outputs_is_refused(mixtral, monkeypatch):
    """A stand-in whose outputs differ from the original's stops the export with the size of
    the difference."""
    wrapper, arguments = mixtral

    def wrong(self, hidden_states):
        output, logits = substitutions.dense_top_k_moe(self, hidden_states)
        return output + 1.0, logits

    entry = substitutions.Substitution("MixtralSparseMoeBlock", wrong, "test")
    monkeypatch.setattr(substitutions, "SUBSTITUTIONS", [entry])
    with pytest.raises(KvfuseError, match="substituting MixtralSparseMoeBlock changed the model"):
        dynamo._substitute_and_check(wrapper, arguments)


def test_models_without_such_modules_are_left_alone(tiny_export):
    """No module matches: nothing is substituted, nothing recorded."""
    from transformers import AutoModelForCausalLM

    hf_dir, _ = tiny_export("llama")
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert substitutions.substitute_modules(model) == []
