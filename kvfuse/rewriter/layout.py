"""Tensor layouts as values: one rule parameterised by `Layout` covers every layout.

Letters: B batch, S sequence (new or cached positions), H heads, D head dim. A layout names the
order in which the KV cache (and the attention inputs derived from it) keeps these axes:

- `BHSD`: the cache is [B, H, T, D]; projections are reshaped to [B, S, H, D] and transposed
  (Optimum / transformers' eager and sdpa attention).
- `BSHD`: the cache is [B, T, H, D]; projections reshape straight into it; attention
  transposes after the cache concat (llama.cpp-style and some hand-written graphs).
- `SBHD`: sequence-first models (Megatron-style), cache concatenated on axis 0.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Layout:
    """One of "BHSD", "BSHD", "SBHD"; derives every permutation a rule needs."""

    name: str

    def __post_init__(self) -> None:
        if sorted(self.name) != sorted("BHSD"):
            raise ValueError(f"layout must be a permutation of BHSD, got {self.name!r}")

    @property
    def seq_axis(self) -> int:
        """The axis the cache grows along (the Concat axis of past and new)."""
        return self.name.index("S")

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
    def to_bhsd(self) -> list[int]:
        """Cache layout → [B, H, S, D], the layout attention's MatMuls work in."""
        return self.perm(self.name, "BHSD")

    @property
    def key_transposed(self) -> list[int]:
        """Cache layout → [B, H, D, S], the transposed key of Q·Kᵀ."""
        return self.perm(self.name, "BHDS")

    @property
    def bhsd_to_projection(self) -> list[int]:
        """Attention output [B, H, S, D] → projection layout, before the output reshape."""
        return self.perm("BHSD", self.projection)


LAYOUTS = (Layout("BHSD"), Layout("BSHD"), Layout("SBHD"))


def is_identity(perm: list[int]) -> bool:
    return list(perm) == sorted(perm)
