"""Target `cuda` on a CPU machine: the float16 lowering checked structurally (ops, dtypes, the
checker) and numerically through onnxruntime's CPU kernels, which run every op of it in float16
(GroupQueryAttention, (Skip)SimplifiedLayerNormalization, MatMul, FusedMatMul, ArgMax)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, defs

import kvfuse
from kvfuse.errors import KvfuseError
from kvfuse.optimize import optimize
from kvfuse.report.diff import build_report
from kvfuse.report.markdown import to_markdown
from kvfuse.rewriter.verify import HALF_TOLERANCE, verify

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
SCHEMA = "report/schema.json"


@pytest.fixture(scope="module")
def cuda_llama(tiny_export, tmp_path_factory):
    _, export_dir = tiny_export("llama")
    out = tmp_path_factory.mktemp("cuda") / "llama.onnx"
    return optimize(export_dir, out, target="cuda", max_context=64, quiet=True)


@pytest.fixture(scope="module")
def overflowing_llama(tmp_path_factory):
    """A tiny Llama whose layer-0 MLP output is scaled past float16's range (±65,504): the
    residual stream after it overflows in float16, the norms bring it back."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvfuse.exporters.export import export
    from kvfuse.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("overflow")
    hf_dir = build_tiny_model("llama", root / "hf")
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    with torch.no_grad():
        mlp = model.model.layers[0].mlp  # weights stay in float16's range, their product not
        mlp.up_proj.weight.mul_(3e3)
        mlp.down_proj.weight.mul_(3e4)
    model.save_pretrained(hf_dir)
    export(hf_dir, root / "onnx", quiet=True)
    return root / "onnx"


def test_cuda_lowering_is_the_ort_graph_in_float16(cuda_llama):
    """GQA with shared buffers, skip norms, packed QKV and gate/up, last-position logits, the greedy
    token; KV in float16, logits float32; every float weight in float16 (nothing out of range
    here); no host-side shape op (a CUDA graph takes none); the checker accepts it."""
    model = onnx.load(cuda_llama.output)
    ops = cuda_llama.ops_after
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] >= 3
    assert cuda_llama.rule_counts["lower/packed_qkv"] == 2
    assert cuda_llama.rule_counts["fuse/packed_siblings"] == 2  # each MLP's gate and up
    assert cuda_llama.rule_counts["logits/last_position"] == 1
    assert "Shape" not in ops and "Size" not in ops
    types = {
        v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]
    }
    assert types["past_key_values.0.key"] == types["present.0.key"] == HALF
    assert types["logits"] == FLOAT and types["next_token"] == TensorProto.INT64
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert not [name for name, dtype in weights.items() if dtype == FLOAT]
    assert cuda_llama.precision.kept == []
    _register_ort_schemas()
    onnx.checker.check_model(model, full_check=True)


def test_cuda_model_is_verified_in_float16_against_float32(cuda_llama):
    """The float32 rewrite within 1e-4 of the original; the float16 graph within float16's
    tolerance, greedy tokens equal; both recorded beside the model."""
    assert cuda_llama.rewrite_verification.passed
    assert cuda_llama.rewrite_verification.max_abs_diff < 1e-4
    verification = cuda_llama.verification
    assert verification.passed and verification.tokens_equal
    assert (verification.atol, verification.rtol) == HALF_TOLERANCE["float16"]
    assert 0 < verification.max_abs_diff < HALF_TOLERANCE["float16"][0]
    sidecar = json.loads(cuda_llama.output.with_suffix(".kvfuse.json").read_text())
    assert sidecar["target"] == "cuda" and sidecar["dtype"] == "float16"
    assert sidecar["logits_dtype"] == "float32"
    assert sidecar["precision"]["kept"] == [] and sidecar["rewrite_verification"]["passed"]


def test_values_beyond_float16_stay_float32(overflowing_llama, tmp_path):
    """The layer-0 MLP output and the residual path that carries it stay float32, listed per
    node with the reason; the rest is float16; the result passes verification, where the
    all-float16 graph produces non-finite logits."""
    result = optimize(
        overflowing_llama, tmp_path / "m.onnx", target="cuda", max_context=64, quiet=True
    )
    kept = {k.node: k for k in result.precision.kept}
    reasons = " ".join(k.reason for k in kept.values())
    assert "down_proj" in " ".join(kept) and "overflow" in reasons and "65504" in reasons
    assert {k.op_type for k in kept.values()} >= {"MatMul", "SkipSimplifiedLayerNormalization"}
    assert result.verification.passed and result.verification.tokens_equal
    model = onnx.load(result.output)
    float_weights = {t.name for t in model.graph.initializer if t.data_type == FLOAT}
    readers = {i: n.name for n in model.graph.node for i in n.input}
    assert float_weights and all(readers[w] in kept for w in float_weights)
    half_ops = {n.op_type for n in model.graph.node if n.name not in kept}
    assert "GroupQueryAttention" in half_ops
    sidecar = json.loads(result.output.with_suffix(".kvfuse.json").read_text())
    assert {k["node"] for k in sidecar["precision"]["kept"]} == set(kept)
    report = build_report(overflowing_llama / "model.onnx", result.output, result)
    jsonschema.validate(report, json.loads((Path(kvfuse.__file__).parent / SCHEMA).read_text()))
    assert {k["node"] for k in report["precision"]["kept"]} == set(kept)
    assert "## Precision" in to_markdown(report) and "65504" in to_markdown(report)

    unchecked = optimize(  # --no-verify: every node in float16, no range check
        overflowing_llama,
        tmp_path / "u.onnx",
        target="cuda",
        max_context=64,
        verify_numerics=False,
        quiet=True,
    )
    assert unchecked.precision.kept == []
    check = verify(
        overflowing_llama / "model.onnx",
        unchecked.output,
        result.signature.pairs,
        [1, result.signature.kv_heads, 64, result.signature.head_dim],
        tolerance=HALF_TOLERANCE["float16"],
    )
    assert not check.passed


def test_dtype_is_for_half_precision_targets(tiny_export, tmp_path):
    """--dtype with the float32 target, or an unknown dtype: one clear error, nothing written."""
    _, export_dir = tiny_export("llama")
    with pytest.raises(KvfuseError, match="--dtype is for half-precision targets"):
        optimize(export_dir, tmp_path / "a.onnx", target="ort", dtype="float16", quiet=True)
    with pytest.raises(KvfuseError, match="float16 or bfloat16"):
        optimize(export_dir, tmp_path / "b.onnx", target="cuda", dtype="float64", quiet=True)
    assert not list(tmp_path.iterdir())


def test_cuda_session_bindings_on_the_cpu_provider(cuda_llama):
    """The GPU runtime's bindings (one arena, past = present by address, per-step inputs
    updated in place, the greedy pick) driven through onnxruntime's CPU provider: its tokens
    are the CPU session's."""
    import onnxruntime as ort

    from kvfuse.runtime.device import CudaSession
    from kvfuse.runtime.session import Session
    from kvfuse.runtime.spec import read_spec

    spec = read_spec(cuda_llama.output)
    session = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    device = CudaSession(spec, 1, session, cuda_graph=False, device=("cpu", 0))
    host = Session(spec, 1)
    prompt = np.array([[5, 17, 99, 3, 42, 7]])
    tokens = {}
    for name, runner in (("device", device), ("host", host)):
        token = int(runner.run(prompt, np.array([6]))[0, -1].argmax())
        tokens[name] = [token]
        for step in range(8):
            lengths = np.array([7 + step])
            if name == "device":
                token = int(runner.next_tokens(np.array([[token]]), lengths)[0])
            else:
                token = int(runner.run(np.array([[token]]), lengths)[0, -1].argmax())
            tokens[name].append(token)
    assert tokens["device"] == tokens["host"]
    device.check_in_place()
    assert device.decode_runs == 8 and device.picks_greedy


def _register_ort_schemas() -> None:
    """Teach onnx.checker onnxruntime's default-domain SimplifiedLayerNormalization."""
    if defs.has("SimplifiedLayerNormalization"):
        return
    schema = defs.OpSchema(
        "SimplifiedLayerNormalization",
        "",
        1,
        inputs=[
            defs.OpSchema.FormalParameter("X", "T"),
            defs.OpSchema.FormalParameter("scale", "V"),
        ],
        outputs=[
            defs.OpSchema.FormalParameter("Y", "V"),
            defs.OpSchema.FormalParameter(
                "inv_std_var", "U", param_option=defs.OpSchema.FormalParameterOption.Optional
            ),
        ],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            ("U", ["tensor(float)"], ""),
            ("V", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
        ],
        attributes=[
            defs.OpSchema.Attribute("axis", defs.OpSchema.AttrType.INT, ""),
            defs.OpSchema.Attribute("epsilon", defs.OpSchema.AttrType.FLOAT, ""),
            defs.OpSchema.Attribute("stash_type", defs.OpSchema.AttrType.INT, ""),
        ],
    )
    defs.register_schema(schema)


def test_server_rows_over_the_device_session(cuda_llama):
    """The server's row steps (spans of arena rows bound by pointer) over the GPU runtime's
    arena, driven through the CPU provider: two rows prefilled one at a time, then decoded
    together, give the tokens of the same steps over the CPU session's arena."""
    import onnxruntime as ort

    from kvfuse.runtime.device import CudaSession
    from kvfuse.runtime.rows import RowSteps
    from kvfuse.runtime.session import Session
    from kvfuse.runtime.spec import read_spec

    spec = read_spec(cuda_llama.output)
    session = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    sessions = {
        "device": CudaSession(spec, 2, session, cuda_graph=False, device=("cpu", 0)),
        "host": Session(spec, 2),
    }
    prompts = [np.array([5, 17, 99, 3, 42, 7]), np.array([11, 2, 250, 64])]
    tokens = {}
    for name, owner in sessions.items():
        rows = RowSteps(owner)
        picked = [
            int(rows.step(i, p[None, :], np.array([len(p)]))[0].argmax())
            for i, p in enumerate(prompts)
        ]
        lengths, seen = np.array([len(p) for p in prompts]), [list(picked)]
        for _ in range(6):
            lengths = lengths + 1
            picked = rows.step(0, np.array(picked)[:, None], lengths).argmax(-1).tolist()
            seen.append(picked)
        tokens[name] = seen
    assert tokens["device"] == tokens["host"]


def test_device_arena_of_layers_with_their_own_cache_shapes(layerwise_export, tmp_path):
    """A `--target cuda` model whose layer 1 caches one KV head: the GPU runtime's one arena
    holds each layer's buffer at its offset in its own shape, driven through the CPU provider
    to the CPU session's tokens, every present written in place."""
    import onnxruntime as ort

    from kvfuse.runtime.device import CudaSession
    from kvfuse.runtime.session import Session
    from kvfuse.runtime.spec import read_spec

    _, export_dir = layerwise_export("llama_layer_kv_heads")
    result = optimize(export_dir, tmp_path / "m.onnx", target="cuda", max_context=64, quiet=True)
    spec = read_spec(result.output)
    session = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    device = CudaSession(spec, 1, session, cuda_graph=False, device=("cpu", 0))
    assert device.kv_shapes == [[1, 2, 64, 16]] * 2 + [[1, 1, 64, 16]] * 2
    sizes = [2 * 64 * 16 * 2] * 2 + [64 * 16 * 2] * 2  # float16 bytes of each buffer
    starts = [device.arena.data_ptr() + sum(sizes[:i]) for i in range(4)]
    assert device.kv_addresses == starts and device.kv_bytes == sum(sizes)
    host, prompt, tokens = Session(spec, 1), np.array([[5, 17, 99, 3, 42, 7]]), {}
    for name, runner in (("device", device), ("host", host)):
        tokens[name] = [int(runner.run(prompt, np.array([6]))[0, -1].argmax())]
        for step in range(6):
            ids, lengths = np.array([[tokens[name][-1]]]), np.array([7 + step])
            tokens[name].append(int(runner.run(ids, lengths)[0, -1].argmax()))
    assert tokens["device"] == tokens["host"]
    device.check_in_place()
    host.check_in_place()
