"""How good a quantized model is: its next-token distributions against the original's.

Measured the way llama.cpp's `perplexity --kl-divergence` does: teacher-forced over a real text
(CPython's `pydoc_data.topics`, the language reference, present on every Python install), in
windows of fresh context; per position the KL divergence KL(P_original ‖ P_quantized), whether
the top-1 token agrees, and both models' perplexity of the text. Then greedy generation from
the text's first tokens, the original choosing each token and the quantized model compared at
every step; at each mismatch the original's logit margin between the two choices (mismatches
sit at near ties).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx

from kvfuse.exporters.reference import ConcatCacheRunner
from kvfuse.rewriter.rules import RULE_TAG
from kvfuse.rewriter.verify import FixedCacheRunner, _session

CHART_POINTS = 256


@dataclasses.dataclass
class Mismatch:
    step: int
    token_original: int
    token_quantized: int
    margin: float  # original's logit of its choice minus its logit of the quantized choice


@dataclasses.dataclass
class Quality:
    """Teacher-forced and greedy agreement of a quantized model with the original."""

    text: str
    tokens: int
    window: int
    accuracy_level: int | None
    kld_mean: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    same_top1: float
    perplexity_original: float
    perplexity_quantized: float
    greedy_steps: int
    greedy_equal: int
    mismatches: list[Mismatch]
    kld_by_position: list[float]  # mean KLD per bin of positions, CHART_POINTS bins at most

    def summary(self) -> str:
        return (
            f"KLD mean {self.kld_mean:.4f} (99.9% {self.kld_p999:.4f}), same top-1 "
            f"{100 * self.same_top1:.1f}%, perplexity {self.perplexity_original:.3f} → "
            f"{self.perplexity_quantized:.3f} over {self.tokens} tokens; greedy "
            f"{self.greedy_equal}/{self.greedy_steps} equal"
        )


def reference_text() -> tuple[str, str]:
    """(name, text) of the offline evaluation text."""
    from pydoc_data import topics

    return "pydoc_data.topics", "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


def measure(
    original: Path,
    candidate: bytes,
    pairs,
    kv_shape,
    token_ids: list[int],
    *,
    window: int,
    greedy_steps: int = 32,
    accuracy_level: int | None = None,
) -> Quality:
    """Compare `candidate` (one retained-state graph) with `original` over `token_ids`.

    Args:
        original: the exported model (its growing-cache graph).
        candidate: the quantized graph's bytes (last-position logits are widened to all).
        pairs, kv_shape: its past/present pairs and KV buffer shape [B, Hkv, max_context, D].
        token_ids: the text, tokenized; cut into windows of `window` tokens.
        window: positions per window (at most the KV buffer length).
        greedy_steps: greedy tokens compared after the text's first 32 tokens.
        accuracy_level: recorded with the figures.

    Returns:
        The figures.
    """
    reference = ConcatCacheRunner(None, session=_session(Path(original), optimized=True))
    quantized = FixedCacheRunner(all_position_logits(candidate), pairs, kv_shape, optimized=True)
    return compare(reference, quantized, token_ids, window, greedy_steps, accuracy_level)


def compare(
    reference, quantized, token_ids: list[int], window: int, greedy_steps: int = 32, level=None
) -> Quality:
    """The figures of any two runners with `prefill(ids)` / `step(ids)` returning logits for
    every new position (e.g. a peer's model driven by `ConcatCacheRunner`)."""
    kld, top1, nll_ref, nll_q = [], [], [], []
    for start in range(0, len(token_ids) - 1, window):
        ids = np.array([token_ids[start : start + window]], np.int64)
        if ids.shape[1] < 2:
            break
        p_log = _log_softmax(reference.prefill(ids)[0])
        q_log = _log_softmax(quantized.prefill(ids)[0])
        kld.append((np.exp(p_log) * (p_log - q_log)).sum(-1))
        top1.append(p_log.argmax(-1) == q_log.argmax(-1))
        targets = ids[0, 1:]
        nll_ref.append(-p_log[np.arange(len(targets)), targets])
        nll_q.append(-q_log[np.arange(len(targets)), targets])
    kld_all = np.concatenate(kld)
    mismatches, equal = _greedy(reference, quantized, token_ids[:32], greedy_steps)
    return Quality(
        text=reference_text()[0],
        tokens=int(kld_all.size),
        window=window,
        accuracy_level=level,
        kld_mean=float(kld_all.mean()),
        kld_p99=float(np.percentile(kld_all, 99)),
        kld_p999=float(np.percentile(kld_all, 99.9)),
        kld_max=float(kld_all.max()),
        same_top1=float(np.concatenate(top1).mean()),
        perplexity_original=float(np.exp(np.concatenate(nll_ref).mean())),
        perplexity_quantized=float(np.exp(np.concatenate(nll_q).mean())),
        greedy_steps=greedy_steps,
        greedy_equal=equal,
        mismatches=mismatches,
        kld_by_position=_bins(kld_all),
    )


def _greedy(reference, quantized, prompt: list[int], steps: int):
    """The original picks each token; the quantized model's pick is compared at each step."""
    ids = np.array([prompt], np.int64)
    expected, found = reference.prefill(ids)[0, -1], quantized.prefill(ids)[0, -1]
    mismatches, equal = [], 0
    for step in range(steps):
        choice, other = int(expected.argmax()), int(found.argmax())
        if choice == other:
            equal += 1
        else:
            margin = float(expected[choice] - expected[other])
            mismatches.append(Mismatch(step, choice, other, margin))
        token = np.array([[choice]], np.int64)
        expected, found = reference.step(token)[0, -1], quantized.step(token)[0, -1]
    return mismatches, equal


def all_position_logits(model: bytes) -> bytes:
    """The graph with logits for every position: the last-position gather bypassed."""
    proto = onnx.load_from_string(model)
    graph = proto.graph
    gathers = [
        node
        for node in graph.node
        if node.op_type == "GatherElements"
        and any(
            p.key == RULE_TAG and p.value == "logits/last_position" for p in node.metadata_props
        )
    ]
    if not gathers:
        return model
    gather = gathers[0]
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == gather.output[0]:
                node.input[index] = gather.input[0]
    graph.node.remove(gather)
    for output in graph.output:
        if output.name == "logits":
            output.type.tensor_type.shape.dim[1].dim_param = "sequence_length"
    kept = [v for v in graph.value_info if v.name not in _downstream(graph, gather.input[0])]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return proto.SerializeToString()


def _downstream(graph, name: str) -> set[str]:
    """Every tensor computed from `name` (their recorded shapes change)."""
    reached, changed = {name}, True
    while changed:
        changed = False
        for node in graph.node:
            if reached.intersection(node.input) and not reached.issuperset(node.output):
                reached.update(node.output)
                changed = True
    return reached


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _bins(values: np.ndarray) -> list[float]:
    bins = np.array_split(values, min(CHART_POINTS, values.size))
    return [float(b.mean()) for b in bins]
