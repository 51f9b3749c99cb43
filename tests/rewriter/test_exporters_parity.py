"""Architecture × exporter, end to end: export → optimize → every layer fused → verified →
16 greedy tokens of the optimized model (kvfuse runtime) equal PyTorch's."""

from __future__ import annotations

import pytest

from kvfuse.models.architectures import ARCHITECTURES, expected_fusions, parity_exporters
from kvfuse.models.tiny import TINY_CONFIGS
from kvfuse.optimize import optimize

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119]  # "Hello, w": varied greedy tokens in every model
NEW_TOKENS = 16


def _cases():
    for name in sorted(TINY_CONFIGS):
        if name not in ARCHITECTURES:
            continue  # a tiny config kvfuse does not fuse yet (see the coverage table)
        for exporter in parity_exporters(name):
            yield pytest.param(name, exporter, id=f"{name}-{exporter}")


# onnx --static of one structure family in the default run (ALiBi in the float position
# mask); the coverage command runs every family × exporter × target
STRUCTURE_FAMILIES = [
    pytest.param("mpt", "optimum", id="mpt-optimum"),
    # ALiBi built from the attention mask inside baddbmm's [B·H, S, T] scores (dynamo's
    # export; Optimum's takes the `ort` parity test, the coverage command both targets)
    pytest.param("bloom", "dynamo", id="bloom-dynamo"),
]


@pytest.fixture(scope="module")
def exported(tiny_export, tmp_path_factory):
    """`exported(name, exporter)` → (hf_dir, export_dir); Optimum's from the shared fixture."""
    from kvfuse.exporters.export import export

    root, done = tmp_path_factory.mktemp("dynamo"), {}

    def get(name: str, exporter: str):
        if exporter == "optimum":
            return tiny_export(name)
        if name not in done:  # its own model dir: Optimum may not export it at all
            from kvfuse.models.tiny import build_tiny_model

            hf_dir = build_tiny_model(name, root / f"{name}-hf")
            done[name] = hf_dir, export(hf_dir, root / name, quiet=True, exporter=exporter).out_dir
        return done[name]

    return get


def _pytorch_greedy(hf_dir, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens of the PyTorch model, recomputing the whole sequence at every step."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize(("name", "exporter"), _cases())
def test_export_optimize_verify_and_generate_like_pytorch(exported, tmp_path, name, exporter):
    """Every layer fused into GQA, verification passed, 16 greedy tokens equal PyTorch's."""
    import kvfuse

    hf_dir, export_dir = exported(name, exporter)
    result = optimize(export_dir, tmp_path / f"{name}.onnx", max_context=64, quiet=True)
    assert result.fused_layers == len(result.layers) == 2
    expected = expected_fusions(name, num_layers=2)
    assert result.ops_after["GroupQueryAttention"] == expected["GroupQueryAttention"]
    norms = sum(
        result.ops_after.get(op, 0)
        for op in ("SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization")
    )
    assert norms == expected["rms_norms"]
    # no attention softmax is left (an MoE router's is not attention and stays)
    assert result.ops_after.get("Softmax", 0) == ARCHITECTURES[name].get("softmax_left", 0)
    assert result.verification.passed and result.verification.max_abs_diff < 1e-4
    lowering = ARCHITECTURES[name].get("lowering", {}).get("ort")
    if lowering is not None:  # which lowering each layer took is a per-architecture fact
        expected_lowering = lowering if isinstance(lowering, list) else [lowering] * 2
        assert [layer.lowering for layer in result.layers] == expected_lowering

    config = kvfuse.GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = kvfuse.load(result.output).generate(PROMPT, config).tokens[0]
    expected_tokens = _pytorch_greedy(hf_dir, PROMPT, NEW_TOKENS)
    assert tokens == expected_tokens
    assert len(set(tokens)) > 1  # the random model does not just repeat one token


@pytest.mark.parametrize(("name", "exporter"), STRUCTURE_FAMILIES)
def test_static_onnx_target_generates_like_pytorch(exported, tmp_path, name, exporter):
    """A family added for its structure (MPT: ALiBi) also fuses for `onnx --static`: standard
    Attention over the fixed buffer, verified, 16 greedy tokens of the static pair equal
    PyTorch's."""
    import kvfuse

    hf_dir, export_dir = exported(name, exporter)
    result = optimize(
        export_dir,
        tmp_path / f"{name}.onnx",
        target="onnx",
        static=True,
        prefill_len=16,
        max_context=64,
        quiet=True,
    )
    assert result.fused_layers == len(result.layers) == 2
    assert all(layer.lowering == "attention" for layer in result.layers)
    assert all(
        "ALiBi slopes in the float position mask" in x.lowering_reason for x in result.layers
    )
    assert result.verification.passed and result.verification.max_abs_diff < 1e-4
    config = kvfuse.GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = kvfuse.load(result.output).generate(PROMPT, config).tokens[0]
    assert tokens == _pytorch_greedy(hf_dir, PROMPT, NEW_TOKENS)


def test_dynamo_export_keeps_the_optimum_contract(exported):
    """Same input/output names, dims and metadata facts as the Optimum export of the model."""
    import json

    import onnx

    _, optimum_dir = exported("llama", "optimum")
    _, dynamo_dir = exported("llama", "dynamo")
    signatures = []
    for directory in (optimum_dir, dynamo_dir):
        graph = onnx.load(directory / "model.onnx", load_external_data=False).graph
        signatures.append(
            {
                v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                for v in [*graph.input, *graph.output]
            }
        )
    assert signatures[0] == signatures[1]
    records = [
        json.loads((d / "kvfuse-export.json").read_text()) for d in (optimum_dir, dynamo_dir)
    ]
    assert records[0]["model"] == records[1]["model"]
    assert records[1]["exporter"] == "dynamo" and records[0]["exporter"] == "optimum"
    assert (dynamo_dir / "tokenizer.json").is_file() and (dynamo_dir / "config.json").is_file()


def test_wrong_rewrite_of_a_dynamo_export_names_the_first_diverging_layer(
    exported, tmp_path, monkeypatch
):
    """The dynamo export names nodes by op; the diverging layer is found from module paths."""
    from kvfuse.errors import KvfuseError
    from kvfuse.patterns.attention import sdpa

    real_scale = sdpa.attention_scale
    monkeypatch.setattr(sdpa, "attention_scale", lambda *a: 2 * real_scale(*a))
    _, export_dir = exported("llama", "dynamo")
    with pytest.raises(KvfuseError, match="FAILED first at prefill") as failure:
        optimize(export_dir, tmp_path / "bad.onnx", max_context=64, quiet=True)
    assert "first divergence at layer 0: " in str(failure.value)
    assert not (tmp_path / "bad.onnx").exists()


def test_dynamo_export_with_external_data_optimizes(tiny_export, tmp_path, monkeypatch):
    """Weights written beside the graph (as above 2 GB) are found by the optimizer and the
    verification, after the staged export directory was renamed into place."""
    from kvfuse.exporters import dynamo
    from kvfuse.exporters.export import export

    monkeypatch.setattr(dynamo, "_needs_external_data", lambda model: True)
    hf_dir, _ = tiny_export("qwen2")
    out = export(hf_dir, tmp_path / "export", quiet=True, exporter="dynamo").out_dir
    import onnx

    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    external = [t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert any("embed_tokens" in name for name in external), external
    assert (out / "model.onnx.data").is_file()
    result = optimize(out, tmp_path / "qwen2.onnx", max_context=32, quiet=True)
    assert result.fused_layers == 2 and result.verification.passed
