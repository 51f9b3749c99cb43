"""Graph diff of two ONNX models: what changed, which rule did it, what did not fuse, and
whether the numbers held. Each model is parsed once (external weights are never loaded).

The report is a plain dict following `schema.json` (`SCHEMA`), rendered by `render`.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

import onnx

from kvfuse import __version__
from kvfuse.checks import check_model_file
from kvfuse.report.summary import bytes_on_disk, load_structure
from kvfuse.rewriter.pipeline import layer_of
from kvfuse.rewriter.rules import REPLACED_TAG, RULE_TAG

SCHEMA = "kvfuse.report/1"
_BYTES = {
    onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.BFLOAT16: 2,
    onnx.TensorProto.INT64: 8,
    onnx.TensorProto.INT32: 4,
    onnx.TensorProto.INT8: 1,
    onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.DOUBLE: 8,
}


def diff(a: str | Path, b: str | Path) -> dict:
    """`kvfuse.diff(a, b)`: the graph diff report of two ONNX models (see `schema.json`)."""
    return build_report(Path(a), Path(b))


def build_report(a: Path, b: Path, optimize_result: Any = None) -> dict:
    """Compare model `a` (before) with `b` (after).

    Args:
        a: the model before (e.g. an export).
        b: the model after.
        optimize_result: the `OptimizeResult` that wrote `b`: adds layers, near misses, each
            layer's lowering, quantization and the verification figures. Without it, the
            verification recorded in `b`'s OUT.kvfuse.json sidecar is used when there is one.

    Returns:
        The report dict (see `schema.json`).
    """
    model_a, model_b = load_structure(Path(a)), load_structure(Path(b))
    check_model_file(Path(a), model_a)  # a damaged file is one line, not a half-made report
    check_model_file(Path(b), model_b)
    report = {
        "schema": SCHEMA,
        "models": {"a": _model_facts(Path(a), model_a), "b": _model_facts(Path(b), model_b)},
        "ops": _op_delta(model_a, model_b),
        "io": _io_diff(model_a, model_b),
        "rewrites": _rewrites(model_b),
        "structural": _structural(model_a, model_b),
        "layers": [],
        "near_misses": [],
        "numerics": None,
        "meta": _meta(model_b),
    }
    report["rewrites_by_rule"] = dict(collections.Counter(r["rule"] for r in report["rewrites"]))
    report["picture"] = _picture(model_a, model_b, report["rewrites"])
    if optimize_result is not None:
        _add_optimize_result(report, optimize_result)
    else:
        report["numerics"] = _sidecar_numerics(Path(b))
    return report


def _model_facts(path: Path, model: onnx.ModelProto) -> dict:
    graph = model.graph
    return {
        "path": str(path),
        "file_bytes": bytes_on_disk(path, model),
        "nodes": len(graph.node),
        "initializers": len(graph.initializer),
        "initializer_bytes": sum(_tensor_bytes(t) for t in graph.initializer),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "op_histogram": dict(collections.Counter(n.op_type for n in graph.node).most_common()),
    }


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * _BYTES.get(tensor.data_type, 4)


def _op_delta(a: onnx.ModelProto, b: onnx.ModelProto) -> list[dict]:
    before = collections.Counter(n.op_type for n in a.graph.node)
    after = collections.Counter(n.op_type for n in b.graph.node)
    ops = sorted(set(before) | set(after), key=lambda op: (-(before[op] + after[op]), op))
    return [
        {"op": op, "a": before[op], "b": after[op], "delta": after[op] - before[op]} for op in ops
    ]


def _dims(value: onnx.ValueInfoProto) -> list:
    return [
        d.dim_param if d.HasField("dim_param") else d.dim_value
        for d in value.type.tensor_type.shape.dim
    ]


def _io_diff(a: onnx.ModelProto, b: onnx.ModelProto) -> dict:
    io = {}
    for kind in ("input", "output"):
        before = {v.name: _dims(v) for v in getattr(a.graph, kind)}
        after = {v.name: _dims(v) for v in getattr(b.graph, kind)}
        rows = []
        for name in list(before) + [n for n in after if n not in before]:
            old, new = before.get(name), after.get(name)
            change = (
                "added"
                if old is None
                else "removed"
                if new is None
                else "reshaped"
                if old != new
                else "same"
            )
            static = [
                i
                for i, (x, y) in enumerate(zip(old or [], new or [], strict=False))
                if isinstance(x, str) and isinstance(y, int)
            ]
            rows.append(
                {"name": name, "change": change, "a": old, "b": new, "became_static": static}
            )
        io[f"{kind}s"] = rows
    metadata = {p.key: p.value for p in b.metadata_props}
    pairs = json.loads(metadata["kvfuse"])["kv_pairs"] if "kvfuse" in metadata else []
    io["aliases"] = [{"input": p["past"], "output": p["present"]} for p in pairs]
    return io


def _rewrites(model: onnx.ModelProto) -> list[dict]:
    rewrites = []
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if RULE_TAG not in props:
            continue
        replaced = json.loads(props.get(REPLACED_TAG, "[]"))
        layer = next((layer_of(name) for name, _ in replaced if layer_of(name)), None)
        rewrites.append(
            {
                "rule": props[RULE_TAG],
                "node": node.name,
                "op_type": node.op_type,
                "layer": layer or layer_of(node.name),
                "replaced": [{"name": name, "op_type": op} for name, op in replaced],
            }
        )
    return rewrites


def _structural(a: onnx.ModelProto, b: onnx.ModelProto) -> dict:
    """Fallback for models kvfuse did not write: nodes present in only one of them, by name
    (or by op type and inputs when unnamed)."""

    def keys(model):
        return {n.name or f"{n.op_type}({','.join(n.input)})": n.op_type for n in model.graph.node}

    before, after = keys(a), keys(b)
    removed = [k for k in before if k not in after]
    added = [k for k in after if k not in before]
    return {
        "removed": len(removed),
        "added": len(added),
        "kept": len(before) - len(removed),
        "removed_by_op": dict(collections.Counter(before[k] for k in removed).most_common()),
        "added_by_op": dict(collections.Counter(after[k] for k in added).most_common()),
        "removed_by_layer": dict(collections.Counter(layer_of(k) or "-" for k in removed)),
    }


def _meta(model: onnx.ModelProto) -> dict:
    """Who wrote the report and when; the target and KV buffers the model's metadata names."""
    metadata = {p.key: p.value for p in model.metadata_props}
    record = json.loads(metadata["kvfuse"]) if "kvfuse" in metadata else {}
    return {
        "kvfuse_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "target": record.get("target"),
        "model_kvfuse_version": record.get("kvfuse_version"),
        "kv": _kv_facts(model, record) if record.get("kv_pairs") else None,
    }


def _kv_facts(model: onnx.ModelProto, record: dict) -> dict:
    """The fixed KV buffers: how many, their shape and dtype, and bytes per batch row."""
    past = record["kv_pairs"][0]["past"]
    value = next((v for v in model.graph.input if v.name == past), None)
    dtype = value.type.tensor_type.elem_type if value is not None else onnx.TensorProto.FLOAT
    width = _BYTES.get(dtype, 4)
    pairs = record["kv_pairs"]
    # each pair's own [Hkv, D]; records where every layer shares them give them once
    shapes = [
        (pair.get("kv_heads", record.get("kv_heads")), pair.get("head_dim", record.get("head_dim")))
        for pair in pairs
    ]
    per_position = sum(heads * dim for heads, dim in shapes)
    uniform = len(set(shapes)) == 1
    return {
        "buffers": len(pairs),
        "batch_size": record.get("batch_size"),
        "kv_heads": shapes[0][0] if uniform else [heads for heads, _ in shapes[::2]],
        "max_context": record["max_context"],
        "head_dim": shapes[0][1] if uniform else [dim for _, dim in shapes[::2]],
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(dtype).name,
        "bytes_per_row": per_position * record["max_context"] * width,
        "in_place": True,
    }


def _plain(value: Any) -> Any:
    """A dataclass or mapping as a JSON-ready dict (paths and other objects as text); other
    values as they are."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return json.loads(json.dumps(value, default=str))
    return value


def _add_optimize_result(report: dict, result: Any) -> None:
    report["meta"]["written"] = result.output is not None
    report["meta"]["target"] = report["meta"]["target"] or result.target
    report["layers"] = [
        {
            "layer": layer.layer,
            "fused": layer.fused,
            "lowering": layer.lowering,
            "lowering_reason": layer.lowering_reason,
        }
        for layer in result.layers
    ]
    quantization = _plain(getattr(result, "quantization", None))
    if quantization:
        report["quantization"] = quantization
    report["near_misses"] = [
        {"layer": layer.layer, **dataclasses.asdict(miss)}
        for layer in result.layers
        if not layer.fused
        for miss in layer.near_misses
    ]
    if result.verification is not None:
        report["numerics"] = _numerics(dataclasses.asdict(result.verification))
    precision = getattr(result, "precision", None)
    if precision is not None:  # a half-precision target: what stayed float32, and why
        rewrite = result.rewrite_verification
        report["precision"] = {
            "dtype": precision.dtype,
            "kept": [dataclasses.asdict(kept) for kept in precision.kept],
            "rewrite_verification": dataclasses.asdict(rewrite) if rewrite else None,
        }


def _numerics(verification: dict, recorded_in: str | None = None) -> dict:
    """The report's numerics from a `Verification` as a dict (its fields, as the optimize
    sidecar stores them)."""
    steps = verification["steps"]
    numerics = {
        "passed": verification["passed"],
        "atol": verification["atol"],
        "rtol": verification["rtol"],
        "max_abs_diff": max(s["max_abs_diff"] for s in steps),
        "tokens_equal": all(s["token_original"] == s["token_rewritten"] for s in steps),
        "prompt_tokens": verification["prompt_tokens"],
        "steps": steps,
        "first_divergence": None,
    }
    if recorded_in is not None:
        numerics["recorded_in"] = recorded_in
    return numerics


def _sidecar_numerics(model_path: Path) -> dict | None:
    """The verification `kvfuse optimize` recorded beside the model it wrote, if any."""
    sidecar = model_path.with_name(f"{model_path.stem}.kvfuse.json")
    try:
        verification = json.loads(sidecar.read_text()).get("verification")
        return _numerics(verification, str(sidecar)) if verification else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no sidecar, or not one kvfuse wrote: the report says "not verified"


def _picture(a: onnx.ModelProto, b: onnx.ModelProto, rewrites: list[dict]) -> dict | None:
    """One layer's attention before (the input nodes its attention op replaced) and after (the
    GroupQueryAttention or Attention node and its neighbours), as node/edge lists for drawing."""
    first = next((r for r in rewrites if r["op_type"].endswith("Attention")), None)
    if first is None:
        return None
    names = {entry["name"] for entry in first["replaced"]}
    before = [n for n in a.graph.node if n.name in names][:80]
    gqa = next(n for n in b.graph.node if n.name == first["node"])
    producers = {out: n for n in b.graph.node for out in n.output}
    after = [producers[i] for i in gqa.input if i in producers] + [gqa]
    after += [n for n in b.graph.node if set(n.input) & set(gqa.output) and n not in after]
    return {
        "layer": first["layer"],
        "rule": first["rule"],
        "before": _drawing(before),
        "after": _drawing(after),
    }


def _drawing(nodes: list[onnx.NodeProto]) -> dict:
    index = {out: i for i, n in enumerate(nodes) for out in n.output}
    edges = sorted({(index[i], j) for j, n in enumerate(nodes) for i in n.input if i in index})
    return {
        "nodes": [{"name": n.name, "op": n.op_type} for n in nodes],
        "edges": [list(edge) for edge in edges],
    }
