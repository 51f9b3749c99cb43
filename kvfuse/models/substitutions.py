"""Export-friendly stand-ins for PyTorch modules that torch.export cannot trace — data.

transformers computes a mixture-of-experts MLP by looping over the experts a batch hit
(`nonzero()` then `for expert in hit`): the loop's length depends on the data, so torch.export
fails. Each entry here names the module class (as transformers spells it) and a forward that
computes the same outputs with a fixed graph: every expert runs on every token, and the router's
top-k weights (zero for the experts a token did not pick) weight the sum. The dynamo exporter
applies the entries before tracing, checks the substituted model against the original on the
example inputs and lists what it substituted in `kvfuse-export.json` (`substitutions`).

Dense routing costs E/k times the expert FLOPs of the loop; the graph stays as exported (the
optimizer fuses attention and leaves the MLP alone).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any


def dense_top_k_moe(self, hidden_states):
    """Mixtral-style sparse MoE block (softmax → top-k → renormalise), over all experts.

    Returns (hidden states [B, S, hidden], router logits [B·S, E]) as the original does."""
    import torch

    batch, length, width = hidden_states.shape
    tokens = hidden_states.view(-1, width)
    router_logits = self.gate(tokens)
    weights = torch.softmax(router_logits, dim=1, dtype=torch.float)
    top_weights, top_experts = torch.topk(weights, self.top_k, dim=-1)
    top_weights = (top_weights / top_weights.sum(dim=-1, keepdim=True)).to(tokens.dtype)
    dense = torch.zeros_like(router_logits, dtype=tokens.dtype).scatter(1, top_experts, top_weights)
    outputs = torch.stack([expert(tokens) for expert in self.experts], dim=1)  # [N, E, hidden]
    mixed = (outputs * dense.unsqueeze(-1)).sum(dim=1)
    return mixed.reshape(batch, length, width), router_logits


def dense_expert_bank(self, hidden_states, router_indices=None, routing_weights=None):
    """GPT-OSS-style expert bank (stacked gate_up/down weights, dense routing weights [N, E]):
    transformers' own all-experts branch (the one it takes off CPU), without the loop."""
    import torch

    batch = hidden_states.shape[0]
    tokens = hidden_states.reshape(-1, self.hidden_size)
    experts = routing_weights.shape[1]
    repeated = tokens.repeat(experts, 1).view(experts, -1, self.hidden_size)
    gate_up = torch.bmm(repeated, self.gate_up_proj) + self.gate_up_proj_bias[..., None, :]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=self.limit)
    up = up.clamp(min=-self.limit, max=self.limit)
    glu = gate * torch.sigmoid(gate * self.alpha)
    out = torch.bmm((up + 1) * glu, self.down_proj) + self.down_proj_bias[..., None, :]
    out = out.view(experts, batch, -1, self.hidden_size)
    weights = routing_weights.transpose(0, 1).view(experts, batch, -1)[..., None]
    return (out * weights).sum(dim=0)


@dataclasses.dataclass(frozen=True)
class Substitution:
    """Replace the forward of every module of class `module` by `forward`."""

    module: str
    forward: Callable[..., Any]
    why: str


SUBSTITUTIONS = [
    Substitution(
        "MixtralSparseMoeBlock",
        dense_top_k_moe,
        "data-dependent expert loop → all experts weighted by the router's top-k",
    ),
    Substitution(
        "GptOssExperts",
        dense_expert_bank,
        "data-dependent expert loop → all experts weighted by the dense routing scores",
    ),
]


def substitute_modules(model: Any) -> list[dict[str, Any]]:
    """Apply every matching entry of `SUBSTITUTIONS` to `model` in place.

    Args:
        model: a PyTorch module (its submodules are searched by class name).

    Returns:
        One record per substituted class: {"module", "replacement", "count", "why"}.
    """
    by_class = {entry.module: entry for entry in SUBSTITUTIONS}
    counts: dict[str, int] = {}
    for module in model.modules():
        entry = by_class.get(type(module).__name__)
        if entry is not None:
            module.forward = types.MethodType(entry.forward, module)
            counts[entry.module] = counts.get(entry.module, 0) + 1
    return [
        {
            "module": name,
            "replacement": f"{__name__}.{by_class[name].forward.__name__}",
            "count": count,
            "why": by_class[name].why,
        }
        for name, count in counts.items()
    ]
