"""File in, file out: read an exported model, rewrite it for a target, verify, write atomically.

IN.onnx | export dir ─ load ─ clean up ─ fuse ─ lower ─ retained-state KV ─ verify ─ OUT.onnx
                                                                               + OUT.kvfuse.json
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import onnx_ir as ir
from onnxscript import optimizer

from kvfuse import __version__
from kvfuse.errors import KvfuseError
from kvfuse.exporters.metadata import read_metadata
from kvfuse.files import staged_file
from kvfuse.patterns import targets
from kvfuse.progress import Steps
from kvfuse.report.summary import load_structure
from kvfuse.rewriter import pipeline, retained_state, shapes
from kvfuse.rewriter.last_logits import gather_last_logits
from kvfuse.rewriter.pipeline import Stage
from kvfuse.rewriter.verify import Verification, locate_divergence, verify

TARGETS = ("ort",)
DEFAULT_MAX_CONTEXT = 2048
PROTOBUF_LIMIT = 2**31
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


def optimize(
    source: str | Path,
    output: str | Path,
    *,
    target: str = "ort",
    max_context: int | None = None,
    batch_size: int | None = None,
    logits: str = "last",
    verify_numerics: bool = True,
    overwrite: bool = False,
    quiet: bool = False,
) -> OptimizeResult:
    """Rewrite an exported ONNX LLM into fused attention with a fixed-size in-place KV cache.

    Args:
        source: an `.onnx` file, or a directory written by `kvfuse export`.
        output: the `.onnx` file to write (refused if it exists unless `overwrite`).
        target: "ort" (onnxruntime contrib ops).
        max_context: KV buffer length; default min(model's max positions, 2048).
        batch_size: make the batch dim static.
        logits: "last" computes logits for each row's last position only (what generation
            reads); "all" keeps logits for every position.
        verify_numerics: compare against the original before writing (default on).
        overwrite: replace an existing output (never the input).
        quiet: no progress display.

    Returns:
        An `OptimizeResult`; the output is written only if every attention layer fused and
        verification passed (a `KvfuseError` says why otherwise).
    """
    if logits not in ("last", "all"):
        raise KvfuseError(f"logits must be 'last' or 'all', not {logits!r}")
    if target not in TARGETS:
        raise KvfuseError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    steps = Steps(quiet)
    model_path, export_info = _resolve_input(Path(source))
    output = Path(output)
    if output.suffix != ".onnx":
        raise KvfuseError(f"output {output} must be an .onnx file path")
    max_context = max_context or _default_context(export_info)
    with steps.step(f"Loading {model_path.name}"):
        model = _load(model_path)
    before_nodes, before_ops = pipeline.count_nodes(model), pipeline.op_histogram(model)
    candidates = pipeline.attention_candidates(model)
    if not candidates:
        raise KvfuseError(f"{model_path} has no attention (no Softmax); nothing to fuse")
    with steps.step("Cleaning up shape plumbing"):
        specialize = Stage("fix batch size", run=lambda m: shapes.specialize_batch(m, batch_size))
        records = pipeline.run_stages(model, [specialize, Stage("clean up", run=_clean_up)])
    with steps.step("Fusing attention, RoPE and norms"):
        records += pipeline.run_stages(model, targets.FUSION_STAGES)
    layers = pipeline.attention_outcomes(model, candidates, targets.EXPLAIN_RULES, targets.DIAGNOSE)
    result = OptimizeResult(
        None,
        target,
        before_nodes,
        pipeline.count_nodes(model),
        before_ops,
        pipeline.op_histogram(model),
        records,
        layers,
        None,
        None,
    )
    if result.fused_layers < len(layers):
        raise PartialFusion(result)
    with steps.step(f"Lowering to {target} with fixed {max_context}-position KV buffers"):
        records += pipeline.run_stages(model, targets.ORT_LOWERING)
        window = (export_info or {}).get("model", {}).get("sliding_window")
        signature = retained_state.convert_to_retained_state(
            model, max_context, batch_size, sliding_window=window
        )
        records += pipeline.run_stages(model, targets.ORT_FINISHING)
        if logits == "last":
            records += pipeline.run_stages(
                model, [Stage("logits for the last position", run=gather_last_logits)]
            )
            logits = "last" if records[-1].counts["logits/last_position"] else "all"
        records += pipeline.run_stages(model, [Stage("final clean up", run=_clean_up)])
    signature.logits = logits
    _stamp_metadata(model, signature, target, model_path)
    result.nodes_after, result.ops_after = pipeline.count_nodes(model), pipeline.op_histogram(model)
    result.signature = signature
    proto_bytes = ir.serde.serialize_model(model).SerializeToString()
    if verify_numerics:
        with steps.step("Verifying against the original (prefill + 8 decode steps)"):
            kv_shape = [batch_size or 1, signature.kv_heads, max_context, signature.head_dim]
            result.verification = verify(
                model_path, proto_bytes, signature.pairs, kv_shape, batch=batch_size or 1
            )
        if not result.verification.passed:
            where = locate_divergence(model_path, proto_bytes, signature.pairs, kv_shape)
            raise KvfuseError(
                f"{result.verification.summary()}; {where or 'no shared tensor to compare'}; "
                "nothing was written"
            )
    with steps.step(f"Writing {output}"):
        _write(output, proto_bytes, model_path, result, overwrite)
    result.output = output
    return result


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


def _resolve_input(source: Path) -> tuple[Path, dict | None]:
    if source.is_dir():
        model_path = source / "model.onnx"
        if not model_path.is_file():
            raise KvfuseError(f"{source} has no model.onnx; give an .onnx file or an export dir")
        return model_path, read_metadata(source)
    if not source.exists():
        raise KvfuseError(f"{source} does not exist; give an .onnx file or an export directory")
    return source, read_metadata(source.parent)


def _default_context(export_info: dict | None) -> int:
    positions = (export_info or {}).get("model", {}).get("max_positions")
    return min(positions, DEFAULT_MAX_CONTEXT) if positions else DEFAULT_MAX_CONTEXT


def _load(model_path: Path) -> ir.Model:
    proto = load_structure(model_path)  # one-line error for a missing or corrupt file
    _check_external_data(model_path, proto)
    del proto  # ir.load reads it again, with its weights; keep one copy in memory at a time
    model = ir.load(model_path)
    # the rewritten model is verified and written as one protobuf: weights kept in a file
    # beside the input (dynamo and Optimum exports above 2 GB) are read into memory first
    if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values())
        if size >= PROTOBUF_LIMIT:
            raise KvfuseError(
                f"{model_path} has {size / 2**30:.1f} GiB of weights; kvfuse writes one "
                "protobuf (< 2 GiB) and cannot rewrite models this large yet"
            )
        ir.external_data.load_to_model(model)
    return model


def _check_external_data(model_path: Path, proto) -> None:
    """Refuse external-data locations outside the model's directory (untrusted input)."""
    root = model_path.parent.resolve()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                location = (root / entry.value).resolve()
                if root not in location.parents:
                    raise KvfuseError(
                        f"{model_path} points its weights outside its directory "
                        f"({entry.value}); refusing to read it"
                    )


def _clean_up(model: ir.Model) -> dict[str, int]:
    """Constant folding, dead code removal, and resolving the shape plumbing.

    (Not onnxscript's full `optimize`: its default rewrite rules include multi-output patterns
    whose matcher scans the whole graph per attempt — minutes on a 7,000-node export.)"""
    optimizer.fold_constants(model)
    optimizer.remove_unused_nodes(model)
    folded = shapes.resolve_shapes(model)
    axes = shapes.canonicalize_concat_axes(model.graph)
    slices = shapes.remove_full_slices(model.graph)
    reshapes = shapes.remove_identity_reshapes(model.graph)
    heads = shapes.split_heads_after_projection(model.graph)
    optimizer.remove_unused_nodes(model)
    return {
        "shape/static_dims": folded,
        "shape/concat_axes": axes,
        "shape/full_slices": slices,
        "shape/identity_reshapes": reshapes,
        "shape/heads_after_projection": heads,
    }


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
        "kv_pairs": [{"past": p, "present": q} for p, q in signature.pairs],
        "inputs": signature.inputs,
        "feeds": {
            "seqlens_k": "int32 [batch]: valid positions − 1 per row, after this step",
            "total_sequence_length": "int32 scalar: max valid positions after this step",
            "position_ids": "int64 [batch, S] positions of the new tokens (if an input)",
        },
    }


def _write(output: Path, proto_bytes: bytes, source: Path, result, overwrite: bool) -> None:
    with staged_file(output, overwrite=overwrite, inputs=[source]) as staging:
        (staging / output.name).write_bytes(proto_bytes)
        sidecar = {
            **metadata_record(result.signature, result.target, source),
            "rule_counts": result.rule_counts,
            "nodes_before": result.nodes_before,
            "nodes_after": result.nodes_after,
        }
        if result.verification is not None:
            sidecar["verification"] = dataclasses.asdict(result.verification)
        (staging / f"{output.stem}.kvfuse.json").write_text(json.dumps(sidecar, indent=2))
        for name in COMPANION_FILES:
            if (source.parent / name).is_file() and not (output.parent / name).exists():
                shutil.copyfile(source.parent / name, staging / name)
