"""What an optimized model needs fed: read from its own metadata, nothing else installed.

`kvfuse optimize` stamps a JSON record into the model's `metadata_props["kvfuse"]` (and a
`<name>.kvfuse.json` beside it): the past→present pairs, the buffer shape, the inputs. A static
pair (`--target onnx --static`) is `<name>.prefill.onnx` + `<name>.decode.onnx` over one
`<name>.weights`, named by the record's "static" entry and found through `<name>.kvfuse.json`. The
tokenizer files (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
`generation_config.json`, `kvfuse-export.json`) sit in the same directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import onnx

from kvfuse.checks import check_model_file
from kvfuse.errors import KvfuseError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The retained-state contract of one optimized model."""

    path: Path
    pairs: list[tuple[str, str]]  # (past input, present output): one buffer each
    kv_shapes: list[tuple[int, int]]  # per pair: its buffer's KV heads and head dim
    max_context: int
    batch_size: int | None  # static batch, or None for any
    inputs: list[str]
    vocab_size: int
    last_logits_only: bool  # logits are [B, 1, vocab]: each row's last position
    prefill_path: Path | None = None  # a static pair: the graph of `prefill_len` new tokens
    prefill_len: int | None = None
    weights_path: Path | None = None  # a static pair: the one weights file both graphs read
    dtype: str = "float32"  # the graph's and the KV buffers' precision (logits: float32)
    greedy_output: str | None = None  # int64 [B, 1] ArgMax of the logits (target cuda)
    kv_dtype: str = "float32"  # numpy type of the KV buffers, read from the graph
    # (float16 for fp16 exports and the cuda target)
    logits_dtype: str = "float32"  # numpy type of the logits, read from the graph

    @property
    def directory(self) -> Path:
        return self.path.parent

    def buffer_shapes(self, batch: int) -> list[tuple[int, int, int, int]]:
        """Each KV pair's buffer [batch, Hkv, max_context, D] (its layer's own Hkv and D)."""
        return [(batch, heads, self.max_context, dim) for heads, dim in self.kv_shapes]


def arena_layout(shapes: list[tuple[int, ...]]) -> tuple[list[int], int]:
    """Where each buffer lies in one arena, buffer after buffer (rows of a buffer contiguous).

    Args:
        shapes: each buffer's shape, [B, Hkv, T, D].

    Returns:
        (each buffer's offset in elements, the arena's elements in all).
    """
    offsets, total = [], 0
    for shape in shapes:
        offsets.append(total)
        total += math.prod(shape)
    return offsets, total


def arena_text(shapes: list[tuple[int, ...]]) -> str:
    """The arena's shape for people: [2·layers, B, Hkv, T, D] where every buffer has one
    shape, else each distinct shape with its count ("2 × [1, 2, 64, 16] + 2 × [1, 1, 64, 32]")."""
    counts: dict[tuple[int, ...], int] = {}
    for shape in shapes:
        counts[tuple(shape)] = counts.get(tuple(shape), 0) + 1
    if len(counts) == 1:
        return str([len(shapes), *shapes[0]])
    return " + ".join(f"{count} × {list(shape)}" for shape, count in counts.items())


def find_model(path: str | Path) -> Path:
    """The optimized `.onnx` in `path` (a file, or a directory holding exactly one), or the
    decode graph of a static pair (named by the pair's OUT.onnx, OUT.kvfuse.json, or its dir)."""
    path = Path(path)
    if path.suffix == ".onnx" and not path.exists():
        path = path.with_suffix(".kvfuse.json")  # OUT.onnx of a static pair
    if path.is_file() and path.name.endswith(".kvfuse.json"):
        decode = _static_decode_graph(path)
        if decode is None:
            return path.parent / path.name.replace(".kvfuse.json", ".onnx")
        return decode
    if path.is_file():
        return path
    if not path.is_dir():
        raise KvfuseError(f"{path} does not exist; give an optimized .onnx file or its directory")
    candidates = [p for p in sorted(path.glob("*.onnx")) if p.with_suffix(".kvfuse.json").exists()]
    candidates += [
        decode
        for sidecar in sorted(path.glob("*.kvfuse.json"))
        if (decode := _static_decode_graph(sidecar)) is not None
    ]
    if len(candidates) != 1:
        raise KvfuseError(
            f"{path} holds {len(candidates)} kvfuse-optimized models; name the .onnx file "
            "(or run `kvfuse optimize` first)"
        )
    return candidates[0]


def _static_decode_graph(sidecar: Path) -> Path | None:
    """The decode graph a static pair's sidecar names, or None for a single-graph model."""
    try:
        static = json.loads(sidecar.read_text()).get("static")
        return sidecar.parent / _plain_name(static["graphs"]["decode"]) if static else None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError) as error:
        raise KvfuseError(
            f"{sidecar} is not a readable kvfuse record; re-run kvfuse optimize"
        ) from error


def read_spec(path: str | Path) -> ModelSpec:
    """Read the retained-state contract from an optimized model's metadata."""
    model_path = find_model(path)
    proto = load_header(model_path)
    metadata = {p.key: p.value for p in proto.metadata_props}
    if "kvfuse" not in metadata:
        raise KvfuseError(
            f"{model_path} was not written by `kvfuse optimize` (no kvfuse metadata); "
            "optimize it first"
        )
    try:
        return _spec(model_path, proto, json.loads(metadata["kvfuse"]))
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration, IndexError) as error:
        raise KvfuseError(
            f"the kvfuse record in {model_path} is damaged or edited by hand "
            f"({type(error).__name__}: {str(error)[:80]}); re-run kvfuse optimize"
        ) from error


def load_header(model_path: Path) -> onnx.ModelProto:
    """The model's graph and metadata (not its weights), checked as untrusted input."""
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as error:  # a corrupt or non-ONNX file
        raise KvfuseError(
            f"{model_path} is not a readable ONNX model; re-run kvfuse optimize"
        ) from error
    check_model_file(model_path, proto)
    return proto


def _spec(model_path: Path, proto: onnx.ModelProto, record: dict) -> ModelSpec:
    logits = next(o for o in proto.graph.output if o.name == "logits")
    vocab = logits.type.tensor_type.shape.dim[-1].dim_value
    static = record.get("static") or {}
    directory = model_path.parent
    names = [*static.get("graphs", {}).values(), static.get("weights")] if static else []
    if static:  # either graph of a pair was named: the spec is the pair's
        model_path = directory / _plain_name(static["graphs"]["decode"])
    for name in names:
        if name is not None and not (directory / _plain_name(name)).is_file():
            raise KvfuseError(f"{directory / name} is missing; this static pair is incomplete")
    spec = ModelSpec(
        path=model_path,
        pairs=[(str(p["past"]), str(p["present"])) for p in record["kv_pairs"]],
        kv_shapes=[_pair_shape(p, record) for p in record["kv_pairs"]],
        max_context=_positive(record["max_context"]),
        batch_size=record.get("batch_size") and _positive(record["batch_size"]),
        inputs=[str(name) for name in record["inputs"]],
        vocab_size=_positive(vocab),
        last_logits_only=record.get("logits") == "last",
        prefill_path=directory / _plain_name(static["graphs"]["prefill"]) if static else None,
        prefill_len=static.get("prefill_len") and _positive(static["prefill_len"]),
        weights_path=directory / _plain_name(static["weights"]) if static else None,
        dtype=str(record.get("dtype", "float32")),
        greedy_output=next((o.name for o in proto.graph.output if o.name == "next_token"), None),
    )
    graph_inputs = {v.name: v for v in proto.graph.input}
    graph_outputs = {v.name for v in proto.graph.output}
    for (past, present), shape in zip(spec.pairs, spec.kv_shapes, strict=True):
        if past not in graph_inputs or present not in graph_outputs:
            raise KeyError(f"KV pair {past} → {present} is not in the graph")
        dims = [d.dim_value for d in graph_inputs[past].type.tensor_type.shape.dim]
        if len(dims) != 4 or (dims[1], dims[3]) != shape:
            found = f"[Hkv {dims[1]}, D {dims[3]}]" if len(dims) == 4 else f"rank {len(dims)}"
            raise ValueError(f"{past}: {found} in the graph, [Hkv {shape[0]}, D {shape[1]}] here")
    kv_type = graph_inputs[spec.pairs[0][0]].type.tensor_type.elem_type
    return dataclasses.replace(
        spec,
        kv_dtype=_numpy_name(model_path, kv_type),
        logits_dtype=_numpy_name(model_path, logits.type.tensor_type.elem_type),
    )


def _pair_shape(pair: dict, record: dict) -> tuple[int, int]:
    """A KV pair's (KV heads, head dim): its own, or (records before per-layer shapes) the
    record's one shape for every layer."""
    return (
        _positive(pair.get("kv_heads", record.get("kv_heads"))),
        _positive(pair.get("head_dim", record.get("head_dim"))),
    )


def _numpy_name(path: Path, elem_type: int) -> str:
    """float32 or float16: the types onnxruntime's Python API feeds from numpy on CPU."""
    names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
    if elem_type not in names:
        kind = onnx.TensorProto.DataType.Name(elem_type).lower()
        raise KvfuseError(
            f"{path} keeps its KV cache or logits in {kind}; kvfuse's runtime takes float32 or "
            "float16 models (onnxruntime's CPU provider has no bfloat16 MatMul/attention "
            "kernels; this model is for onnxruntime's CUDA provider, and kvfuse's CUDA runtime "
            "runs float16: optimize with --target cuda for --device cuda)"
        )
    return names[elem_type]


def _positive(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{value!r} is not a positive integer")
    return value


def _plain_name(name) -> str:
    """A file name beside the model (a record cannot point elsewhere)."""
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a file name beside the model")
    return name
