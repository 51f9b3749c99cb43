"""What kvfuse expects of each architecture's export — data the end-to-end tests use.

`cache_layout`: the layout the exported graph keeps its KV cache in; `rope`: RoPE style
("half" = rotate-half on the full head dim, "half-partial" = rotate-half on the first
`rotary_pct` of each head, None = learned positions); per layer, how many attention fusions
and RMSNorm fusions a complete rewrite makes; `max_nodes_ratio`: the most nodes the rewrite
may leave, as a fraction of the export's (the shape plumbing must fold away). Every
architecture here fuses with every exporter in `EXPORTERS`: the end-to-end tests assert it and
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
    "mistral": {**_ROPE_LLAMA},
    "qwen2": {**_ROPE_LLAMA},
    "phi3": {**_ROPE_LLAMA},
    # GPT-2 keeps the Reshape plumbing around its Gemm projections (seq length is dynamic)
    "gpt2": {**_LAYER_NORM, "rope": None, "max_nodes_ratio": 0.4},
    # what is left is compute: biased layer norms and projections, erf GELU, parallel residual
    "gpt_neox": {**_LAYER_NORM, "rope": "half-partial", "max_nodes_ratio": 0.15},
    "falcon": {**_LAYER_NORM, "rope": "half"},
    "falcon_gqa": {**_LAYER_NORM, "rope": "half"},
}


# --- positions, score modifiers and MoE (issue 11). `positions`: how the family encodes
# positions (the coverage table's column); `exporters`: the exporters that can export it (the
# coverage command also runs the others, to show why not); `parity_exporter`: the one exporter
# the default test run uses for it (the coverage command covers every exporter × target).
# These families are proven in the default run by the parity test only; the generic
# Optimum-based tests iterate `CORE`.
ARCHITECTURES.update(
    {
        # ALiBi (a per-head slope · key position on the scores), LayerNorm without bias,
        # QKV clipped to ±6
        "mpt": {**_LAYER_NORM, "rope": None, "positions": "ALiBi", "parity_exporter": "optimum"},
        # learned absolute positions offset by 2, the query scaled before Q·Kᵀ, QKV biases
        "opt": {
            **_LAYER_NORM,
            "rope": None,
            "positions": "learned (+2)",
            "parity_exporter": "optimum",
        },
        # multi-query: one KV head taken from one fused c_attn projection
        "gpt_bigcode": {
            **_LAYER_NORM,
            "rope": None,
            "positions": "learned",
            "parity_exporter": "optimum",
        },
        # MoE MLP (router softmax → top-2): attention fuses, the MLP stays as exported
        # (`softmax_left`: the routers' softmaxes, one per layer, which are no attention)
        "mixtral": {
            **_ROPE_LLAMA,
            "exporters": ("dynamo",),
            "parity_exporter": "dynamo",
            "softmax_left": 2,
        },
        # sliding and global layers alternating (window 6, then none)
        "gemma2": {
            **_ROPE_LLAMA,
            "rms_norms_per_layer": 4,
            "exporters": ("dynamo",),
            "parity_exporter": "dynamo",
        },
    }
)
# tiny configs kvfuse does not fuse yet: the coverage command runs them to show why not
PENDING: dict[str, dict] = {
    "bloom": {"positions": "ALiBi"},  # scores as a [B·H, S, T] batched MatMul (baddbmm)
    "gpt_oss": {"positions": "rope"},  # RoPE as chunk halves · cos/sin, then cat
}
CORE = sorted(name for name, facts in ARCHITECTURES.items() if "parity_exporter" not in facts)


def exporters_of(architecture: str) -> tuple[str, ...]:
    """The exporters that export `architecture` (every one in `EXPORTERS` unless listed)."""
    return ARCHITECTURES[architecture].get("exporters", EXPORTERS)


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
