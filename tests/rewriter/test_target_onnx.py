"""Target `onnx`: standard ops only, in-place TensorScatter + Attention, and the static pair."""

from __future__ import annotations

import json

import onnx
import pytest

from kvfuse.errors import KvfuseError
from kvfuse.models.architectures import ARCHITECTURES as FACTS
from kvfuse.models.architectures import POSITION_ARCHITECTURES, ROTARY_ARCHITECTURES
from kvfuse.optimize import optimize
from kvfuse.rewriter import static
from kvfuse.runtime.shared_weights import SharedWeights, _external_tensors

# every architecture the pattern library fuses: RoPE half/partial, sliding window, learned
# positions, MHA/GQA/MQA, packed and per-head interleaved projections
# (the rotary-coverage families: `python -m kvfuse.models.coverage` runs them on this target)
ARCHITECTURES = sorted(set(FACTS) - set(ROTARY_ARCHITECTURES) - set(POSITION_ARCHITECTURES))
PREFILL_LEN = 16


@pytest.fixture(scope="module")
def onnx_target(tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-target")
    cache = {}

    def run(name: str, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            stem = f"{name}-{'static' if options.get('static') else 'onnx'}"
            cache[key] = optimize(
                tiny_export(name)[1],
                out / f"{stem}.onnx",
                target="onnx",
                max_context=64,
                quiet=True,
                **options,
            )
        return cache[key]

    return run


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_standard_ops_only_and_verified(onnx_target, name):
    """Every layer becomes TensorScatter ×2 + Attention; no vendor or kvfuse op is left; the
    full ONNX checker accepts the model; verification against the export passes."""
    result = onnx_target(name)
    model = onnx.load(result.output)
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {""}
    assert {o.domain for o in model.opset_import} == {""}
    assert model.opset_import[0].version == 24
    ops = result.ops_after
    assert ops["Attention"] == 2 and ops["TensorScatter"] == 4
    assert "Softmax" not in ops and "Concat" not in {
        n.op_type for n in model.graph.node for i in n.input if i.startswith("past")
    }
    assert result.verification.passed and result.verification.tokens_equal
    assert result.verification.max_abs_diff < 1e-4


def test_rope_and_norm_lower_to_their_standard_ops(onnx_target):
    """Llama's RoPE is RotaryEmbedding (q and k per layer), its RMSNorm RMSNormalization."""
    ops = onnx_target("llama").ops_after
    assert ops["RotaryEmbedding"] == 4
    assert ops["RMSNormalization"] == 5
    assert not {"Cos", "Sin", "Neg", "Pow", "ReduceMean", "Sqrt"} & set(ops)


def test_dynamic_graph_is_not_static(onnx_target):
    """The check that guards --static refuses a graph that still computes shapes."""
    model = onnx.load(onnx_target("llama").output)
    with pytest.raises(KvfuseError, match="computes shapes at run time"):
        static.check_static(model, "the dynamic graph")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_static_pair_is_fully_static_and_shares_one_weights_file(onnx_target, name):
    """OUT.prefill.onnx (S = 16) and OUT.decode.onnx (S = 1): every dim fixed after shape
    inference from scratch, no Shape/Size op, full checker passes with the weights, and both
    graphs point every large tensor at the same offsets of one file written once."""
    result = onnx_target(name, static=True, prefill_len=PREFILL_LEN)
    directory = result.output.parent
    record = json.loads((directory / f"{name}-static.kvfuse.json").read_text())
    graphs = {role: directory / file for role, file in record["static"]["graphs"].items()}
    weights = directory / record["static"]["weights"]
    assert result.output == graphs["decode"]
    assert not (directory / f"{name}-static.onnx").exists()
    for role, path in graphs.items():
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.shape_inference.infer_shapes(
            onnx.load(str(path), load_external_data=False), strict_mode=True
        )
        static.check_static(proto, role)
        dims = {
            v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input
        }
        assert dims["input_ids"] == [1, PREFILL_LEN if role == "prefill" else 1]
    prefill, decode = (_external_tensors(graphs[r]) for r in ("prefill", "decode"))
    assert prefill == decode and len(decode) > 5
    stored = sum(length for _, _, length, _, _ in decode.values())
    assert stored <= weights.stat().st_size < stored + 4096 * len(decode)  # once, page-aligned
    assert record["shared_weights"]["bytes_total"] == weights.stat().st_size
    for path in graphs.values():  # the graphs themselves carry only small constants
        assert path.stat().st_size < weights.stat().st_size / 2
    assert result.verification.passed, result.verification.summary()


def test_static_needs_the_onnx_target_and_a_prefill_that_fits(tiny_export, tmp_path):
    """--static with target ort, or a prefill longer than the context: one-line errors."""
    export_dir = tiny_export("llama")[1]
    with pytest.raises(KvfuseError, match="--static needs --target onnx"):
        optimize(export_dir, tmp_path / "a.onnx", static=True, quiet=True)
    with pytest.raises(KvfuseError, match="--prefill-len 128 must be between"):
        optimize(
            export_dir,
            tmp_path / "b.onnx",
            target="onnx",
            static=True,
            prefill_len=128,
            max_context=64,
            quiet=True,
        )
    assert not list(tmp_path.iterdir())


def test_a_prefill_shorter_than_the_verification_prompt_verifies(tiny_export, tmp_path):
    """--prefill-len 8 (below verification's 12-token prompt): verified with an 8-token prompt,
    not a traceback."""
    result = optimize(
        tiny_export("llama")[1],
        tmp_path / "short.onnx",
        target="onnx",
        static=True,
        prefill_len=8,
        max_context=64,
        quiet=True,
    )
    assert result.verification.passed and result.verification.prompt_tokens == 8


def test_shared_weights_are_one_copy(onnx_target):
    """Every initializer handed to the sessions is a view into the one buffer read from the
    weights file; a pair whose graphs disagree on their weights is refused."""
    result = onnx_target("llama", static=True, prefill_len=PREFILL_LEN)
    directory = result.output.parent
    graphs = [directory / "llama-static.decode.onnx", directory / "llama-static.prefill.onnx"]
    shared = SharedWeights(directory / "llama-static.weights", graphs)
    start = shared.blob.ctypes.data
    for value in shared.values.values():
        assert start <= value.data_ptr() < start + shared.nbytes
    other = onnx_target("llama").output  # weights inline: reads nothing from the file
    with pytest.raises(KvfuseError, match="does not read the same weights"):
        SharedWeights(directory / "llama-static.weights", [graphs[0], other])
    assert shared.nbytes == (directory / "llama-static.weights").stat().st_size


def test_qkv_projections_are_one_matmul_per_layer(onnx_target):
    """Q, K and V come from one packed MatMul and a Split per layer: 5 MatMuls per layer
    (qkv, o, gate, up, down) plus the head, where the export had 7 per layer."""
    result = onnx_target("llama")
    assert result.rule_counts["fuse/packed_qkv"] == 2
    assert result.ops_after["Split"] == 2
    assert result.ops_after["MatMul"] == 2 * 5 + 1
