"""The rewrite pipelines, one per target, as they run: read top to bottom."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kvfuse.patterns import (
    axes,
    lower_onnx,
    lower_ort,
    lower_quant,
    norm,
    packed_mlp,
    packed_qkv,
    rotary,
)
from kvfuse.patterns.attention import batched_heads, cached, diagnose_cache, repeat_kv, sdpa
from kvfuse.rewriter import last_logits, packed_heads, shapes
from kvfuse.rewriter.pipeline import Stage
from kvfuse.rewriter.unsqueezed_split import split_unsqueezed_projections

FUSION_STAGES = [
    Stage("split fused projections before their head axis", run=split_unsqueezed_projections),
    Stage("canonicalize axis swaps and head selections", rules=axes.RULES),
    Stage("fused projections' parts as column blocks", run=packed_heads.split_parts_stage),
    Stage("fuse RMSNorm", rules=norm.RULES),
    Stage("fuse RoPE", rules=rotary.RULES),
    Stage("fuse GQA/MQA head repeat", rules=repeat_kv.RULES),
    Stage("unfold heads merged into the batch (Bloom)", run=batched_heads.unfold_heads),
    Stage("fuse attention core", rules=sdpa.RULES),
    Stage("fuse attention with its KV cache", rules=cached.RULES),
]

# the rules to dry-run when a layer did not fuse, to report how close each came, and the
# plain-words check of each leftover Softmax
EXPLAIN_RULES = cached.RULES + sdpa.RULES + rotary.RULES + repeat_kv.RULES
DIAGNOSE = diagnose_cache.diagnose_layer  # a Softmax: diagnose.diagnose_softmax


@dataclasses.dataclass(frozen=True)
class Target:
    """How the fused graph becomes one runtime's ops: stages before the retained-state
    conversion, the attention lowering it uses, and stages after it (and after the logits
    are cut to the last position)."""

    name: str
    lowering: list[Stage]
    attention: Callable[[int], Callable]  # max_context → a per-graph CachedAttention lowering
    finishing: list[Stage]
    dtype: str | None = None  # a half-precision target: "float16" (default) or "bfloat16"
    positions_on_device: bool = False  # no host-side shape op (CUDA graphs need none)
    # (model, accuracy level) → counts: lowers the block-quantized ops of `patterns.quantize`
    quantized: Callable[[object, int], dict] = lower_quant.lower_ort


ORT = Target(
    "ort",
    lowering=[
        Stage("infer shapes through the fused ops", run=shapes.infer_shapes),
        Stage("lower residual + RMSNorm to onnxruntime ops", run=lower_ort.lower_skip_rms_norms),
        Stage("lower RMSNorm to onnxruntime ops", rules=lower_ort.NORM_RULES),
        Stage("pack Q/K/V projections", run=packed_qkv.pack_qkv_projections),
    ],
    attention=lower_ort.AttentionLowering,
    finishing=[
        Stage("hand GQA its packed Q/K/V", run=lower_ort.hand_packed_qkv),
        Stage("read transposed weights in place", rules=lower_ort.WEIGHT_RULES),
    ],
)

ONNX = Target(
    "onnx",
    lowering=[
        Stage("infer shapes through the fused ops", run=shapes.infer_shapes),
        Stage("move to opset 24", run=lower_onnx.convert_opset),
        Stage("lower RMSNorm to RMSNormalization", rules=lower_onnx.NORM_RULES),
        Stage("pack Q/K/V projections", run=packed_qkv.pack_qkv_projections),
    ],
    attention=lower_onnx.AttentionLowering,
    finishing=[Stage("read transposed weights in place", rules=lower_onnx.WEIGHT_RULES)],
    quantized=lambda model, _level: lower_quant.lower_onnx(model),
)

# the `ort` ops for onnxruntime's CUDA provider, in half precision (GroupQueryAttention runs
# only in float16/bfloat16 there); nodes whose values leave float16's range stay float32,
# chosen by the range check after lowering (kvfuse.rewriter.range_check)
CUDA = dataclasses.replace(
    ORT,
    name="cuda",
    finishing=[
        *ORT.finishing,
        Stage("pack the MLP's gate and up projections", run=packed_mlp.pack_sibling_projections),
        Stage("pick the greedy token on the device", run=last_logits.add_greedy_token),
    ],
    dtype="float16",
    positions_on_device=True,
)

TARGETS = {target.name: target for target in (ORT, ONNX, CUDA)}
