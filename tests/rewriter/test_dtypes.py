"""fp16 and bf16 exports (`kvfuse export --dtype`) of three families fuse into the same ops in
their dtype and verify: fp16 (dynamo and Optimum exports) at fp16's tolerance on onnxruntime's
CPU kernels; bf16 (dynamo) widened to fp32 — the CPU has no bf16 kernels — at fp32's."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kvfuse.errors import KvfuseError
from kvfuse.exporters.export import export
from kvfuse.model_files import widened_copies
from kvfuse.models.architectures import expected_fusions
from kvfuse.optimize import optimize
from kvfuse.rewriter.verify import WIDENED, verify
from kvfuse.runtime.generate import GenerationConfig, load
from tests.exporters.test_export_errors import assert_one_line_error, run_cli

# llama (split projections), qwen2 (QKV biases), phi3 (packed QKV): each test takes two of
# them, so every family runs in two of the three precision paths
DYNAMO_HALF, OPTIMUM_HALF, DYNAMO_BF16 = ["llama", "phi3"], ["llama", "qwen2"], ["qwen2", "phi3"]


def _input_types(path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return {v.name: v.type.tensor_type.elem_type for v in model.graph.input}


def _assert_fused(result, name: str) -> None:
    """Every layer a GroupQueryAttention, every RMSNorm a (Skip)SimplifiedLayerNormalization."""
    ops = result.ops_after
    assert result.fused_layers == 2 and ops["GroupQueryAttention"] == 2
    norms = ops.get("SkipSimplifiedLayerNormalization", 0)
    norms += ops.get("SimplifiedLayerNormalization", 0)
    assert norms == expected_fusions(name, num_layers=2)["rms_norms"]
    assert "Softmax" not in ops and "ReduceMean" not in ops


def _assert_generates_in_float16(path) -> None:
    assert _input_types(path)["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    generator = load(path)
    completion = generator.generate("hello", GenerationConfig(max_new_tokens=4, chat=False))
    assert len(completion.tokens[0]) == 4
    assert generator.session(1).arena.dtype == "float16"


@pytest.mark.parametrize("name", DYNAMO_HALF)
def test_float16_export_fuses_and_verifies_in_float16(dtype_export, tmp_path, name):
    """A dynamo fp16 export: every layer becomes GroupQueryAttention over fp16 buffers, the
    norms (fp32 inside, casts around) become (Skip)SimplifiedLayerNormalization, verification
    passes at fp16's tolerance, and the runtime generates from fp16 KV buffers."""
    source = dtype_export(name, "dynamo", "float16")
    record = json.loads((source / "kvfuse-export.json").read_text())
    assert record["dtype"] == "float16"
    result = optimize(source, tmp_path / "m.onnx", max_context=64, quiet=True)
    _assert_fused(result, name)
    check = result.verification
    assert check.passed and check.tokens_equal and (check.atol, check.rtol) == (1e-2, 1e-2)
    assert check.arithmetic is None  # run as written
    _assert_generates_in_float16(tmp_path / "m.onnx")


@pytest.mark.parametrize("name", OPTIMUM_HALF)
def test_optimum_float16_export_fuses_through_its_float32_scores(dtype_export, tmp_path, name):
    """Optimum's fp16 export leaves fp16 after Q·Kᵀ (mask, softmax and P·V in fp32, V cast up)
    and keeps the residual stream in fp32 after the first attention: the layers still fuse
    into fp16 GroupQueryAttention (its output cast back to fp32), the norms into fused norms,
    and it verifies at fp16's tolerance and generates from fp16 KV buffers."""
    source = dtype_export(name, "optimum", "float16")
    original = onnx.load(str(source / "model.onnx"))
    score_casts = [
        n
        for n in original.graph.node
        if n.op_type == "Cast" and "self_attn" in n.name and n.attribute[0].i == 1
    ]
    assert score_casts  # the export's structure this test is about
    result = optimize(source, tmp_path / "m.onnx", max_context=64, quiet=True)
    _assert_fused(result, name)
    check = result.verification
    assert check.passed and check.tokens_equal and (check.atol, check.rtol) == (1e-2, 1e-2)
    _assert_generates_in_float16(tmp_path / "m.onnx")


@pytest.mark.parametrize("name", DYNAMO_BF16)
def test_bfloat16_export_fuses_and_verifies_widened_to_float32(dtype_export, tmp_path, name):
    """A dynamo bf16 export fuses into bf16 GroupQueryAttention / fused norms (every weight,
    rotary table and KV buffer stays bf16) and is verified by running both graphs widened to
    fp32, at fp32's tolerance; the sidecar and the summary say so."""
    source = dtype_export(name, "dynamo", "bfloat16")
    result = optimize(source, tmp_path / "m.onnx", max_context=64, quiet=True)
    _assert_fused(result, name)
    check = result.verification
    assert check.passed and check.tokens_equal and (check.atol, check.rtol) == (1e-4, 1e-4)
    assert check.arithmetic == WIDENED and "float32 arithmetic" in check.summary()
    written = onnx.load(str(tmp_path / "m.onnx"))
    floats = {t.data_type for t in written.graph.initializer if t.data_type != 7}
    floats.discard(onnx.TensorProto.INT32)
    assert floats == {onnx.TensorProto.BFLOAT16}
    types = _input_types(tmp_path / "m.onnx")
    assert types["past_key_values.0.key"] == onnx.TensorProto.BFLOAT16
    sidecar = json.loads((tmp_path / "m.kvfuse.json").read_text())
    assert sidecar["dtype"] == "bfloat16" and sidecar["logits_dtype"] == "bfloat16"
    assert sidecar["verification"]["arithmetic"] == WIDENED
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".kvfuse-widened")]


def test_widened_check_fails_on_a_changed_bfloat16_weight(dtype_export, tmp_path):
    """The widened comparison is no formality: the bf16 rewrite with one projection's bf16
    weight scaled by 1.1 fails it."""
    source = dtype_export("llama", "dynamo", "bfloat16")
    result = optimize(source, tmp_path / "m.onnx", max_context=64, quiet=True)
    model = ir.load(tmp_path / "m.onnx")
    weight = next(
        v
        for v in model.graph.initializers.values()
        if v.dtype == ir.DataType.BFLOAT16
        and len(v.shape) == 2
        and any(node.op_type == "MatMul" for node, _ in v.uses())
    )
    scaled = (weight.const_value.numpy().astype(np.float32) * 1.1).astype(ml_dtypes.bfloat16)
    weight.const_value = ir.Tensor(scaled, name=weight.name)
    ir.save(model, tmp_path / "changed.onnx")
    signature = result.signature
    kv_shape = [1, signature.kv_heads, 64, signature.head_dim]
    with widened_copies(source / "model.onnx", tmp_path / "changed.onnx", tmp_path) as pair:
        check = verify(*pair, signature.pairs, kv_shape)
    assert not check.passed and check.max_abs_diff > check.atol


def test_bfloat16_refusals_are_one_line(dtype_export, tmp_path):
    """Optimum's exporter cannot trace bf16 (refused up front); `kvfuse run` of an optimized
    bf16 model on this CPU says in one line why not and where it runs, exit 1."""
    source = dtype_export("llama", "dynamo", "bfloat16")
    with pytest.raises(KvfuseError, match="--exporter dynamo --dtype bfloat16"):
        export(dtype_export.hf_dir("llama"), tmp_path / "optimum", dtype="bfloat16")
    assert not (tmp_path / "optimum").exists()
    optimize(source, tmp_path / "m.onnx", max_context=64, quiet=True, verify_numerics=False)
    done = run_cli("run", str(tmp_path / "m.onnx"), "--prompt", "hi", "--max-new-tokens", "2")
    assert_one_line_error(done, "bfloat16", "CUDA provider")
