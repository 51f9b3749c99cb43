"""File in, file out: read an exported model, rewrite it for a target, verify, write atomically.

IN.onnx | export dir ─ load ─ clean up ─ fuse ─ lower ─ retained-state KV ─ verify ─ OUT.onnx
                                                                               + OUT.kvfuse.json
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types
from pathlib import Path

import onnx
import onnx_ir as ir
from onnxscript import optimizer

from kvfuse import __version__, quantization
from kvfuse.checks import check_model_file
from kvfuse.errors import KvfuseError
from kvfuse.exporters.metadata import read_metadata
from kvfuse.files import staged_file
from kvfuse.patterns import targets
from kvfuse.progress import Steps, quiet_logs
from kvfuse.report.summary import load_structure
from kvfuse.rewriter import (
    packed_heads,
    pipeline,
    range_check,
    retained_state,
    shape_probe,
    shapes,
)
from kvfuse.rewriter import static as static_graphs
from kvfuse.rewriter.last_logits import gather_last_logits
from kvfuse.rewriter.pipeline import Stage
from kvfuse.rewriter.precision import to_half
from kvfuse.rewriter.verify import (
    HALF_TOLERANCE,
    Verification,
    locate_divergence,
    prefill_outputs,
    verify,
)

DEFAULT_MAX_CONTEXT = 2048
DEFAULT_PREFILL_LEN = 128
PROTOBUF_LIMIT = 2**31
INLINE_WEIGHTS_LIMIT = 2**31 - 2**26  # above this the weights go external (room for the graph)
EXTERNAL_MIN_BYTES = 1024  # smaller tensors (folded index constants) stay inline
DATA_ALIGNMENT = 65536  # external tensors' offsets: onnxruntime maps aligned ones from the file
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "kvfuse-export.json",
)


@dataclasses.dataclass
class OptimizeResult:
    """What `optimize` did: per-stage counts, layers fused or not (and why), verification."""

    output: Path | None
    target: str
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    stages: list[pipeline.StageRecord]
    layers: list[pipeline.LayerOutcome]
    verification: Verification | None
    signature: retained_state.KVSignature | None
    shared_weights: static_graphs.SharedWeights | None = None  # a static pair's weights file
    quantization: dict | None = None  # what --quantize did and measured
    warning: str | None = None  # e.g. written with --force past --max-kld
    precision: range_check.PrecisionChoice | None = None  # a half-precision target's choice
    rewrite_verification: Verification | None = None  # half targets: the float32 rewrite

    @property
    def fused_layers(self) -> int:
        return sum(layer.fused for layer in self.layers)

    @property
    def rule_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for stage in self.stages:
            for rule, count in stage.counts.items():
                counts[rule] = counts.get(rule, 0) + count
        return counts


@quiet_logs()
def optimize(
    source: str | Path,
    output: str | Path,
    *,
    target: str = "ort",
    max_context: int | None = None,
    batch_size: int | None = None,
    logits: str = "last",
    static: bool = False,
    prefill_len: int | None = None,
    dtype: str | None = None,
    verify_numerics: bool = True,
    overwrite: bool = False,
    quiet: bool = False,
    quantize: str | quantization.Quantize | None = None,
    genai_config: bool = False,
) -> OptimizeResult:
    """Rewrite an exported ONNX LLM into fused attention with a fixed-size in-place KV cache.

    Args:
        source: an `.onnx` file, or a directory written by `kvfuse export`.
        output: the `.onnx` file to write (refused if it exists unless `overwrite`).
        target: "ort" (onnxruntime contrib ops) or "onnx" (standard opset-24 ops only).
        max_context: KV buffer length; default min(model's max positions, 2048).
        batch_size: make the batch dim static.
        logits: "last" computes logits for each row's last position only (what generation
            reads); "all" keeps logits for every position.
        static: (target "onnx") write two fully static graphs instead of one, a prefill graph
            of `prefill_len` new tokens and a decode graph of one, sharing one weights file:
            OUT.prefill.onnx, OUT.decode.onnx, OUT.weights, OUT.kvfuse.json. Batch defaults
            to 1.
        prefill_len: new tokens per prefill step of a static pair (default 128).
        dtype: (target "cuda") "float16" (default) or "bfloat16"; nodes whose values leave
            float16's range stay float32 (found by running the half graph against the float32
            one; listed in `result.precision`).
        verify_numerics: compare against the original before writing (default on).
        overwrite: replace an existing output (never the input).
        quiet: no progress display.
        quantize: "int4", "int8" or "gguf" (or a `kvfuse.quantization.Quantize` with its
            options): weight-only block quantization of every MatMul and of the embedding/LM
            head; checked exactly against the dequantized original, and its quality measured
            against the original (the write is refused above `max_kld` unless `force`).
        genai_config: (target "ort") also write what onnxruntime-genai needs to run the model
            with its own loop: OUT.genai.onnx (valid lengths derived from an attention mask)
            and genai_config.json beside OUT.onnx and the tokenizer files.

    Returns:
        An `OptimizeResult`; the output is written only if every attention layer fused and
        verification passed (a `KvfuseError` says why otherwise).
    """
    plan = _plan(source, output, target, max_context, batch_size, logits, static, prefill_len)
    plan = dataclasses.replace(plan, quant=quantization.as_options(quantize))
    if plan.quant is not None:
        plan.quant.check(target)
    plan = dataclasses.replace(plan, dtype=_check_dtype(target, dtype))
    if plan.quant is not None and plan.dtype is not None:
        raise KvfuseError(f"--quantize with --target {target} is not built yet; use ort or onnx")
    if genai_config:
        _check_genai_request(plan)
    steps = Steps(quiet)
    with steps.step(f"Loading {plan.model_path.name}"):
        model = _load(plan.model_path, in_memory=plan.static)
    result = _fuse(model, plan, steps)
    with steps.step(f"Lowering to {target} with fixed {plan.max_context}-position KV buffers"):
        _lower(model, plan, result)
    if plan.static:
        return _finish_static(model, plan, result, steps, verify_numerics, overwrite)
    if plan.dtype is not None:
        return _finish_half(model, plan, result, steps, verify_numerics, overwrite)
    with staged_file(plan.output, overwrite=overwrite, inputs=[plan.model_path]) as staging:
        candidate = staging / plan.output.name
        with steps.step(f"Writing {plan.output}"):
            _save(model, candidate)
            _release(model)
            del model  # from here on the written files are what is checked: one model at a time
        if target == "onnx":
            with steps.step("Checking the model with onnx.checker (full check)"):
                static_graphs.check_standard(str(candidate))
        if verify_numerics and plan.quant is None:
            with steps.step("Verifying against the original (prefill + 8 decode steps)"):
                _verify(plan, result, candidate)
        if plan.quant is not None:  # a gate past --max-kld raises here: nothing is written
            written = candidate.read_bytes()
            _check_quantized(plan, result, written, written, verify_numerics, steps)
        _write_sidecar(staging / f"{plan.output.stem}.kvfuse.json", plan.model_path, result)
        _copy_companions(plan.model_path, staging, plan.output.parent)
        if genai_config:
            from kvfuse.genai import write_genai_files

            record = metadata_record(result.signature, target, plan.model_path)
            write_genai_files(candidate, record, plan.export_info, staging, plan.output.stem)
    result.output = plan.output
    return result


def _finish_static(model, plan, result, steps, verify_numerics: bool, overwrite: bool):
    """`--static`: specialise the two graphs in memory, verify them as a pair, write them over
    one shared weights file."""
    proto_bytes = ir.serde.serialize_model(model).SerializeToString()
    del model
    with steps.step(f"Specialising static graphs (S = {plan.prefill_len} and S = 1)"):
        pair = {
            role: static_graphs.specialize(onnx.load_from_string(proto_bytes), s, _clean_up)
            for role, s in (("prefill", plan.prefill_len), ("decode", 1))
        }
        result.nodes_after = len(pair["decode"].graph.node)
    candidate = {plan.prefill_len: pair["prefill"], 1: pair["decode"]}
    if verify_numerics and plan.quant is None:
        with steps.step("Verifying against the original (prefill + 8 decode steps)"):
            _verify(plan, result, candidate)
    if plan.quant is not None:
        _check_quantized(plan, result, candidate, proto_bytes, verify_numerics, steps)
    with steps.step(f"Writing {plan.output.with_suffix('.*')}"):
        result.shared_weights = _write_static(plan.output, pair, plan.model_path, result, overwrite)
        result.output = plan.output.parent / result.signature.static["graphs"]["decode"]
    return result


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one optimize call was asked for, checked and with its defaults filled in."""

    model_path: Path
    export_info: dict | None
    output: Path
    target: str
    max_context: int
    batch_size: int | None
    logits: str
    static: bool
    prefill_len: int | None
    quant: quantization.Quantize | None = None
    dtype: str | None = None


def _plan(source, output, target, max_context, batch_size, logits, static, prefill_len) -> _Plan:
    if logits not in ("last", "all"):
        raise KvfuseError(f"logits must be 'last' or 'all', not {logits!r}")
    if target not in targets.TARGETS:
        choices = ", ".join(targets.TARGETS)
        raise KvfuseError(f"unknown target {target!r}; choose one of {choices}")
    model_path, export_info = _resolve_input(Path(source))
    output = Path(output)
    if output.suffix != ".onnx":
        raise KvfuseError(f"output {output} must be an .onnx file path")
    max_context = _check_context(max_context, export_info) or _default_context(export_info)
    if static:
        batch_size = batch_size or 1
        prefill_len = _check_static_request(target, prefill_len, max_context)
    return _Plan(
        model_path,
        export_info,
        output,
        target,
        max_context,
        batch_size,
        logits,
        static,
        prefill_len,
    )


def _fuse(model: ir.Model, plan: _Plan, steps: Steps) -> OptimizeResult:
    """Clean up and fuse; every attention layer must fuse (else `PartialFusion`)."""
    before_nodes, before_ops = pipeline.count_nodes(model), pipeline.op_histogram(model)
    candidates = pipeline.attention_candidates(model)
    if not candidates:
        raise KvfuseError(f"{plan.model_path} has no attention (no Softmax); nothing to fuse")
    batch = plan.batch_size
    with steps.step("Cleaning up shape plumbing"):
        specialize = Stage("fix batch size", run=lambda m: shapes.specialize_batch(m, batch))
        probe = Stage("measure position-only shapes", run=_probe_shapes)
        records = pipeline.run_stages(model, [specialize, Stage("clean up", run=_clean_up), probe])
    with steps.step("Fusing attention, RoPE and norms"):
        records += pipeline.run_stages(model, targets.FUSION_STAGES)
    layers = pipeline.attention_outcomes(model, candidates, targets.EXPLAIN_RULES, targets.DIAGNOSE)
    after_nodes, after_ops = pipeline.count_nodes(model), pipeline.op_histogram(model)
    result = OptimizeResult(
        None,
        plan.target,
        before_nodes,
        after_nodes,
        before_ops,
        after_ops,
        records,
        layers,
        None,
        None,
    )
    if result.fused_layers < len(layers):
        raise PartialFusion(result)
    return result


def _lower(model: ir.Model, plan: _Plan, result: OptimizeResult) -> None:
    """The target's lowering, the retained-state KV signature, last-position logits, and the
    metadata the runtime reads."""
    lowering, records = targets.TARGETS[plan.target], result.stages
    records += pipeline.run_stages(model, lowering.lowering)
    window = (plan.export_info or {}).get("model", {}).get("sliding_window")
    signature = retained_state.convert_to_retained_state(
        model,
        plan.max_context,
        plan.batch_size,
        lowering.attention(plan.max_context),
        sliding_window=window,
    )
    signature.logits = plan.logits
    signature.dtype = plan.dtype or "float32"
    for outcome in result.layers:
        record = signature.lowerings.get(outcome.layer, {})
        outcome.lowering = record.get("lowering", "")
        outcome.lowering_reason = record.get("reason", "")
    if plan.logits == "last":
        on_device = lowering.positions_on_device
        last = Stage("logits for the last position", run=lambda m: gather_last_logits(m, on_device))
        records += pipeline.run_stages(model, [last])
        signature.logits = "last" if records[-1].counts["logits/last_position"] else "all"
    if plan.quant is not None:
        spec = quantization.spec_for(plan.quant, plan.export_info)
        stages = quantization.stages(spec, lowering.quantized, plan.quant.accuracy_level)
        records += pipeline.run_stages(model, stages)
    records += pipeline.run_stages(model, lowering.finishing)
    records += pipeline.run_stages(model, [Stage("final clean up", run=_clean_up)])
    if plan.quant is not None:
        result.quantization = {"records": quantization.records_of(model)}
    if plan.static:
        signature.static = static_layout(plan.output, plan.prefill_len)
    _stamp_metadata(model, signature, plan.target, plan.model_path)
    result.nodes_after, result.ops_after = pipeline.count_nodes(model), pipeline.op_histogram(model)
    result.signature = signature


def _verify(plan: _Plan, result: OptimizeResult, candidate) -> None:
    """Check `candidate` (a written model file, or the static pair) against the original; on
    failure name the first diverging tensor and raise — nothing is written."""
    signature, batch = result.signature, plan.batch_size or 1
    kv_shape = [batch, signature.kv_heads, plan.max_context, signature.head_dim]
    result.verification = verify(plan.model_path, candidate, signature.pairs, kv_shape, batch=batch)
    if not result.verification.passed:
        where = locate_divergence(plan.model_path, candidate, signature.pairs, kv_shape)
        raise KvfuseError(
            f"{result.verification.summary()}; {where or 'no shared tensor to compare'}; "
            "nothing was written"
        )


def _check_quantized(plan, result, candidate, proto_bytes, verify_numerics, steps) -> None:
    """The quantized model's two checks: the rewrite exact against the dequantized original,
    then its quality against the original, which gates the write (`--max-kld`)."""
    options, records = plan.quant, result.quantization["records"]
    signature, batch = result.signature, plan.batch_size or 1
    kv_shape = [batch, signature.kv_heads, plan.max_context, signature.head_dim]
    if verify_numerics:
        with steps.step("Verifying against the original with dequantized weights (fp32 acts)"):
            result.verification = quantization.verify_exact(
                plan.model_path, candidate, records, signature.pairs, kv_shape, batch
            )
        if not result.verification.passed:
            raise KvfuseError(f"{result.verification.summary()}; nothing was written")
    label = f"Measuring quality over {options.quality_tokens} tokens of pydoc_data.topics"
    with steps.step(label):
        kv_one = [1, *kv_shape[1:]]
        measured = quantization.measure_quality(
            options, plan.model_path, proto_bytes, signature.pairs, kv_one
        )
    result.quantization = quantization.summary(options, records, result.verification, measured)
    result.warning = quantization.gate(options, measured)


def _finish_half(model, plan, result, steps, verify_numerics: bool, overwrite: bool):
    """A half-precision target (cuda): the float32 rewrite is written and verified, then the
    range check chooses per node what runs in half precision and verifies that graph against
    the original; the half model replaces the float32 one in the staging directory."""
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)
    if weights >= INLINE_WEIGHTS_LIMIT:
        raise KvfuseError(
            f"--target {plan.target} rewrites models under 2 GiB of float32 weights for now (its "
            f"range check runs in memory); this one has {weights / 2**30:.1f} GiB"
        )
    with staged_file(plan.output, overwrite=overwrite, inputs=[plan.model_path]) as staging:
        candidate = staging / plan.output.name
        with steps.step("Writing the float32 rewrite"):
            _save(model, candidate)
            _release(model)
            del model
        if verify_numerics:
            with steps.step("Verifying the float32 rewrite against the original"):
                _verify(plan, result, candidate)
            result.rewrite_verification = result.verification
        half = _to_half(plan, result, onnx.load(str(candidate)).SerializeToString(), steps)
        with steps.step(f"Writing {plan.output}"):
            candidate.write_bytes(half)
        _write_sidecar(staging / f"{plan.output.stem}.kvfuse.json", plan.model_path, result)
        _copy_companions(plan.model_path, staging, plan.output.parent)
    result.output = plan.output
    return result


def _to_half(plan: _Plan, result: OptimizeResult, lowered: bytes, steps) -> bytes:
    """Choose per node what runs in half precision (the range check) and verify that graph
    against the original; with --no-verify (no rewrite verification) every node goes half."""
    if result.rewrite_verification is None:
        model = ir.serde.deserialize_model(onnx.load_from_string(lowered))
        counts = to_half(model, plan.dtype)
        result.precision = range_check.PrecisionChoice(plan.dtype, [], 0, counts)
        return ir.serde.serialize_model(model).SerializeToString()
    signature, batch = result.signature, plan.batch_size or 1
    kv_shape = [batch, signature.kv_heads, plan.max_context, signature.head_dim]
    tolerance = HALF_TOLERANCE[plan.dtype]
    with steps.step(f"Choosing {plan.dtype} or float32 per node (range check + verification)"):
        try:
            half, result.precision, result.verification = range_check.choose_precision(
                lowered,
                plan.dtype,
                lambda model: prefill_outputs(model, signature.pairs, kv_shape),
                lambda model: verify(
                    plan.model_path,
                    model,
                    signature.pairs,
                    kv_shape,
                    batch=batch,
                    tolerance=tolerance,
                ),
            )
        except KvfuseError:
            raise
        except Exception as error:  # onnxruntime without kernels for this dtype
            raise KvfuseError(
                f"cannot run the {plan.dtype} graph to verify it here ({str(error)[:160]}); "
                "onnxruntime's CPU kernels lack it — use float16, or --no-verify"
            ) from error
    return half


def _check_dtype(target: str, dtype: str | None) -> str | None:
    default = targets.TARGETS[target].dtype
    if dtype is None:
        return default
    if default is None:
        raise KvfuseError(f"--dtype is for half-precision targets (cuda), not {target!r}")
    if dtype not in ("float16", "bfloat16"):
        raise KvfuseError(f"--dtype must be float16 or bfloat16, not {dtype!r}")
    return dtype


class PartialFusion(KvfuseError):
    """Not every attention layer fused; carries the result so callers can explain why."""

    def __init__(self, result: OptimizeResult) -> None:
        unfused = [layer.layer for layer in result.layers if not layer.fused]
        first = next(layer for layer in result.layers if not layer.fused)
        reason = first.near_misses[0].reason if first.near_misses else "no rule came close"
        super().__init__(
            f"{result.fused_layers} of {len(result.layers)} attention layers fused; not fused: "
            f"{', '.join(unfused[:8])}{' …' if len(unfused) > 8 else ''} (layer {first.layer}: "
            f"{reason}); run with --explain for every near miss; nothing was written"
        )
        self.result = result


def _check_static_request(target: str, prefill_len: int | None, max_context: int) -> int:
    if target != "onnx":
        raise KvfuseError("--static needs --target onnx (standard ops with static shapes)")
    prefill_len = prefill_len or min(DEFAULT_PREFILL_LEN, max_context)
    if not 1 < prefill_len <= max_context:
        raise KvfuseError(
            f"--prefill-len {prefill_len} must be between 2 and --max-context ({max_context})"
        )
    return prefill_len


def static_layout(output: Path, prefill_len: int) -> dict:
    """The files of a static pair written for OUT.onnx, as recorded in its metadata."""
    return {
        "prefill_len": prefill_len,
        "graphs": {
            "prefill": f"{output.stem}.prefill.onnx",
            "decode": f"{output.stem}.decode.onnx",
        },
        "weights": f"{output.stem}.weights",
    }


def _resolve_input(source: Path) -> tuple[Path, dict | None]:
    if source.is_dir():
        model_path = source / "model.onnx"
        if not model_path.is_file():
            raise KvfuseError(f"{source} has no model.onnx; give an .onnx file or an export dir")
        return model_path, read_metadata(source)
    if not source.exists():
        raise KvfuseError(f"{source} does not exist; give an .onnx file or an export directory")
    return source, read_metadata(source.parent)


def _check_context(max_context: int | None, export_info: dict | None) -> int | None:
    """--max-context may go up to the model's own limit (its max positions), not past it."""
    if max_context is None:
        return None
    positions = (export_info or {}).get("model", {}).get("max_positions")
    if max_context < 2:
        raise KvfuseError(f"--max-context {max_context} must be at least 2 positions")
    if positions and max_context > positions:
        raise KvfuseError(
            f"--max-context {max_context} is past the model's own limit of {positions} "
            f"positions (max_position_embeddings); give at most {positions}"
        )
    return max_context


def _default_context(export_info: dict | None) -> int:
    positions = (export_info or {}).get("model", {}).get("max_positions")
    return min(positions, DEFAULT_MAX_CONTEXT) if positions else DEFAULT_MAX_CONTEXT


def _load(model_path: Path, in_memory: bool = False) -> ir.Model:
    """The model with its external weights left in their file (memory-mapped, read only by the
    rules that need their values), or read into memory for `in_memory` (a static pair)."""
    proto = load_structure(model_path)  # one-line error for a missing or corrupt file
    check_model_file(model_path, proto)  # one line for a damaged or hand-edited one
    del proto  # ir.load reads it again; keep one copy in memory at a time
    try:
        model = ir.load(model_path)
    except (ValueError, TypeError, KeyError) as error:  # what the checks above cannot see
        raise KvfuseError(
            f"{model_path} cannot be read into onnx_ir ({type(error).__name__}: "
            f"{str(error)[:200]}); re-export it"
        ) from error
    if any(v.dtype == ir.DataType.BFLOAT16 for v in model.graph.inputs):
        raise KvfuseError(
            f"{model_path} is a bfloat16 model: onnxruntime has no CPU kernels for bfloat16 "
            "MatMul or attention, so it can be neither verified nor run here; export with "
            "--dtype float16 or float32"
        )
    external = [v for v in model.graph.initializers.values() if _is_external(v.const_value)]
    if in_memory and external:
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values())
        if size >= PROTOBUF_LIMIT:
            raise KvfuseError(
                f"{model_path} has {size / 2**30:.1f} GiB of weights; a static pair is built "
                "in memory as one protobuf (< 2 GiB): optimize without --static"
            )
        ir.external_data.load_to_model(model)
    return model


def _is_external(tensor) -> bool:
    return isinstance(tensor, ir.ExternalTensor)


def _save(model: ir.Model, path: Path) -> None:
    """Write `model` to `path`: its weights stay inline when the input had them inline and they
    fit one protobuf, else they go to one file beside it, `<name>.data` (page-aligned offsets,
    so onnxruntime can map them), written tensor by tensor from wherever they are."""
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value]
    size = sum(t.nbytes for t in tensors)
    if size < INLINE_WEIGHTS_LIMIT and not any(_is_external(t) for t in tensors):
        ir.save(model, path)
        return
    ir.save(
        model,
        path,
        external_data=f"{path.name}.data",
        size_threshold_bytes=EXTERNAL_MIN_BYTES,
        alignment=DATA_ALIGNMENT,
    )


def _release(model: ir.Model) -> None:
    """Unmap the input's weight file (the model is not used after this)."""
    for value in model.graph.initializers.values():
        if _is_external(value.const_value):
            value.const_value.release()


def _clean_up(model: ir.Model) -> dict[str, int]:
    """Constant folding, dead code removal, and resolving the shape plumbing.

    (Not onnxscript's full `optimize`: its default rewrite rules include multi-output patterns
    whose matcher scans the whole graph per attempt — minutes on a 7,000-node export.)"""
    optimizer.fold_constants(model)
    optimizer.remove_unused_nodes(model)
    folded = shapes.resolve_shapes(model)
    axes = shapes.canonicalize_concat_axes(model.graph)
    slices = shapes.remove_full_slices(model.graph)
    reshapes = shapes.remove_identity_reshapes(model.graph) + shapes.collapse_reshapes(model.graph)
    reshapes += shapes.read_through_sibling_reshapes(model.graph)
    parts = packed_heads.split_packed_parts(model.graph)
    optimizer.remove_unused_nodes(model)  # the replaced grid's shape reads: the weight is free
    gathers = packed_heads.fold_column_gathers(model.graph)
    optimizer.remove_unused_nodes(model)
    return {
        "shape/static_dims": folded,
        "shape/concat_axes": axes,
        "shape/full_slices": slices,
        "shape/identity_reshapes": reshapes,
        "shape/packed_parts": parts,
        "shape/column_gathers": gathers,
    }


def _probe_shapes(model: ir.Model) -> dict[str, int]:
    """Measure the shapes inference cannot see in position-only subgraphs (GLM's RoPE
    tables), then fold the plumbing they unblock."""
    counts = shape_probe.probe_position_shapes(model)
    # fold before shape inference forgets the measured shapes; clean up only what that unblocked
    folded = shapes.fold_static_dims(model.graph) if counts["shape/probed"] else 0
    if folded:
        optimizer.fold_constants(model)
        counts |= {
            k: v + (folded if k == "shape/static_dims" else 0) for k, v in _clean_up(model).items()
        }
    return counts


def _stamp_metadata(model, signature, target, source) -> None:
    record = metadata_record(signature, target, source)
    model.metadata_props["kvfuse"] = json.dumps(record)


def metadata_record(signature, target: str, source: Path) -> dict:
    return {
        "kvfuse_version": __version__,
        "target": target,
        "source_model": str(source),
        "layout": "BHSD",
        "max_context": signature.max_context,
        "batch_size": signature.batch_size,
        "kv_heads": signature.kv_heads,
        "logits": signature.logits,
        "head_dim": signature.head_dim,
        "dtype": signature.dtype,
        "logits_dtype": "float32",
        "kv_pairs": [{"past": p, "present": q} for p, q in signature.pairs],
        **({"static": signature.static} if signature.static else {}),
        "inputs": signature.inputs,
        "feeds": {
            "seqlens_k": "int32 [batch]: valid positions − 1 per row, after this step",
            "total_sequence_length": "int32 scalar: max valid positions after this step",
            "position_ids": "int64 [batch, S] positions of the new tokens (if an input)",
        },
    }


def _check_genai_request(plan: _Plan) -> None:
    if plan.target != "ort" or plan.static:
        raise KvfuseError(
            "--genai-config needs --target ort without --static (onnxruntime-genai runs "
            "GroupQueryAttention graphs)"
        )
    if not (plan.export_info or {}).get("model"):
        raise KvfuseError(
            f"--genai-config needs the export's kvfuse-export.json beside {plan.model_path}; "
            "optimize a `kvfuse export` directory"
        )


def _write_static(output: Path, pair: dict, source: Path, result, overwrite: bool):
    """OUT.prefill.onnx + OUT.decode.onnx over one OUT.weights; OUT.kvfuse.json is the
    file that lands last (the pair is complete once it exists)."""
    layout = result.signature.static
    sidecar = output.with_suffix(".kvfuse.json")
    with staged_file(sidecar, overwrite=overwrite, inputs=[source]) as staging:
        shared = static_graphs.write_shared(pair, staging / layout["weights"])
        for role, proto in pair.items():
            (staging / layout["graphs"][role]).write_bytes(proto.SerializeToString())
        _write_sidecar(staging / sidecar.name, source, result, shared)
        _copy_companions(source, staging, output.parent)
    return shared


def _write_sidecar(path: Path, source: Path, result, shared=None) -> None:
    sidecar = {
        **metadata_record(result.signature, result.target, source),
        "rule_counts": result.rule_counts,
        "nodes_before": result.nodes_before,
        "nodes_after": result.nodes_after,
        "layers": [
            {"layer": o.layer, "lowering": o.lowering, "reason": o.lowering_reason}
            for o in result.layers
        ],
    }
    if result.verification is not None:
        sidecar["verification"] = dataclasses.asdict(result.verification)
    if result.rewrite_verification is not None:
        sidecar["rewrite_verification"] = dataclasses.asdict(result.rewrite_verification)
    if result.precision is not None:
        sidecar["precision"] = dataclasses.asdict(result.precision)
    if shared is not None:
        sidecar["shared_weights"] = dataclasses.asdict(shared)
    if result.quantization is not None:
        sidecar["quantization"] = result.quantization
    path.write_text(json.dumps(sidecar, indent=2))


def _copy_companions(source: Path, staging: Path, destination: Path) -> None:
    for name in COMPANION_FILES:
        if (source.parent / name).is_file() and not (destination / name).exists():
            shutil.copyfile(source.parent / name, staging / name)


class _CallableModule(types.ModuleType):
    """`import kvfuse.optimize` binds this module to the package attribute `kvfuse.optimize`,
    shadowing the public function of the same name; calling the module calls the function, so
    `kvfuse.optimize(...)` works whichever was imported first."""

    def __call__(self, *args, **kwargs) -> OptimizeResult:
        return optimize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
