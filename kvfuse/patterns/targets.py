"""The rewrite pipelines, one per target, as they run: read top to bottom."""

from __future__ import annotations

from kvfuse.patterns import axes, lower_ort, norm, rotary
from kvfuse.patterns.attention import cached, diagnose, repeat_kv, sdpa
from kvfuse.rewriter import shapes
from kvfuse.rewriter.pipeline import Stage

FUSION_STAGES = [
    Stage("canonicalize axis swaps and head selections", rules=axes.RULES),
    Stage("split heads taken from fused projections", run=shapes.split_heads),
    Stage("fuse RMSNorm", rules=norm.RULES),
    Stage("fuse RoPE", rules=rotary.RULES),
    Stage("fuse GQA/MQA head repeat", rules=repeat_kv.RULES),
    Stage("fuse attention core", rules=sdpa.RULES),
    Stage("fuse attention with its KV cache", rules=cached.RULES),
]

# the rules to dry-run when a layer did not fuse, to report how close each came, and the
# plain-words check of each leftover Softmax
EXPLAIN_RULES = cached.RULES + sdpa.RULES + rotary.RULES + repeat_kv.RULES
DIAGNOSE = diagnose.diagnose_softmax

ORT_LOWERING = [
    Stage("infer shapes through the fused ops", run=shapes.infer_shapes),
    Stage("lower residual + RMSNorm to onnxruntime ops", run=lower_ort.lower_skip_rms_norms),
    Stage("lower RMSNorm to onnxruntime ops", rules=lower_ort.NORM_RULES),
]

# after the retained-state conversion (which creates the GroupQueryAttention nodes)
ORT_FINISHING = [Stage("pack Q/K/V projections", run=lower_ort.pack_qkv_projections)]
