"""The quantize stage of `kvfuse optimize`: options, the stage itself, its two checks.

1. The rewrite is exact: the quantized graph (MatMulNBits at accuracy level 0, fp32
   activations) against the original whose weights are replaced by their dequantized values,
   at the usual verification tolerance, greedy tokens equal.
2. The quantization is good: the model as written against the unquantized original,
   teacher-forced over `pydoc_data.topics` (`rewriter.quality`); a mean KL divergence above
   `max_kld` refuses the write unless `force`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from kvfuse.errors import KvfuseError
from kvfuse.patterns import quantize as rules
from kvfuse.patterns.blocks import check_block_size, quantize_rtn
from kvfuse.rewriter import quality
from kvfuse.rewriter.pipeline import Stage
from kvfuse.rewriter.rules import REPLACED_TAG
from kvfuse.rewriter.verify import Verification, cache_shapes, verify

MODES = ("int4", "int8", "gguf")
HEADS = {"int8": 8, "int4": 4, "float": None}
DEFAULT_MAX_KLD = 0.5  # SmolLM2-135M int4 measures ~0.25; a broken kernel or head measures > 1
QUALITY_TOKENS = 2048


@dataclasses.dataclass(frozen=True)
class Quantize:
    """`--quantize` and its options.

    mode: "int4" / "int8" (round-to-nearest per block) or "gguf" (the source GGUF's blocks);
    block_size: along K; accuracy_level: MatMulNBits' (4: int8 activations, fast; 0: fp32);
    head: bits of the LM head and embedding ("int8", "int4", "float"); exclude: node-name
    patterns kept fp32; max_kld: mean KLD above which nothing is written unless `force`;
    quality_tokens: tokens of text the quality is measured over; zero_points: round-to-nearest
    asymmetric, a zero point per block (the default: closer to the weights), else symmetric
    (no zero-point input: MatMulNBits ~20–30% faster on this CPU, a little less accurate)."""

    mode: str
    block_size: int = 32
    accuracy_level: int = 4
    head: str = "int8"
    exclude: tuple[str, ...] = ()
    max_kld: float = DEFAULT_MAX_KLD
    force: bool = False
    quality_tokens: int = QUALITY_TOKENS
    zero_points: bool = True

    def check(self, target: str) -> None:
        if self.mode not in MODES:
            raise KvfuseError(f"--quantize {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.head not in HEADS:
            raise KvfuseError(f"--head {self.head!r}: choose one of {', '.join(HEADS)}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise KvfuseError(f"--accuracy-level {self.accuracy_level}: use 0 to 4")
        check_block_size(self.block_size)
        if self.mode == "gguf" and self.block_size != 32:
            raise KvfuseError("--quantize gguf keeps the file's blocks of 32; drop --block-size")


def as_options(quantize) -> Quantize | None:
    """`quantize` given as a mode name, a `Quantize`, or None."""
    if quantize is None or isinstance(quantize, Quantize):
        return quantize
    return Quantize(str(quantize))


def spec_for(options: Quantize, export_info: dict | None) -> rules.QuantSpec:
    """The rule's spec; for "gguf" with the source file's blocks."""
    bits = 8 if options.mode == "int8" else 4
    source = None
    if options.mode == "gguf":
        from kvfuse.patterns.gguf_blocks import GGUFBlocks

        source = GGUFBlocks(gguf_source(export_info))
    return rules.QuantSpec(
        bits,
        options.block_size,
        HEADS[options.head],
        tuple(options.exclude),
        source,
        options.zero_points,
    )


def gguf_source(export_info: dict | None) -> Path:
    """The GGUF file an export was made from (kvfuse-export.json's `source`)."""
    source = (export_info or {}).get("source") or {}
    if source.get("kind") == "default":
        from kvfuse.exporters.default_model import default_gguf_path

        return default_gguf_path()
    if source.get("kind") == "gguf" and Path(source.get("path", "")).is_file():
        return Path(source["path"])
    kind = source.get("kind", "unknown")
    raise KvfuseError(
        f"--quantize gguf needs an export made from a GGUF file (this one's source: {kind}"
        f"{', ' + source['path'] + ' is gone' if source.get('kind') == 'gguf' else ''}); "
        "use --quantize int4 or int8"
    )


def stages(spec: rules.QuantSpec, lower, accuracy_level: int) -> list[Stage]:
    """The quantize stage and the target's lowering of its ops."""
    return [
        Stage("quantize weights in blocks", run=lambda m: rules.quantize_weights(m, spec)),
        Stage("lower quantized ops", run=lambda m: lower(m, accuracy_level)),
    ]


def at_level(candidate, level: int):
    """`candidate` (bytes, or a static pair of protos) with every MatMulNBits at `level`."""
    if isinstance(candidate, dict):
        return {
            k: _set_level(onnx.ModelProto.FromString(v.SerializeToString()), level)
            for k, v in candidate.items()
        }
    return _set_level(onnx.load_from_string(candidate), level).SerializeToString()


def _set_level(proto: onnx.ModelProto, level: int) -> onnx.ModelProto:
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = level
    return proto


def dequantized_original(model_path: Path, records: list[dict]) -> bytes:
    """The original model with every weight the quantized graph holds in blocks replaced by
    its dequantized value (round-to-nearest blocks recomputed per original weight: blocks run
    along K, so packing or re-ordering output features leaves each row's blocks alone)."""
    proto = onnx.load(str(model_path))
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    by_name = {node.name: node for node in graph.node}
    done: set[str] = set()
    for record in records:
        if record["source"] != "rtn":
            continue  # a GGUF's own blocks: already checked to equal the export bit for bit
        for name, _op in record["replaced"]:
            node = by_name.get(name)
            located = _weight_of(node, inits, producers) if node is not None else None
            if located is None or located[0] in done:
                continue
            weight, rows_are_n = located
            array = numpy_helper.to_array(inits[weight]).astype(np.float32)
            weight_NK = array if rows_are_n else array.T
            blocks = quantize_rtn(
                weight_NK, record["bits"], record["block_size"], not record["symmetric"]
            )
            values = blocks.dequantize()
            new = values if rows_are_n else values.T
            inits[weight].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), weight))
            done.add(weight)
    return proto.SerializeToString()


def _weight_of(node, inits, producers) -> tuple[str, bool] | None:
    """(initializer, whether its rows are output features) a MatMul or Gather reads."""
    if node.op_type == "Gather" and node.input[0] in inits:
        return node.input[0], True
    if node.op_type != "MatMul":
        return None
    b = node.input[1]
    if b in inits:
        return b, False
    transpose = producers.get(b)
    if transpose is not None and transpose.op_type == "Transpose" and transpose.input[0] in inits:
        return transpose.input[0], True
    return None


def records_of(model) -> list[dict]:
    """Per quantized node: its record plus the input-graph nodes it stands for."""
    out = []
    for node in model.graph:
        if rules.QUANT_TAG in node.metadata_props:
            record = json.loads(node.metadata_props[rules.QUANT_TAG])
            replaced = json.loads(node.metadata_props.get(REPLACED_TAG, "[]"))
            out.append({"node": node.name, "op": node.op_type, **record, "replaced": replaced})
    return out


def verify_exact(model_path, candidate, records, pairs, kv_shape, batch: int) -> Verification:
    """Check 1: the rewrite against the dequantized original, at fp32 activations."""
    reference = dequantized_original(model_path, records)
    return verify(reference, at_level(candidate, 0), pairs, kv_shape, batch=batch)


def measure_quality(options: Quantize, model_path: Path, candidate: bytes, pairs, kv_shape):
    """Check 2 at the level written (and, for "gguf" at level 4, also at level 0)."""
    ids = _text_ids(model_path.parent, options.quality_tokens)
    window = min(512, next(iter(cache_shapes(pairs, kv_shape).values()))[2])  # max_context
    levels = [options.accuracy_level]
    if options.mode == "gguf" and options.accuracy_level != 0:
        levels.append(0)
    return [
        quality.measure(
            model_path,
            at_level(candidate, level),
            pairs,
            kv_shape,
            ids,
            window=window,
            accuracy_level=level,
        )
        for level in levels
    ]


def _text_ids(directory: Path, tokens: int) -> list[int]:
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise KvfuseError(
            f"{directory} has no tokenizer.json to measure quantization quality with; "
            "quantize a `kvfuse export` directory"
        )
    return Tokenizer.from_file(str(path)).encode(quality.reference_text()[1]).ids[:tokens]


def summary(options: Quantize, records, exact: Verification | None, measured) -> dict:
    """The figures kept in OUT.kvfuse.json and the report."""
    first = measured[0]
    weights = {r["weight"]: r for r in records}  # a tied table counts once
    return {
        # the figures the report's verdict card reads (kvfuse.report.digest)
        "scheme": options.mode,
        "bits": sorted({r["bits"] for r in records}),
        "mean_kld": first.kld_mean,
        "p99_kld": first.kld_p99,
        "p999_kld": first.kld_p999,
        "same_top1": first.same_top1,
        "perplexity_before": first.perplexity_original,
        "perplexity_after": first.perplexity_quantized,
        "tokens": first.tokens,
        "kld": first.kld_by_position,
        "passed": first.kld_mean <= options.max_kld,
        "mode": options.mode,
        "block_size": options.block_size,
        "accuracy_level": options.accuracy_level,
        "head": options.head,
        "zero_points": options.zero_points,
        "exclude": list(options.exclude),
        "max_kld": options.max_kld,
        "forced": bool(options.force and first.kld_mean > options.max_kld),
        "nodes": [{k: v for k, v in r.items() if k != "replaced"} for r in records],
        "fallbacks": [
            {"node": r["node"], "reason": r["fallback"]} for r in records if r.get("fallback")
        ],
        "fp32_bytes": sum(r["fp32_bytes"] for r in weights.values()),
        "bytes": sum(r["bytes"] for r in weights.values()),
        "exact": dataclasses.asdict(exact) if exact is not None else None,
        "quality": [dataclasses.asdict(q) for q in measured],
    }


def gate(options: Quantize, measured) -> str | None:
    """None if the quality is within `max_kld`; a warning if forced; else raises."""
    kld = measured[0].kld_mean
    if kld <= options.max_kld:
        return None
    message = f"mean KLD {kld:.4f} exceeds --max-kld {options.max_kld}"
    if not options.force:
        raise KvfuseError(f"{message}; nothing was written (--force writes it anyway)")
    return f"{message}; written anyway (--force)"
