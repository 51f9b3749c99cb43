"""File in, file out: read an exported model, rewrite it for a target, verify, write atomically.

IN.onnx | export dir ─ load ─ clean up ─ fuse ─ lower ─ retained-state KV ─ verify ─ OUT.onnx
                                                                               + OUT.kvfuse.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
from pathlib import Path

import onnx
import onnx_ir as ir
from onnxscript import optimizer

from kvfuse import quantization
from kvfuse.errors import KvfuseError
from kvfuse.files import staged_file
from kvfuse.model_files import (
    INLINE_WEIGHTS_LIMIT,
    copy_companions,
    load_model,
    metadata_record,
    release_weights,
    save_model,
    stamp_metadata,
    static_layout,
    widened_copies,
    write_sidecar,
    write_static,
)
from kvfuse.patterns import targets
from kvfuse.plan import Plan, check_dtype, check_genai_request, make_plan
from kvfuse.progress import Steps, quiet_logs
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
    WIDENED,
    Verification,
    locate_divergence,
    prefill_outputs,
    verify,
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
    plan = make_plan(source, output, target, max_context, batch_size, logits, static, prefill_len)
    plan = dataclasses.replace(plan, quant=quantization.as_options(quantize))
    if plan.quant is not None:
        plan.quant.check(target)
    plan = dataclasses.replace(plan, dtype=check_dtype(target, dtype))
    if plan.quant is not None and plan.dtype is not None:
        raise KvfuseError(f"--quantize with --target {target} is not built yet; use ort or onnx")
    if genai_config:
        check_genai_request(plan)
    steps = Steps(quiet)
    with steps.step(f"Loading {plan.model_path.name}"):
        model = load_model(plan.model_path, in_memory=plan.static)
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
            save_model(model, candidate)
            release_weights(model)
            del model  # from here on the written files are what is checked: one model at a time
        if target == "onnx":
            with steps.step("Checking the model with onnx.checker (full check)"):
                static_graphs.check_standard(str(candidate))
        if verify_numerics and plan.quant is None:
            with steps.step("Verifying against the original (prefill + 8 decode steps)"):
                _verify(plan, result, candidate)
        if plan.quant is not None:  # a gate past --max-kld raises here: nothing is written
            written = onnx.load(str(candidate)).SerializeToString()  # weights read in
            _check_quantized(plan, result, written, written, verify_numerics, steps)
        write_sidecar(staging / f"{plan.output.stem}.kvfuse.json", plan.model_path, result)
        copy_companions(plan.model_path, staging, plan.output.parent)
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
        result.shared_weights = write_static(plan.output, pair, plan.model_path, result, overwrite)
        result.output = plan.output.parent / result.signature.static["graphs"]["decode"]
    return result


def _fuse(model: ir.Model, plan: Plan, steps: Steps) -> OptimizeResult:
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


def _lower(model: ir.Model, plan: Plan, result: OptimizeResult) -> None:
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
    signature.dtype = plan.dtype or _kv_dtype(model, signature)
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
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    signature.logits_dtype = _dtype_name(logits.dtype) if plan.dtype is None else "float32"
    stamp_metadata(model, signature, plan.target, plan.model_path)
    result.nodes_after, result.ops_after = pipeline.count_nodes(model), pipeline.op_histogram(model)
    result.signature = signature


def _kv_dtype(model: ir.Model, signature) -> str:
    """The KV buffers' type as the metadata names it: what a float16/bfloat16 export keeps."""
    past = next((v for v in model.graph.inputs if v.name == signature.pairs[0][0]), None)
    return _dtype_name(past.dtype if past is not None else None)


def _dtype_name(dtype) -> str:
    names = {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
    return names.get(dtype, "float32")


def _verify(plan: Plan, result: OptimizeResult, candidate) -> None:
    """Check `candidate` (a written model file, or the static pair) against the original; on
    failure name the first diverging tensor and raise — nothing is written."""
    signature, batch = result.signature, plan.batch_size or 1
    kv_shape = [batch, signature.kv_heads, plan.max_context, signature.head_dim]
    with _runnable_here(plan, signature, candidate) as (original, candidate):
        result.verification = verify(original, candidate, signature.pairs, kv_shape, batch=batch)
        if signature.dtype == "bfloat16":
            result.verification.arithmetic = WIDENED
        if not result.verification.passed:
            where = locate_divergence(original, candidate, signature.pairs, kv_shape)
            raise KvfuseError(
                f"{result.verification.summary()}; {where or 'no shared tensor to compare'}; "
                "nothing was written"
            )


@contextlib.contextmanager
def _runnable_here(plan: Plan, signature, candidate):
    """The original and the candidate as this CPU can run them: bfloat16 ones widened to
    float32 (no bf16 kernels on onnxruntime's CPU provider), others as written."""
    if signature.dtype != "bfloat16":
        yield plan.model_path, candidate
        return
    with widened_copies(plan.model_path, candidate, plan.output.parent) as pair:
        yield pair


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
            save_model(model, candidate, mapped=False)  # read back whole, then replaced
            release_weights(model)
            del model
        if verify_numerics:
            with steps.step("Verifying the float32 rewrite against the original"):
                _verify(plan, result, candidate)
            result.rewrite_verification = result.verification
        half = _to_half(plan, result, onnx.load(str(candidate)).SerializeToString(), steps)
        with steps.step(f"Writing {plan.output}"):
            candidate.write_bytes(half)  # inline: the float32 rewrite's weights file goes
            (staging / f"{candidate.name}.data").unlink(missing_ok=True)
        write_sidecar(staging / f"{plan.output.stem}.kvfuse.json", plan.model_path, result)
        copy_companions(plan.model_path, staging, plan.output.parent)
    result.output = plan.output
    return result


def _to_half(plan: Plan, result: OptimizeResult, lowered: bytes, steps) -> bytes:
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


class _CallableModule(types.ModuleType):
    """`import kvfuse.optimize` binds this module to the package attribute `kvfuse.optimize`,
    shadowing the public function of the same name; calling the module calls the function, so
    `kvfuse.optimize(...)` works whichever was imported first."""

    def __call__(self, *args, **kwargs) -> OptimizeResult:
        return optimize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
