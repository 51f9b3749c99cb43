"""What kvfuse expects of each architecture's export — data the end-to-end tests use.

`cache_layout`: the layout the exported graph keeps its KV cache in; `rope`: RoPE style
("half" = rotate-half on the full head dim, "half-partial" = rotate-half on the first
`rotary_pct` of each head, None = learned positions); per layer, how many attention fusions
and RMSNorm fusions a complete rewrite makes; `max_nodes_ratio`: the most nodes the rewrite
may leave, as a fraction of the export's (the shape plumbing must fold away); `fuses`: whether
the Optimum export of this architecture fuses today (the README's table is generated from
these facts and a real run, never typed by hand). `NOT_FUSING` lists, per other exporter, the
architectures whose export of that exporter does not fuse yet, with the near miss kvfuse
reports.
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
    "llama": {**_ROPE_LLAMA, "fuses": True},
    "mistral": {**_ROPE_LLAMA, "fuses": True},
    "qwen2": {**_ROPE_LLAMA, "fuses": True},
    "phi3": {**_ROPE_LLAMA, "fuses": True},
    # GPT-2 keeps the Reshape plumbing around its Gemm projections (seq length is dynamic)
    "gpt2": {**_LAYER_NORM, "rope": None, "fuses": True, "max_nodes_ratio": 0.4},
    # what is left is compute: biased layer norms and projections, erf GELU, parallel residual
    "gpt_neox": {**_LAYER_NORM, "rope": "half-partial", "fuses": True, "max_nodes_ratio": 0.15},
    "falcon": {**_LAYER_NORM, "rope": "half", "fuses": True},
    "falcon_gqa": {**_LAYER_NORM, "rope": "half", "fuses": True},
}


def expected_fusions(architecture: str, num_layers: int) -> dict[str, int]:
    """Counts a complete `ort` rewrite of this architecture makes for `num_layers` layers."""
    facts = ARCHITECTURES[architecture]
    norms = facts["rms_norms_per_layer"] * num_layers + int(facts["final_norm"])
    return {
        "GroupQueryAttention": facts["attention_per_layer"] * num_layers,
        "rms_norms": norms,
    }


EXPORTERS = ("optimum", "dynamo")

NOT_FUSING: dict[str, dict[str, str]] = {
    # torch.onnx dynamo exports of the same tiny models: every architecture fuses
    "dynamo": {},
}


def fuses(architecture: str, exporter: str = "optimum") -> bool:
    """Whether the `ort` target fuses every layer of this architecture's `exporter` export."""
    if exporter == "optimum":
        return ARCHITECTURES[architecture]["fuses"]
    return architecture not in NOT_FUSING[exporter]


def gap(architecture: str, exporter: str = "optimum") -> str | None:
    """Why this architecture's `exporter` export does not fuse yet (None if it does)."""
    if exporter == "optimum":
        return ARCHITECTURES[architecture].get("gap")
    return NOT_FUSING[exporter].get(architecture)
