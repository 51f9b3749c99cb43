"""onnxruntime-genai's own C++ loop runs kvfuse's models (`optimize --genai-config`) to the
greedy tokens kvfuse's runtime gives."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import onnxruntime_genai as og  # the `genai` extra (part of `test`)
import pytest

import kvfuse
from kvfuse.genai import CONFIG_FILE, add_genai_files


def genai_greedy(directory, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai's generator over the model in `directory`."""
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done() and len(tokens) < new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def kvfuse_greedy(model, prompt, new_tokens: int) -> list[int]:
    config = kvfuse.GenerationConfig(max_new_tokens=new_tokens, chat=False, ignore_eos=True)
    return kvfuse.load(model).generate(prompt, config).tokens[0]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_genai_runs_tiny_models_to_kvfuse_tokens(tiny_export, tmp_path, name):
    """Rotary (llama: positions inside GroupQueryAttention) and learned positions (gpt2:
    genai feeds position_ids): 12 greedy tokens equal, the valid lengths coming from genai's
    attention mask."""
    _, export_dir = tiny_export(name)
    output = tmp_path / "model.onnx"
    kvfuse.optimize(export_dir, output, max_context=64, quiet=True, genai_config=True)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "decoder" and config["search"]["max_length"] == 64
    assert config["search"]["past_present_share_buffer"] is True
    graph = onnx.load(tmp_path / decoder["filename"], load_external_data=False)
    inputs = {i.name for i in graph.graph.input}
    assert "attention_mask" in inputs and not inputs & {"seqlens_k", "total_sequence_length"}
    assert ("position_ids" in decoder["inputs"]) == (name == "gpt2") == ("position_ids" in inputs)
    prompt = [(5 + 29 * i) % 256 for i in range(9)]
    assert genai_greedy(tmp_path, prompt, 12) == kvfuse_greedy(output, prompt, 12)


def test_genai_config_needs_the_ort_target(tiny_export, tmp_path):
    """Asked of the standard-ops target, --genai-config is refused in one line, nothing
    written."""
    _, export_dir = tiny_export("llama")
    out = tmp_path / "m.onnx"
    command = ["optimize", str(export_dir), str(out), "--target", "onnx", "--genai-config"]
    done = subprocess.run(
        [sys.executable, "-m", "kvfuse", *command], capture_output=True, text=True
    )
    assert done.returncode == 1 and "--genai-config needs --target ort" in done.stderr
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_genai_runs_optimized_smollm2_to_kvfuse_run_tokens(optimized_smollm2, tmp_path):
    """kvfuse's optimized SmolLM2 under onnxruntime-genai: the chat prompt kvfuse run encodes
    gives the same greedy tokens (answer and eos) in genai's loop as in kvfuse's."""
    directory = add_genai_files(optimized_smollm2.output, tmp_path / "genai")
    generator = kvfuse.load(optimized_smollm2.output)
    question = "What is the capital of France?"
    prompt = generator.text.encode(question, chat=True)
    ours = generator.generate(question, kvfuse.GenerationConfig(max_new_tokens=24))
    theirs = genai_greedy(directory, prompt, 24)
    eos = ours.finish_reasons[0] == "eos"
    assert theirs[: len(ours.tokens[0])] == ours.tokens[0] and len(ours.tokens[0]) >= 5
    stopped = theirs[len(ours.tokens[0]) :][:1]
    assert stopped[0] in generator.text.eos_ids if eos else stopped == []
    assert "Paris" in generator.text.decode(theirs)


def test_genai_config_refuses_layers_of_different_cache_shapes(layerwise_optimized):
    """genai's config takes one KV-head count and head dim: a model whose layers differ is
    refused in one line, nothing written beside it."""
    from kvfuse.errors import KvfuseError

    output = layerwise_optimized("llama_layer_kv_heads", "ort").output
    before = sorted(output.parent.iterdir())
    with pytest.raises(KvfuseError, match="layers differ in KV heads or head dim"):
        add_genai_files(output)
    assert sorted(output.parent.iterdir()) == before
