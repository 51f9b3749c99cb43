"""`optimize(..., quantize=...)` on tiny models: the ops each target gets, the exact check
against the dequantized original, the quality figures, the gate, and bad requests."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from kvfuse.errors import KvfuseError
from kvfuse.optimize import optimize
from kvfuse.quantization import Quantize
from kvfuse.report.diff import build_report
from kvfuse.report.html import to_html
from kvfuse.report.markdown import to_markdown
from tests.exporters.test_export_errors import assert_one_line_error, run_cli

LAYERS = 2
QUICK = {"quality_tokens": 256}  # four windows of 64 positions


@pytest.fixture(scope="module")
def quantized(tiny_export, tmp_path_factory):
    """Factory: (mode, target, options) → OptimizeResult of tiny Llama, built once each."""
    _, export_dir = tiny_export("llama")
    root, done = tmp_path_factory.mktemp("quantized"), {}

    def get(mode: str, target: str = "ort", **options):
        key = (mode, target, tuple(sorted(options.items())))
        if key not in done:
            out = root / f"m{len(done)}" / "model.onnx"
            out.parent.mkdir()
            spec = Quantize(mode, **{**QUICK, **options})
            done[key] = optimize(
                export_dir, out, target=target, max_context=64, quantize=spec, quiet=True
            )
        return done[key]

    return get


def _ops(path) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def test_int4_ort_uses_matmulnbits_and_is_exact(quantized):
    """Every projection, the packed QKV and the MLP become 4-bit MatMulNBits at accuracy
    level 4, the head 8-bit, the embedding GatherBlockQuantized; no fp32 MatMul is left and
    the graph matches the dequantized original within the usual tolerance, tokens equal."""
    result = quantized("int4")
    ops = _ops(result.output)
    assert ops["MatMulNBits"] == 5 * LAYERS + 1 and ops["GatherBlockQuantized"] == 1
    assert "MatMul" not in ops and "Gather" not in ops
    assert result.verification.passed and result.verification.tokens_equal
    nodes = result.quantization["nodes"]
    assert {(n["op"], n["bits"]) for n in nodes} == {
        ("MatMulNBits", 4),
        ("MatMulNBits", 8),
        ("GatherBlockQuantized", 8),
    }
    levels = {
        a.i
        for n in onnx.load(str(result.output)).graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {4}
    assert result.quantization["bytes"] < result.quantization["fp32_bytes"] / 3


def test_tied_embedding_and_head_read_one_table(tiny_export, tmp_path):
    """A tied embedding and head: GatherBlockQuantized reads the 8-bit table and the head's
    MatMulNBits the same initializer through a Reshape to B's [N, K/bs, bs]; exact."""
    _, export_dir = tiny_export("llama_tied")
    out = tmp_path / "model.onnx"
    result = optimize(
        export_dir, out, max_context=64, quantize=Quantize("int4", **QUICK), quiet=True
    )
    assert result.verification.passed and result.verification.tokens_equal
    graph = onnx.load(str(out), load_external_data=False).graph
    (gather,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    table = gather.input[0]
    (reshape,) = [n for n in graph.node if n.op_type == "Reshape" and n.input[0] == table]
    assert [n for n in graph.node if n.op_type == "MatMulNBits" and reshape.output[0] in n.input]
    vocab, hidden = [list(t.dims) for t in graph.initializer if t.name == table][0]
    big = [t.name for t in graph.initializer if np.prod(t.dims) >= vocab * hidden]
    assert big == [table]  # one copy of the matrix in the file


def _zero_point_inputs(path) -> dict[str, set[int]]:
    """Per quantized op type, the input counts its nodes have (MatMulNBits' 4th is zp)."""
    counts: dict[str, set[int]] = {}
    for node in onnx.load(str(path)).graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            counts.setdefault(node.op_type, set()).add(len(node.input))
    return counts


def test_symmetric_blocks_take_matmulnbits_without_zero_points(quantized):
    """By default (asymmetric blocks) every MatMulNBits gets its per-block zero points;
    symmetric blocks (`zero_points=False`, --symmetric) give it none (its default
    2^(bits−1) — the fast kernel) while GatherBlockQuantized keeps explicit ones; both exact."""
    asymmetric, symmetric = quantized("int4"), quantized("int4", zero_points=False)
    assert _zero_point_inputs(symmetric.output) == {
        "MatMulNBits": {3},
        "GatherBlockQuantized": {4},
    }
    assert _zero_point_inputs(asymmetric.output)["MatMulNBits"] == {4}
    for result in (symmetric, asymmetric):
        assert result.verification.passed and result.verification.tokens_equal
    assert {n["symmetric"] for n in symmetric.quantization["nodes"]} == {True}
    assert {n["symmetric"] for n in asymmetric.quantization["nodes"]} == {False}


def test_quality_figures_are_recorded(quantized):
    """KLD, top-1 agreement, perplexities and greedy agreement land in OUT.kvfuse.json."""
    result = quantized("int4")
    sidecar = json.loads(result.output.with_suffix(".kvfuse.json").read_text())
    (quality,) = sidecar["quantization"]["quality"]
    assert quality["text"] == "pydoc_data.topics" and quality["tokens"] > 200
    assert 0 < quality["kld_mean"] <= quality["kld_p999"] <= quality["kld_max"]
    assert 0.5 < quality["same_top1"] <= 1
    assert quality["perplexity_quantized"] > 1 and quality["perplexity_original"] > 1
    assert quality["greedy_equal"] + len(quality["mismatches"]) == quality["greedy_steps"]
    assert all(m["margin"] >= 0 for m in quality["mismatches"])


def test_int8_is_closer_than_int4(quantized):
    """More bits, less divergence from the original (the figures measure something)."""
    int4 = quantized("int4").quantization["quality"][0]
    int8 = quantized("int8").quantization["quality"][0]
    assert int8["kld_mean"] < int4["kld_mean"] / 4


def test_onnx_target_uses_standard_blocked_dequantize(quantized, tmp_path):
    """Target onnx: DequantizeLinear (uint4, block_size) + MatMul, standard ops only; and
    onnxruntime fuses the pair into MatMulNBits itself when its optimisations run."""
    result = quantized("int4", target="onnx")
    model = onnx.load(str(result.output))
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert _ops(result.output)["DequantizeLinear"] == 5 * LAYERS + 2  # + head, embedding
    assert result.verification.passed
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(result.output), options, providers=["CPUExecutionProvider"])
    assert _ops(tmp_path / "fused.onnx").get("MatMulNBits", 0) == 5 * LAYERS + 1  # + the head


def test_exclude_and_float_head_stay_fp32(quantized):
    """--exclude keeps matching MatMuls fp32; --head float keeps the head and embedding."""
    result = quantized("int4", exclude=("*mlp*",), head="float")
    ops = _ops(result.output)
    assert ops["MatMulNBits"] == 2 * LAYERS  # packed QKV + o_proj per layer
    assert "GatherBlockQuantized" not in ops and ops["Gather"] == 1
    assert not any("mlp" in n["node"] for n in result.quantization["nodes"])


def test_report_has_a_quantization_section(quantized):
    """The report shows bits per node, bytes and the KLD chart (inline SVG)."""
    result = quantized("int4")
    report = build_report(result.output.parent / "model.onnx", result.output, result)
    page = to_html(report)
    assert "<h2>Quantized weights</h2>" in page and "<svg" in page and "class='kld'" in page
    assert "## Quantization" in to_markdown(report) and "MatMulNBits" in to_markdown(report)


def test_max_kld_gates_the_write_and_force_overrides(tiny_export, tmp_path):
    """Above --max-kld nothing is written; --force writes and says so."""
    _, export_dir = tiny_export("llama")
    strict = Quantize("int4", max_kld=1e-12, **QUICK)
    with pytest.raises(KvfuseError, match="exceeds --max-kld 1e-12; nothing was written"):
        optimize(export_dir, tmp_path / "a.onnx", max_context=64, quantize=strict, quiet=True)
    assert not (tmp_path / "a.onnx").exists()
    forced = Quantize("int4", max_kld=1e-12, force=True, **QUICK)
    result = optimize(export_dir, tmp_path / "b.onnx", max_context=64, quantize=forced, quiet=True)
    assert "written anyway (--force)" in result.warning and result.quantization["forced"]
    assert (tmp_path / "b.onnx").is_file()


def test_gguf_mode_needs_a_gguf_export(tiny_export, tmp_path):
    """--quantize gguf of an export made from an HF directory: one line, nothing written."""
    _, export_dir = tiny_export("llama")
    done = run_cli("optimize", str(export_dir), str(tmp_path / "o.onnx"), "--quantize", "gguf")
    assert_one_line_error(done, "--quantize gguf needs an export made from a GGUF file")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantize", "int3"], "--quantize 'int3': choose one of int4, int8, gguf"),
        (["--quantize", "int4", "--block-size", "48"], "--block-size 48: use 16, 32"),
        (["--quantize", "int4", "--head", "fp8"], "--head 'fp8': choose one of"),
    ],
)
def test_bad_quantize_options(tiny_export, tmp_path, args, message):
    _, export_dir = tiny_export("llama")
    done = run_cli("optimize", str(export_dir), str(tmp_path / "o.onnx"), *args)
    assert_one_line_error(done, message)


def test_static_pair_shares_one_weights_file(tiny_export, tmp_path):
    """--static with --quantize: both graphs read the 4-bit blocks from one OUT.weights, which
    the runtime holds once (packed 4-bit tensors handed to onnxruntime without a copy)."""
    from kvfuse.runtime.generate import GenerationConfig, load

    _, export_dir = tiny_export("llama")
    result = optimize(
        export_dir,
        tmp_path / "pair.onnx",
        target="onnx",
        static=True,
        prefill_len=16,
        max_context=64,
        quantize=Quantize("int4", **QUICK),
        quiet=True,
    )
    assert result.verification.passed
    shared = result.shared_weights
    assert shared.file == "pair.weights" and shared.tensors > 20
    uint4 = [
        t.name
        for t in onnx.load(
            str(tmp_path / "pair.decode.onnx"), load_external_data=False
        ).graph.initializer
        if t.data_type == onnx.TensorProto.UINT4
    ]
    assert uint4, "the pair's blocks are 4-bit tensors"
    completion = load(result.output).generate(
        "hello", GenerationConfig(max_new_tokens=8, chat=False)
    )
    assert len(completion.tokens[0]) == 8


def test_cli_prints_the_figures_and_writes_the_report(tiny_export, tmp_path):
    """`kvfuse optimize … --quantize int8 --report R`: the summary names what was quantized
    and the quality; the HTML report carries the section."""
    _, export_dir = tiny_export("llama")
    out, stem = tmp_path / "q.onnx", tmp_path / "report"
    done = run_cli(
        "optimize",
        str(export_dir),
        str(out),
        "--quantize",
        "int8",
        "--max-context",
        "64",
        "--report",
        str(stem),
    )
    assert done.returncode == 0, done.stderr
    assert "quantized 12 ops" in done.stdout and "quality at accuracy level 4: KLD" in done.stdout
    assert "rewrite exact vs dequantized original" in done.stdout
    assert "<h2>Quantized weights</h2>" in (tmp_path / "report.html").read_text()
