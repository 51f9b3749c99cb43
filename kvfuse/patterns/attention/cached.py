"""Attention over a growing Concat KV cache → kvfuse CachedAttention (fixed-buffer ready).

Legend: B batch, S new tokens, P past, T = P + S, H heads, Hkv kv heads, D head dim; L the
cache layout (see `Layout`), "proj" the layout a projection is reshaped into.

    q_flat ─ Reshape ─ [Transpose→L] ─ [Rotary] ────────────── [Transpose→BHSD] ─ q ─┐
    k_flat ─ Reshape ─ [RepeatKV] ─ [Transpose→L] ─ [Rotary] ─ Concat(past_k, ·) ═ present_k
                                                   └─ [RepeatKV] ──────────── k ─ Attention
    v_flat ─ Reshape ─ [RepeatKV] ─ [Transpose→L] ─────────── Concat(past_v, ·) ═ present_v
                                                   └─ [RepeatKV] ──────────── v ─────┘
    Attention ─ Transpose(→proj) ─ Reshape ─ y_flat        (concats on L's sequence axis)

becomes CachedAttention(q_flat, k_flat, v_flat, past_k, past_v, [cos, sin]) → (y_flat,
present_k, present_v); the retained-state conversion moves the `present.*` graph outputs onto
its outputs 1 and 2. Rotary may be applied before or after the transpose into the cache
layout (it acts on D only). The mask is dropped: the fused op is causal over the valid
positions, which is what the model's mask builder computed from `attention_mask`.

A key cached pre-transposed (`Layout("BHSD", key="BHDS")`: K cached as [B, Hkv, D, T], grown on
its last axis) is rotated, transposed once more into that order and concatenated on axis 3;
attention then reads it with no transpose. The fused op takes k_flat like any other: the
retained-state conversion gives every target its usual [B, Hkv, max_context, D] key buffer.

Falcon (new_decoder_architecture) repeats K and V to every query head right after the
projection reshape, so its export caches H heads made of Hkv: the fused op caches the Hkv
heads of k_flat/v_flat (the same attention, less memory), after checking that the export's
cache holds exactly those heads repeated (rotary commutes with the repeat: it acts on D).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from kvfuse.patterns.attention.sdpa import maybe_transpose, static_dim
from kvfuse.rewriter.layout import RULE_LAYOUTS, Layout, is_identity
from kvfuse.rewriter.rules import KVFUSE_DOMAIN, Rule, fail, like, ok


class CachedAttentionRule(Rule):
    """`attention/cached_<layout>[_rope]`: projections, cache concat and attention → one op."""

    def __init__(self, layout: Layout, rotary: bool) -> None:
        # remove_nodes=False: the mask builder still reads shapes of the matched K/V (e.g.
        # Shape(repeated key) to slice the mask); it dies with the mask once we are done.
        name = f"attention/cached_{layout.label}{'_rope' if rotary else ''}"
        super().__init__(name, remove_nodes=False)
        self.layout, self.rotary = layout, rotary

    def _heads(self, op, flat, shape, cos, sin, rotate: bool, tag: str, repeat=False, order=""):
        """flat projection → heads in `order` (default the cache layout; K: the key cache's),
        rotated in the projection or in the cache layout; with `repeat`, kv heads may be
        repeated to every query head before they are cached."""
        layout = self.layout
        to_order = layout.perm(layout.projection, order or layout.name)
        projected = op.Reshape(flat, shape)
        if tag in ("q", "k"):  # Qwen3, Gemma3: Q and K normalised per head before RoPE
            projected = pattern.OrValue(
                [
                    op.RMSNorm(
                        projected,
                        _domain=KVFUSE_DOMAIN,
                        _allow_other_inputs=True,
                        _allow_other_attributes=True,
                        _outputs=[f"{tag}_rms"],
                    ),
                    op.LayerNormalization(
                        projected,
                        _allow_other_inputs=True,
                        _allow_other_attributes=True,
                        _outputs=[f"{tag}_ln"],
                    ),
                    projected,
                ],
                tag_var=f"{tag}_norm",
                tag_values=["rms", "ln", ""],
            )
        if repeat:  # Falcon (new_decoder_architecture) caches K/V repeated to every head
            projected = pattern.OrValue(
                [
                    op.RepeatKV(projected, _domain=KVFUSE_DOMAIN, _outputs=[f"{tag}_early"]),
                    projected,
                ],
                tag_var=f"{tag}_repeated_early",
                tag_values=[1, 0],
            )
        if not rotate:
            return maybe_transpose(op, projected, to_order)
        in_cache = maybe_transpose(op, projected, layout.to_cache)
        at_cache = op.Rotary(in_cache, cos, sin, _domain=KVFUSE_DOMAIN)
        at_projection = op.Rotary(projected, cos, sin, _domain=KVFUSE_DOMAIN)
        return pattern.OrValue(
            [
                maybe_transpose(op, at_cache, layout.perm(layout.name, order or layout.name)),
                # one transpose after: the axis rules compose a pair written in two steps
                maybe_transpose(op, at_projection, to_order),
            ],
            tag_var=f"{tag}_rotary_at",
            tag_values=["cache", "projection"],
        )

    def pattern(self, op, q_flat, k_flat, v_flat, past_k, past_v, cos, sin, shapes, out_shape):
        # `shapes`: one variable for the three projection reshapes (exporters share the target)
        query = self._heads(op, q_flat, shapes, cos, sin, self.rotary, "q")
        new_k = self._heads(
            op, k_flat, pattern.ANY_VALUE, cos, sin, self.rotary, "k", True, self.layout.key_order
        )
        present_k = op.Concat(past_k, new_k, axis=self.layout.key_seq_axis, _outputs=["present_k"])
        new_v = self._heads(op, v_flat, pattern.ANY_VALUE, cos, sin, False, "v", True)
        present_v = op.Concat(past_v, new_v, axis=self.layout.seq_axis, _outputs=["present_v"])
        key = pattern.OrValue(
            [op.RepeatKV(present_k, _domain=KVFUSE_DOMAIN), present_k],
            tag_var="k_repeated",
            tag_values=[1, 0],
        )
        value = pattern.OrValue(
            [op.RepeatKV(present_v, _domain=KVFUSE_DOMAIN), present_v],
            tag_var="v_repeated",
            tag_values=[1, 0],
        )
        attended = op.Attention(
            maybe_transpose(op, query, self.layout.to_bhsd),
            key,
            value,
            _domain=KVFUSE_DOMAIN,
            _allow_other_inputs=True,
            _outputs=["attended"],
        )
        # Optimum's fp16 export: the fused core's output cast back to the fp32 of its P·V
        attended = pattern.OrValue(
            [op.Cast(attended), attended], tag_var="output_cast", tag_values=[1, 0]
        )
        # Falcon re-reshapes the output to the [B, H, S, D] it already has
        attended = pattern.OrValue(
            [op.Reshape(attended, pattern.ANY_VALUE, _outputs=["reshaped"]), attended],
            tag_var="output_reshape",
            tag_values=[1, 0],
        )
        merged = maybe_transpose(op, attended, self.layout.bhsd_to_projection)
        # single output: the present concats stay graph outputs until the retained-state
        # conversion rewires them (matching them as outputs costs a search over all Concats)
        return op.Reshape(merged, out_shape, _outputs=["y_flat"])

    def check(self, context, q_flat, past_k, past_v, present_k, present_v, attended, **bound):
        if self.rotary:
            query_rotary = _rotary_above(attended.producer().inputs[0])
            key_rotary = _rotary_above(present_k.producer().inputs[1])
            if _rotary_style(query_rotary) != _rotary_style(key_rotary):
                return fail("query and key are rotated differently", query_rotary, key_rotary)
        for past in (past_k, past_v):
            if not past.is_graph_input():
                return fail(f"cache {past.name} is not a graph input", past)
        for present in (present_k, present_v):
            if not present.is_graph_output():
                return fail(f"cache concat {present.name} is not a graph output", present)

        read = self._check_read_layout(attended)
        if read is not None:
            return read
        head_dim = static_dim(past_k, self.layout.key_order.index("D"))
        if static_dim(past_v, self.layout.name.index("D")) != head_dim:
            return fail(f"value head dim {past_v.shape} differs from key head dim {head_dim}")
        # (a failed MatchResult is falsy: test for None, never chain these with `or`)
        kv_heads = self._kv_heads(past_k, bound)
        failure = _check_projections(q_flat, bound["k_flat"], bound["v_flat"], head_dim, kv_heads)
        for past, tag in ((past_k, "k"), (past_v, "v")):
            if failure is None:
                failure = self._check_cache_heads(past, bound, tag, kv_heads)
        for tag in ("q", "k"):
            if failure is None:
                failure = _check_head_norm(bound, tag, head_dim)
        if failure is not None:
            return failure
        if bound.get("output_reshape"):  # must keep [B, H, S, D]
            dims = bound["reshaped"].shape
            if dims is None or len(dims) != 4 or dims[1] != static_dim(q_flat, -1) // head_dim:
                return fail(f"attention output reshaped to {dims}, not [B, H, S, D]", attended)
        if _rank(bound["y_flat"]) not in (_rank(q_flat), 2):
            found = bound["y_flat"].shape
            return fail(f"attention output merged to {found}, not like the query {q_flat.shape}")
        return ok()

    def _check_read_layout(self, attended: ir.Value) -> pattern.MatchResult | None:
        """Attention must read the caches in this rule's orders: a key transposed again before
        Q·Kᵀ (or not transposed when it should be) is not the product the cache was built for."""
        attributes = attended.producer().attributes
        found = Layout(attributes.get_string("layout"), key=attributes.get_string("key_layout"))
        if found.name != self.layout.name:
            return fail(f"attention reads the cache as {found.name}, expected {self.layout.name}")
        if found.key_order == self.layout.key_order:
            return None
        how = (
            f"Transpose {found.key_transposed}" if not is_identity(found.key_transposed) else "none"
        )
        return fail(
            f"attention reads the key cache as {found.key_order} (key transpose before Q·Kᵀ: "
            f"{how}), expected {self.layout.key_order}",
            attended,
        )

    def _kv_heads(self, past_k: ir.Value, bound: dict) -> int | None:
        """Kv heads as the fused op caches them: those of the key projection (the export's cache
        holds more when the model repeats them before caching)."""
        head_dim = static_dim(past_k, self.layout.key_order.index("D"))
        width = static_dim(bound["k_flat"], -1)
        return width // head_dim if width is not None and head_dim else None

    def _check_cache_heads(self, past, bound, tag: str, kv_heads) -> pattern.MatchResult | None:
        """The export's cache holds the projection's kv heads, or (Falcon) those heads repeated
        to every query head on the projection's head axis."""
        expected = kv_heads
        if bound.get(f"{tag}_repeated_early"):
            repeat = bound[f"{tag}_early"]
            axis, head_axis = (
                repeat.producer().attributes.get_int("axis"),
                self.layout.projection.index("H"),
            )
            if axis != head_axis:
                return fail(f"heads repeated on axis {axis}, expected {head_axis}", repeat)
            expected = static_dim(repeat, head_axis)
        order = self.layout.key_order if tag == "k" else self.layout.name
        cached = static_dim(past, order.index("H"))
        if cached != expected:
            return fail(f"cache {past.name} holds {cached} heads, expected {expected}", past)
        return None

    def rewrite(
        self,
        op,
        q_flat,
        k_flat,
        v_flat,
        past_k,
        past_v,
        present_k,
        attended,
        y_flat,
        cos=None,
        sin=None,
        out_shape=None,
        **bound,
    ):
        head_dim = static_dim(past_k, self.layout.key_order.index("D"))
        rotary = [cos, sin] if self.rotary else [None, None]
        core = attended.producer()
        # score modifiers ride along: inputs 7 (position bias) and 8 (sink logits), softcap
        modifiers = [core.inputs[i] if len(core.inputs) > i else None for i in (4, 5)]
        # input 9: the layer's own mask, read once more at lowering time for its window
        extra = rotary + modifiers + [core.inputs[3] if len(core.inputs) > 3 else None]
        while extra and extra[-1] is None:
            extra.pop()
        softcap = core.attributes.get_float("softcap", 0.0)
        k_flat_rotated = present_k.producer().inputs[1]
        kv_heads = self._kv_heads(past_k, {**bound, "k_flat": k_flat})
        q_normed = _normed_flat(op, q_flat, bound, "q", head_dim)
        outputs = op.CachedAttention(
            q_normed,
            _normed_flat(op, k_flat, bound, "k", head_dim),
            v_flat,
            past_k,
            past_v,
            *extra,
            num_heads=static_dim(q_flat, -1) // head_dim,
            kv_num_heads=kv_heads,
            scale=core.attributes.get_float("scale"),
            mask_kind=core.attributes.get_string("mask_kind", "none"),
            **({"softcap": softcap} if softcap else {}),
            layout=self.layout.name,
            rotary=int(self.rotary),
            rotary_interleaved=_rotary_style(_rotary_above(k_flat_rotated))[0]
            if self.rotary
            else 0,
            _domain=KVFUSE_DOMAIN,
            _outputs=3,
        )
        out = like(outputs[0], q_flat)
        if y_flat.dtype is not None and y_flat.dtype != q_flat.dtype:
            out = op.Cast(out, to=y_flat.dtype)  # readers expect the scores chain's type
        if _rank(y_flat) != _rank(q_flat):
            # the dynamo exporter flattens GPT-2's output to [B·S, H·D] for its Conv1D Gemm:
            # the fused op gives the query's [B, S, H·D], reshaped to the same target
            return like(op.Reshape(out, out_shape), y_flat)
        return like(out, y_flat)


def _head_norm(bound: dict, tag: str) -> ir.Value | None:
    """The per-head norm's output on Q or K (`tag`), if the projection has one."""
    return bound.get(f"{tag}_rms") or bound.get(f"{tag}_ln") if bound.get(f"{tag}_norm") else None


def _check_head_norm(bound: dict, tag: str, head_dim: int | None) -> pattern.MatchResult | None:
    """A norm between the head reshape and RoPE must normalise each head alone: over the last
    axis, with a weight (and bias) of D values."""
    normed = _head_norm(bound, tag)
    if normed is None:
        return None
    norm = normed.producer()
    axis = norm.attributes.get_int("axis", -1)
    if axis not in (-1, 3):
        return fail(f"{norm.op_type} on {tag.upper()}'s heads over axis {axis}, expected D", norm)
    for weight in norm.inputs[1:]:
        if weight is not None and (weight.shape is None or list(weight.shape) != [head_dim]):
            return fail(
                f"per-head {norm.op_type} on {tag.upper()} has a {weight.shape} weight, "
                f"expected [{head_dim}]",
                norm,
            )
    return None


def _normed_flat(op, flat: ir.Value, bound: dict, tag: str, head_dim: int) -> ir.Value:
    """`flat` [.., S, heads·D] with the model's per-head norm applied (if any), flat again:
    the fused op takes flat projections, and normalising per head commutes with nothing else
    the rule absorbs before RoPE (the transposes move heads, not D)."""
    normed = _head_norm(bound, tag)
    if normed is None:
        return flat
    norm = normed.producer()
    heads = static_dim(flat, -1) // head_dim
    split = op.Reshape(flat, op.Constant(value_ints=[0, 0, heads, head_dim]))
    attributes = {name: attr.value for name, attr in norm.attributes.items()}
    again = getattr(op, norm.op_type)(split, *norm.inputs[1:], _domain=norm.domain, **attributes)
    return like(op.Reshape(again, op.Constant(value_ints=[0, 0, heads * head_dim])), flat)


def _check_projections(q_flat, k_flat, v_flat, head_dim, kv_heads) -> pattern.MatchResult | None:
    """Q, K and V must be flat [.., S, width] projections of whole heads, K and V Hkv heads."""
    widths = [
        static_dim(x, -1) if x.shape is not None and len(x.shape) == 3 else None
        for x in (q_flat, k_flat, v_flat)
    ]
    if None in (head_dim, kv_heads, *widths):
        shapes = [x.shape for x in (q_flat, k_flat, v_flat)]
        return fail(f"q/k/v projections are not [B, S, static width]: {shapes}", q_flat, k_flat)
    if widths[1] != kv_heads * head_dim or widths[2] != kv_heads * head_dim:
        return fail(f"k/v widths {widths[1:]}, expected Hkv·D = {kv_heads}·{head_dim}", k_flat)
    if widths[0] % head_dim or (widths[0] // head_dim) % kv_heads:
        return fail(f"query width {widths[0]} is not a multiple of Hkv·D = {kv_heads}·{head_dim}")
    return None


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _rotary_above(value: ir.Value) -> ir.Node | None:
    """The kvfuse Rotary node producing `value`, looking through transposes."""
    node = value.producer()
    while node is not None and node.op_type == "Transpose":
        node = node.inputs[0].producer()
    return node if node is not None and node.op_type == "Rotary" else None


def _rotary_style(node: ir.Node | None) -> tuple[int, int]:
    if node is None:
        return (-1, -1)
    return node.attributes.get_int("interleaved", 0), node.attributes.get_int("rotary_dim", 0)


RULES = [
    CachedAttentionRule.rule(layout, rotary) for layout in RULE_LAYOUTS for rotary in (True, False)
]
