"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling, with an
optional repetition penalty, reproducible with a seed."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already seen
    seed: int | None = None


class Sampler:
    def __init__(self, config: Sampling) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def pick(self, logits: np.ndarray, seen: list[list[int]] | None) -> np.ndarray:
        """One token per row of `logits` [B, vocab], given each row's tokens so far (needed
        only with a repetition penalty)."""
        if self.config.temperature <= 0.0 and self.config.repetition_penalty == 1.0:
            return logits.argmax(-1)  # greedy: no copy of the logits on the hot path
        logits = np.array(logits, dtype=np.float32)  # a copy: the caller's buffer is reused
        if self.config.repetition_penalty != 1.0:
            for row, tokens in enumerate(seen):
                _penalize(logits[row], tokens, self.config.repetition_penalty)
        if self.config.temperature <= 0.0:
            return logits.argmax(-1)
        return np.array([self._sample(row) for row in logits])

    def _sample(self, logits: np.ndarray) -> int:
        logits = logits / self.config.temperature
        if 0 < self.config.top_k < logits.size:
            cutoff = np.partition(logits, -self.config.top_k)[-self.config.top_k]
            logits = np.where(logits < cutoff, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if self.config.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, self.config.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))


def _penalize(logits: np.ndarray, tokens: list[int], penalty: float) -> None:
    """CTRL-style: divide positive logits of seen tokens by the penalty, multiply negatives."""
    seen = np.unique(np.asarray(tokens, dtype=np.int64))
    if seen.size == 0:
        return
    values = logits[seen]
    logits[seen] = np.where(values > 0, values / penalty, values * penalty)
