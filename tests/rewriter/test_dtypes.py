"""fp16 and bf16 exports (`kvfuse export --dtype`): fp16 fuses into the same ops in fp16 and
verifies at fp16's tolerance; bf16 exports, and is refused by optimize with the reason."""

from __future__ import annotations

import json

import onnx
import pytest

from kvfuse.errors import KvfuseError
from kvfuse.exporters.export import export
from kvfuse.models.architectures import expected_fusions
from kvfuse.models.tiny import build_tiny_model
from kvfuse.optimize import optimize
from kvfuse.runtime.generate import GenerationConfig, load

FAMILIES = ["llama", "qwen2", "phi3"]


def _input_types(path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return {v.name: v.type.tensor_type.elem_type for v in model.graph.input}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype-hf")
    return {name: build_tiny_model(name, root / name) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_float16_export_fuses_and_verifies_in_float16(hf_dirs, tmp_path, name):
    """A dynamo fp16 export: every layer becomes GroupQueryAttention over fp16 buffers, the
    norms (fp32 inside, casts around) become (Skip)SimplifiedLayerNormalization, verification
    passes at fp16's tolerance, and the runtime generates from fp16 KV buffers."""
    exported = export(hf_dirs[name], tmp_path / "onnx", exporter="dynamo", dtype="float16")
    record = json.loads((tmp_path / "onnx" / "kvfuse-export.json").read_text())
    assert record["dtype"] == "float16"
    assert _input_types(exported.onnx_path)["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    result = optimize(tmp_path / "onnx", tmp_path / "m.onnx", max_context=64, quiet=True)
    expected = expected_fusions(name, num_layers=2)
    ops = result.ops_after
    assert result.fused_layers == 2 and ops["GroupQueryAttention"] == 2
    norms = ops.get("SkipSimplifiedLayerNormalization", 0)
    norms += ops.get("SimplifiedLayerNormalization", 0)
    assert norms == expected["rms_norms"]
    types = _input_types(tmp_path / "m.onnx")
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    check = result.verification
    assert check.passed and check.tokens_equal and (check.atol, check.rtol) == (1e-2, 1e-2)
    generator = load(tmp_path / "m.onnx")
    completion = generator.generate("hello", GenerationConfig(max_new_tokens=4, chat=False))
    assert len(completion.tokens[0]) == 4
    assert generator.session(1).arena.dtype == "float16"


def test_bfloat16_exports_and_optimize_says_why_it_cannot_verify(hf_dirs, tmp_path):
    """The dynamo exporter writes bf16 weights and cache; Optimum's exporter is refused (its
    trace fails); optimize refuses in one line: no bf16 CPU kernels to verify or run it."""
    with pytest.raises(KvfuseError, match="--exporter dynamo --dtype bfloat16"):
        export(hf_dirs["llama"], tmp_path / "optimum", dtype="bfloat16")
    exported = export(hf_dirs["llama"], tmp_path / "onnx", exporter="dynamo", dtype="bfloat16")
    types = _input_types(exported.onnx_path)
    assert types["past_key_values.0.key"] == onnx.TensorProto.BFLOAT16
    with pytest.raises(KvfuseError, match="no CPU kernels for bfloat16"):
        optimize(tmp_path / "onnx", tmp_path / "m.onnx", quiet=True)
    assert not (tmp_path / "m.onnx").exists()
