"""Tensor layouts as values: one rule parameterised by `Layout` covers every layout.

Letters: B batch, S sequence (new or cached positions), H heads, D head dim. A layout names the
order in which the KV cache (and the attention inputs derived from it) keeps these axes:

- `BHSD`: the cache is [B, H, T, D]; projections are reshaped to [B, S, H, D] and transposed
  (Optimum / transformers' eager and sdpa attention).
- `BSHD`: the cache is [B, T, H, D]; projections reshape straight into it; attention
  transposes after the cache concat (llama.cpp-style and some hand-written graphs).
- `SBHD`: sequence-first models (Megatron-style), cache concatenated on axis 0.

A layout may keep the key cache in another order than the value cache: `Layout("BHSD",
key="BHDS")` caches K pre-transposed, [B, H, D, T], concatenated on its last axis, so that Q·Kᵀ
reads it as it is (issue 6). Only the input graph has it: every target's buffers are BHSD.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Layout:
    """One of "BHSD", "BSHD", "SBHD" (and the key cache's order when it differs); derives
    every permutation a rule needs."""

    name: str
    key: str = ""  # the key cache's axis order if not `name`'s ("BHDS": K cached as Kᵀ)

    def __post_init__(self) -> None:
        for order in (self.name, self.key_order):
            if sorted(order) != sorted("BHSD"):
                raise ValueError(f"layout must be a permutation of BHSD, got {order!r}")

    @property
    def key_order(self) -> str:
        return self.key or self.name

    @property
    def label(self) -> str:
        """The rule-name suffix: `bhsd`, or `bhsd_k_bhds` for a key cached in another order."""
        suffix = f"_k_{self.key.lower()}" if self.key_order != self.name else ""
        return self.name.lower() + suffix

    @property
    def seq_axis(self) -> int:
        """The axis the cache grows along (the Concat axis of past and new)."""
        return self.name.index("S")

    @property
    def key_seq_axis(self) -> int:
        """The axis the key cache grows along."""
        return self.key_order.index("S")

    @property
    def head_axis(self) -> int:
        return self.name.index("H")

    @property
    def projection(self) -> str:
        """The layout a projection is reshaped into before any transpose."""
        return "SBHD" if self.name.startswith("S") else "BSHD"

    def perm(self, source: str, target: str) -> list[int]:
        """The Transpose perm taking a tensor in `source` axis order to `target` order."""
        return [source.index(axis) for axis in target]

    @property
    def to_cache(self) -> list[int]:
        """Projection → cache layout."""
        return self.perm(self.projection, self.name)

    @property
    def to_key_cache(self) -> list[int]:
        """Projection → key cache order."""
        return self.perm(self.projection, self.key_order)

    @property
    def cache_to_key(self) -> list[int]:
        """Cache layout → key cache order (identity unless K is cached in another order)."""
        return self.perm(self.name, self.key_order)

    @property
    def to_bhsd(self) -> list[int]:
        """Cache layout → [B, H, S, D], the layout attention's MatMuls work in."""
        return self.perm(self.name, "BHSD")

    @property
    def key_transposed(self) -> list[int]:
        """Key cache order → [B, H, D, S], the transposed key of Q·Kᵀ (identity when K is
        cached pre-transposed: attention reads it as it is)."""
        return self.perm(self.key_order, "BHDS")

    @property
    def bhsd_to_projection(self) -> list[int]:
        """Attention output [B, H, S, D] → projection layout, before the output reshape."""
        return self.perm("BHSD", self.projection)


LAYOUTS = (Layout("BHSD"), Layout("BSHD"), Layout("SBHD"))
KEY_PRETRANSPOSED = Layout("BHSD", key="BHDS")
# what the attention rules are made for; the pre-transposed key last: its attention core has no
# key transpose, and the usual layouts must claim a transposed key first
RULE_LAYOUTS = (*LAYOUTS, KEY_PRETRANSPOSED)


def is_identity(perm: list[int]) -> bool:
    return list(perm) == sorted(perm)
