"""The optimize pipeline's file side: read the input with its external weights mapped, write the
output (its weights in one page-aligned data file beside it, which onnxruntime maps), the
metadata the runtime reads, the OUT.kvfuse.json sidecar, a static pair over one weights file,
and the tokenizer companions."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from kvfuse import __version__
from kvfuse.checks import check_model_file
from kvfuse.errors import KvfuseError
from kvfuse.exporters.metadata import read_metadata
from kvfuse.files import staged_file
from kvfuse.report.summary import load_structure
from kvfuse.rewriter import static as static_graphs
from kvfuse.rewriter.widen import widen_bfloat16

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


def resolve_input(source: Path) -> tuple[Path, dict | None]:
    if source.is_dir():
        model_path = source / "model.onnx"
        if not model_path.is_file():
            raise KvfuseError(f"{source} has no model.onnx; give an .onnx file or an export dir")
        return model_path, read_metadata(source)
    if not source.exists():
        raise KvfuseError(f"{source} does not exist; give an .onnx file or an export directory")
    return source, read_metadata(source.parent)


def load_model(model_path: Path, in_memory: bool = False) -> ir.Model:
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
    external = [v for v in model.graph.initializers.values() if is_external(v.const_value)]
    if in_memory and external:
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values())
        if size >= PROTOBUF_LIMIT:
            raise KvfuseError(
                f"{model_path} has {size / 2**30:.1f} GiB of weights; a static pair is built "
                "in memory as one protobuf (< 2 GiB): optimize without --static"
            )
        ir.external_data.load_to_model(model)
    return model


def is_external(tensor) -> bool:
    return isinstance(tensor, ir.ExternalTensor)


def save_model(model: ir.Model, path: Path, mapped: bool = True) -> None:
    """Write `model` to `path` with its weights in one file beside it, `<name>.data`, at
    page-aligned offsets, written tensor by tensor from wherever they are: onnxruntime then maps
    them from the file instead of holding the protobuf and a copy of every tensor, and the
    originals of weights a kernel pre-packs are let go (SmolLM2 int4, the benchmark's worker:
    peak RSS 447 → 388 MB). `mapped=False` keeps them inline when they fit one protobuf (a file
    read back into memory whole right away)."""
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value]
    size = sum(t.nbytes for t in tensors)
    inline_fits = size < INLINE_WEIGHTS_LIMIT and not any(is_external(t) for t in tensors)
    if not mapped and inline_fits:
        ir.save(model, path)
        return
    ir.save(
        model,
        path,
        external_data=f"{path.name}.data",
        size_threshold_bytes=EXTERNAL_MIN_BYTES,
        alignment=DATA_ALIGNMENT,
    )


@contextlib.contextmanager
def widened_copies(original: Path, candidate, folder: Path):
    """`original` and `candidate` (a model file, or a static pair {length: proto}) with their
    bfloat16 widened to float32 (`kvfuse.rewriter.widen`), for verification on a CPU without
    bfloat16 kernels: written to a temporary folder inside `folder` (removed on exit), their
    weights read from the input files one tensor at a time."""
    with tempfile.TemporaryDirectory(prefix=".kvfuse-widened-", dir=folder) as scratch:
        widened_original = _widened_file(original, Path(scratch) / "original")
        if isinstance(candidate, dict):
            yield widened_original, {k: _widened_proto(p) for k, p in candidate.items()}
        else:
            yield widened_original, _widened_file(Path(candidate), Path(scratch) / "rewritten")


def _widened_file(path: Path, folder: Path) -> Path:
    folder.mkdir()
    model = ir.load(path)
    widen_bfloat16(model)
    save_model(model, folder / path.name)
    release_weights(model)
    return folder / path.name


def _widened_proto(proto):
    model = ir.serde.deserialize_model(proto)
    widen_bfloat16(model)
    return ir.serde.serialize_model(model)


def release_weights(model: ir.Model) -> None:
    """Unmap the input's weight file (the model is not used after this)."""
    for value in model.graph.initializers.values():
        if is_external(value.const_value):
            value.const_value.release()


def stamp_metadata(model, signature, target, source) -> None:
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
        "logits_dtype": signature.logits_dtype,
        "kv_pairs": [{"past": p, "present": q} for p, q in signature.pairs],
        **({"static": signature.static} if signature.static else {}),
        "inputs": signature.inputs,
        "feeds": {
            "seqlens_k": "int32 [batch]: valid positions − 1 per row, after this step",
            "total_sequence_length": "int32 scalar: max valid positions after this step",
            "position_ids": "int64 [batch, S] positions of the new tokens (if an input)",
        },
    }


def write_static(output: Path, pair: dict, source: Path, result, overwrite: bool):
    """OUT.prefill.onnx + OUT.decode.onnx over one OUT.weights; OUT.kvfuse.json is the
    file that lands last (the pair is complete once it exists)."""
    layout = result.signature.static
    sidecar = output.with_suffix(".kvfuse.json")
    with staged_file(sidecar, overwrite=overwrite, inputs=[source]) as staging:
        shared = static_graphs.write_shared(pair, staging / layout["weights"])
        for role, proto in pair.items():
            (staging / layout["graphs"][role]).write_bytes(proto.SerializeToString())
        write_sidecar(staging / sidecar.name, source, result, shared)
        copy_companions(source, staging, output.parent)
    return shared


def write_sidecar(path: Path, source: Path, result, shared=None) -> None:
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


def copy_companions(source: Path, staging: Path, destination: Path) -> None:
    for name in COMPANION_FILES:
        if (source.parent / name).is_file() and not (destination / name).exists():
            shutil.copyfile(source.parent / name, staging / name)
