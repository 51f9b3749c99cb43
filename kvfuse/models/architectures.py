"""What kvfuse expects of each architecture's export — data the end-to-end tests use.

`cache_layout`: the layout the exported graph keeps its KV cache in; `rope`: RoPE style
("half" = rotate-half on the full head dim, "half-partial" = rotate-half on the first
`rotary_pct` of each head, "interleaved-partial" = GPT-J's rotate-every-two on the first dims,
None = learned positions); per layer, how many attention fusions
and RMSNorm fusions a complete rewrite makes; `max_nodes_ratio`: the most nodes the rewrite
may leave, as a fraction of the export's (the shape plumbing must fold away). Every
architecture here fuses with every exporter in `EXPORTERS` that can export it: the end-to-end
tests assert it and
the README's table is generated from a real run (`python -m kvfuse.models.coverage`), never
typed by hand.
"""

from __future__ import annotations

_ROPE_LLAMA = {
    "cache_layout": "BHSD",
    "max_nodes_ratio": 0.1,
    "rope": "half",
    "attention_per_layer": 1,
    "rms_norms_per_layer": 2,
    "final_norm": True,
}
_LAYER_NORM = {
    "cache_layout": "BHSD",
    "max_nodes_ratio": 0.1,
    "attention_per_layer": 1,
    "rms_norms_per_layer": 0,
    "final_norm": False,
}

ARCHITECTURES: dict[str, dict] = {
    "llama": {**_ROPE_LLAMA},
    # the default run proves these two through Optimum only (their dynamo graphs are llama's
    # with a window / QKV biases; the coverage command runs both exporters)
    "mistral": {**_ROPE_LLAMA, "parity_exporters": ("optimum",)},
    "qwen2": {**_ROPE_LLAMA, "parity_exporters": ("optimum",)},
    "phi3": {**_ROPE_LLAMA},
    # GPT-2 keeps the Reshape plumbing around its Gemm projections (seq length is dynamic)
    "gpt2": {**_LAYER_NORM, "rope": None, "max_nodes_ratio": 0.4},
    # what is left is compute: biased layer norms and projections, erf GELU, parallel residual
    "gpt_neox": {**_LAYER_NORM, "rope": "half-partial", "max_nodes_ratio": 0.15},
    "falcon": {**_LAYER_NORM, "rope": "half"},
    "falcon_gqa": {**_LAYER_NORM, "rope": "half", "parity_exporters": ("optimum",)},
}


# --- rotary coverage (issue 11): RoPE of any width and style, per-head Q/K norms, the
# lowering each layer takes per target ("lowering": one for every layer, or a list per layer),
# which exporters can export the family
# ("exporters", default all) and which one the default test run proves it with
# ("parity_exporters"; `python -m kvfuse.models.coverage` runs every one).
_ROTARY_LOWERED = {"ort": "rotary-op+gqa", "onnx": "rotary-op+attention"}  # GQA cannot rotate
_ROTARY_FUSED = {"ort": "gqa-rotary", "onnx": "rotary-op+attention"}

ROTARY_ARCHITECTURES: dict[str, dict] = {
    # 4 of 16 dims: GQA's fused rotary takes multiples of 16 only
    "gpt_neox_r4": {
        **_LAYER_NORM,
        "rope": "half-partial",
        "max_nodes_ratio": 0.6,  # the dynamo export is small to begin with
        "lowering": _ROTARY_LOWERED,
        "parity_exporters": ("optimum",),
    },
    # 8 of 32 dims, interleaved
    "gptj": {
        **_LAYER_NORM,
        "rope": "interleaved-partial",
        "max_nodes_ratio": 0.4,
        "lowering": _ROTARY_LOWERED,
        "parity_exporters": ("optimum",),
    },
    "codegen": {
        **_LAYER_NORM,
        "rope": "interleaved-partial",
        "max_nodes_ratio": 0.4,
        "lowering": _ROTARY_FUSED,
        "parity_exporters": ("optimum",),
    },
    "phi": {
        **_LAYER_NORM,
        "rope": "half-partial",
        "max_nodes_ratio": 0.4,
        "lowering": _ROTARY_FUSED,
        "parity_exporters": ("optimum",),
    },
    "gemma": {**_ROPE_LLAMA, "lowering": _ROTARY_FUSED, "parity_exporters": ("optimum",)},
    "glm": {
        **_ROPE_LLAMA,
        "rope": "interleaved-partial",
        "lowering": _ROTARY_FUSED,
        "parity_exporters": ("optimum",),
    },
    # Optimum has no StarCoder2 export config
    "starcoder2": {
        **_LAYER_NORM,
        "rope": "half",
        "max_nodes_ratio": 0.4,
        "lowering": _ROTARY_FUSED,
        "exporters": ("dynamo",),
        "parity_exporters": ("dynamo",),
    },
    # per-head RMSNorm on Q and K: 4 norms per layer
    "qwen3": {
        **_ROPE_LLAMA,
        "rms_norms_per_layer": 4,
        "lowering": _ROTARY_FUSED,
        "parity_exporters": ("dynamo",),
    },
    # whole-width RMSNorm on the Q and K projections (before the head reshape), post-norms
    "olmo2": {
        **_ROPE_LLAMA,
        "rms_norms_per_layer": 4,
        "lowering": _ROTARY_FUSED,
        "parity_exporters": ("optimum",),
    },
    # NoPE layers: layer 1 of 2 has no RoPE, so its attention takes the plain lowering
    "smollm3": {
        **_ROPE_LLAMA,
        "lowering": {
            "ort": ["gqa-rotary", "gqa"],
            "onnx": ["rotary-op+attention", "attention"],
        },
        "parity_exporters": ("optimum",),
    },
}
ARCHITECTURES.update(ROTARY_ARCHITECTURES)


def exporters_of(architecture: str) -> tuple[str, ...]:
    """The exporters that can export this architecture."""
    return tuple(ARCHITECTURES[architecture].get("exporters", EXPORTERS))


def parity_exporters(architecture: str) -> tuple[str, ...]:
    """The exporters the default test run proves this architecture with, end to end."""
    return tuple(ARCHITECTURES[architecture].get("parity_exporters", exporters_of(architecture)))


# --- positions, score modifiers and MoE (issue 11): `positions`, how the family encodes
# positions (the coverage table's column); "exporters" and "parity_exporters" as above. These
# families are proven in the default run by the exporters' parity test.
POSITION_ARCHITECTURES: dict[str, dict] = {
    # ALiBi (a per-head slope · key position on the scores), LayerNorm without bias, QKV ±6
    "mpt": {**_LAYER_NORM, "rope": None, "positions": "ALiBi", "parity_exporters": ("optimum",)},
    # learned absolute positions offset by 2, the query scaled before Q·Kᵀ, QKV biases
    "opt": {
        **_LAYER_NORM,
        "rope": None,
        "positions": "learned (+2)",
        "parity_exporters": ("optimum",),
    },
    # multi-query: one KV head taken from one fused c_attn projection
    "gpt_bigcode": {
        **_LAYER_NORM,
        "rope": None,
        "positions": "learned",
        "parity_exporters": ("optimum",),
    },
    # MoE MLP (router softmax → top-2): attention fuses, the MLP stays as exported
    # (`softmax_left`: the routers' softmaxes, one per layer, which are no attention)
    "mixtral": {**_ROPE_LLAMA, "exporters": ("dynamo",), "softmax_left": 2},
    # sliding and global layers alternating (window 6, then none), each layer's window read
    # from its own mask (Optimum's mask builder reads the past's shape: its key axis is a total
    # length, not the new tokens). transformers loads Gemma 2 with SDPA attention by default,
    # which leaves attn_logit_softcapping out: neither PyTorch's default run nor either export
    # has a Tanh on the scores
    # (the default run proves it through Optimum, whose export needs each layer's own window
    # read from its mask; the coverage command runs both exporters)
    "gemma2": {**_ROPE_LLAMA, "rms_norms_per_layer": 4, "parity_exporters": ("optimum",)},
    # ALiBi inside baddbmm: scores over [B·H, S, T], heads folded into the batch
    "bloom": {
        **_LAYER_NORM,
        "rope": None,
        "positions": "ALiBi",
        "lowering": {"ort": "gqa", "onnx": "attention"},
        # the dynamo export reads B·H from Shape(past)[0:1] · H instead of batch_size · H
        "parity_exporters": ("optimum", "dynamo"),
    },
}
ARCHITECTURES.update(POSITION_ARCHITECTURES)
# tiny configs kvfuse does not fuse yet: the coverage command runs them to show why not
PENDING: dict[str, dict] = {
    "gpt_oss": {"positions": "rope"},  # RoPE as chunk halves · cos/sin, then cat
}


def positions_of(architecture: str) -> str:
    """How the family encodes positions, for the coverage table."""
    facts = ARCHITECTURES.get(architecture) or PENDING[architecture]
    return facts.get("positions") or facts.get("rope") or "learned"


def expected_fusions(architecture: str, num_layers: int) -> dict[str, int]:
    """Counts a complete `ort` rewrite of this architecture makes for `num_layers` layers."""
    facts = ARCHITECTURES[architecture]
    norms = facts["rms_norms_per_layer"] * num_layers + int(facts["final_norm"])
    return {
        "GroupQueryAttention": facts["attention_per_layer"] * num_layers,
        "rms_norms": norms,
    }


EXPORTERS = ("optimum", "dynamo")
