"""Graph-level KV conversion: growing Concat caches → fixed, in-place retained-state buffers.

After the attention rules, each layer is one `CachedAttention` reading `past_key_values.{i}.*`
graph inputs and producing `present.{i}.*` graph outputs. The target's lowering replaces each
(GroupQueryAttention for `ort`, TensorScatter + Attention for `onnx`); the signature changes:

- every past input and present output becomes `[batch, kv_heads, max_context, head_dim]` with
  its own layer's KV heads and head dim (layers may differ), the same buffer updated in place
  (the runtime binds both to one address);
- `seqlens_k` (int32 [batch], valid positions − 1 per row) and `total_sequence_length` (int32
  scalar) are added: they tell the fused op how much of each buffer is real;
- RoPE tables are baked for max_context positions from the model's own builder;
- inputs nothing reads any more (`attention_mask`, and `position_ids` once RoPE is fused) are
  dropped together with the dead mask and RoPE builders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir

from kvfuse.errors import KvfuseError
from kvfuse.rewriter import position_bias, rotary_cache
from kvfuse.rewriter.pipeline import layer_of
from kvfuse.rewriter.rules import (
    KVFUSE_DOMAIN,
    LOWERING_REASON_TAG,
    LOWERING_TAG,
    add_initializer,
)

SEQLENS = "seqlens_k"
TOTAL_LENGTH = "total_sequence_length"


@dataclasses.dataclass
class KVSignature:
    """What the runtime needs to know about the retained-state I/O."""

    pairs: list[tuple[str, str]]  # (past input, present output) sharing one buffer
    kv_heads: int | None  # every layer's, or None where layers differ (see `shapes`)
    head_dim: int | None
    max_context: int
    batch_size: int | None
    inputs: list[str]
    logits: str = "all"  # "last": one position per row
    # per layer: which lowering its attention took and why ({"lowering": kind, "reason": …})
    lowerings: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    static: dict | None = None  # a static pair's files and prefill length
    dtype: str = "float32"  # the KV buffers' (and the graph's) precision
    logits_dtype: str = "float32"  # float32 on half targets; a float16/bfloat16 export's own
    shapes: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # per pair: Hkv, D

    def kv_shapes(self, batch) -> dict[str, list]:
        """Each past input's buffer shape [batch, Hkv, max_context, D] (its layer's own)."""
        return {
            past: [batch, heads, self.max_context, dim]
            for (past, _), (heads, dim) in zip(self.pairs, self.shapes, strict=True)
        }

    def shape_text(self) -> str:
        """The buffers' shape for people: one [B, Hkv, T, D], or each distinct one with its
        layers ("[1, 2, 64, 16] × layer 0, [1, 1, 64, 32] × layer 1")."""
        batch = self.batch_size or "batch"
        layers: dict[tuple[int, int], list[str]] = {}
        for (past, _), shape in zip(self.pairs[::2], self.shapes[::2], strict=True):
            layers.setdefault(shape, []).append(layer_of(past) or past)
        texts = [f"[{batch}, {h}, {self.max_context}, {d}]" for h, d in layers]
        if len(texts) == 1:
            return texts[0]
        names = [", ".join(names) for names in layers.values()]
        return ", ".join(f"{text} × layer {n}" for text, n in zip(texts, names, strict=True))


# (graph, CachedAttention, its old presents, seqlens_k, total_sequence_length, rotary tables
# or None, sliding window or None) → the new (present_k, present_v); supplied by the target
LowerAttention = Callable[..., tuple[ir.Value, ir.Value]]


def convert_to_retained_state(
    model: ir.Model,
    max_context: int,
    batch_size: int | None,
    lower: LowerAttention,
    sliding_window: int | None = None,
) -> KVSignature:
    """Lower every CachedAttention (with the target's `lower`) over fixed buffers and rewrite
    the graph signature.

    `sliding_window` (from the export's facts, e.g. Mistral's) is passed to the lowering when
    it is shorter than the buffers; the dropped mask encoded it."""
    graph = model.graph
    nodes = [n for n in graph if n.domain == KVFUSE_DOMAIN and n.op_type == "CachedAttention"]
    if not nodes:
        raise KvfuseError("no attention layer was fused; nothing to convert (see --explain)")
    _check_one_cache_dtype(nodes)
    batch = batch_size if batch_size is not None else "batch_size"
    seqlens = _add_input(graph, SEQLENS, ir.DataType.INT32, [batch])
    total = _add_input(graph, TOTAL_LENGTH, ir.DataType.INT32, [])
    caches: dict[tuple[str, str], tuple[ir.Value, ir.Value]] = {}
    pairs, lowerings, shapes = [], {}, []
    # read every layer's window and position bias before any lowering changes the cache
    # shapes their builders read
    windows = [_layer_window(graph, node, max_context, sliding_window) for node in nodes]
    slopes: dict[str, ir.Value] = {}
    for node in nodes:
        _bake_position_bias(graph, node, max_context, slopes)
    for node, window in zip(nodes, windows, strict=True):
        rotary = _rotary_caches(graph, node, max_context, caches)
        past_k, past_v = node.inputs[3], node.inputs[4]
        kv_heads = node.attributes.get_int("kv_num_heads")
        # D is last in every value cache; a key may be cached pre-transposed, [B, Hkv, D, T]
        head_dim = past_v.shape[-1]
        presents = (_present_of(past_k), _present_of(past_v))
        new_presents = lower(graph, node, presents, seqlens, total, rotary, window)
        lowerings[layer_of(past_k.name) or past_k.name] = _lowering_of(new_presents[0])
        for past, present in zip((past_k, past_v), new_presents, strict=True):
            fixed = ir.Shape([batch, kv_heads, max_context, head_dim])
            past.shape, present.shape = fixed, ir.Shape(fixed)
            present.dtype = past.dtype
            pairs.append((past.name, present.name))
            shapes.append((kv_heads, head_dim))
    _remove_dead(model)
    uniform = shapes[0] if len(set(shapes)) == 1 else (None, None)
    return KVSignature(
        pairs=pairs,
        kv_heads=uniform[0],
        head_dim=uniform[1],
        shapes=shapes,
        max_context=max_context,
        batch_size=batch_size,
        inputs=[v.name for v in graph.inputs],
        lowerings=lowerings,
    )


def _check_one_cache_dtype(nodes: list[ir.Node]) -> None:
    """Layers may differ in KV heads and head dim (each buffer has its own shape), but the
    runtime plans one element type for the arena: refuse, naming them, layers whose caches
    differ in type (before anything is lowered or written)."""
    types = {}
    for node in nodes:
        past_v = node.inputs[4]
        types[layer_of(past_v.name) or past_v.name] = past_v.dtype
    if len(set(types.values())) > 1:
        found = ", ".join(
            f"layer {layer} {dtype.name if dtype is not None else 'untyped'}"
            for layer, dtype in types.items()
        )
        raise KvfuseError(
            f"layers keep their KV caches in different types ({found}); kvfuse's KV arena "
            "holds one type for every layer: export the model in one precision"
        )


def _lowering_of(present: ir.Value) -> dict[str, str]:
    """The lowering kind and reason the target recorded on the op writing a present buffer."""
    props = present.producer().metadata_props if present.producer() is not None else {}
    return {"lowering": props.get(LOWERING_TAG, ""), "reason": props.get(LOWERING_REASON_TAG, "")}


def _present_of(past: ir.Value) -> ir.Value:
    """The graph output a past input is concatenated into (its `present` twin)."""
    for user, _ in past.uses():
        if user.op_type == "Concat" and user.outputs[0].is_graph_output():
            return user.outputs[0]
    raise KvfuseError(f"cache input {past.name} has no Concat into a graph output")


def _add_input(graph: ir.Graph, name: str, dtype: ir.DataType, dims: list) -> ir.Value:
    if any(v.name == name for v in graph.inputs):
        raise KvfuseError(f"the model already has an input named {name}; cannot add it")
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))
    graph.inputs.append(value)
    return value


def _rotary_caches(graph, node, max_context, caches):
    """Baked [max_context, D/2] cos/sin initializers for a node with rotary inputs (shared)."""
    if node.attributes.get_int("rotary", 0) == 0:
        return None
    cos, sin = node.inputs[5], node.inputs[6]
    key = (cos.name, sin.name, node.attributes.get_int("rotary_interleaved", 0))
    if key not in caches:
        cos_table, sin_table = rotary_cache.evaluate_rotary_tables(graph, cos, sin, max_context)
        interleaved = bool(node.attributes.get_int("rotary_interleaved", 0))
        cos_half, sin_half = rotary_cache.half_tables(cos_table, sin_table, interleaved)
        dtype = node.inputs[0].dtype  # the kernel takes its tables in the query's type
        if dtype is not None and dtype != ir.DataType.FLOAT:
            cos_half, sin_half = (t.astype(dtype.numpy()) for t in (cos_half, sin_half))
        index = len(caches)
        caches[key] = (
            add_initializer(graph, f"kvfuse.rotary_cos_{index}", cos_half),
            add_initializer(graph, f"kvfuse.rotary_sin_{index}", sin_half),
        )
    return caches[key]


def _layer_window(graph, node, max_context: int, sliding_window: int | None) -> int | None:
    """The layer's sliding window: read from its own mask where the fused op kept one (layers
    may alternate between windows and global attention), else the export's model-wide one."""
    index = position_bias.MASK_INPUT
    kind = node.attributes.get_string("mask_kind", "none")
    if len(node.inputs) > index and node.inputs[index] is not None and kind != "none":
        try:
            return position_bias.mask_window(graph, node.inputs[index], kind, max_context)
        except KvfuseError:
            pass  # a mask builder that cannot run on its own: the export's facts decide
    return sliding_window if sliding_window and sliding_window < max_context else None


def _bake_position_bias(graph, node, max_context: int, slopes: dict) -> None:
    """A position bias input (ALiBi) becomes its per-head slopes, a [H] initializer (shared by
    layers whose bias is one tensor); the lowering rebuilds the bias from them."""
    index = position_bias.POSITION_BIAS_INPUT
    if len(node.inputs) <= index or node.inputs[index] is None:
        return
    bias = node.inputs[index]
    if bias.name not in slopes:
        heads = node.attributes.get_int("num_heads")
        values = position_bias.alibi_slopes(graph, bias, heads, max_context)
        slopes[bias.name] = add_initializer(graph, f"kvfuse.alibi_slopes_{len(slopes)}", values)
    node.replace_input_with(index, slopes[bias.name])


def _remove_dead(model: ir.Model) -> None:
    from onnxscript import optimizer

    optimizer.remove_unused_nodes(model)
    graph = model.graph
    if not any(node.domain == KVFUSE_DOMAIN for node in graph.all_nodes()):
        model.opset_imports.pop(KVFUSE_DOMAIN, None)  # every kvfuse op was lowered
    for value in list(graph.inputs):
        if not value.uses():
            graph.inputs.remove(value)
