"""The rewrite pipeline: a short list of named stages run top to bottom on an onnx_ir model.

A stage is either a list of rules (applied one rule at a time, counted per rule) or a graph
pass (a function of the model). Targets are defined in `kvfuse.patterns.targets`; this engine
knows no rule by name.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time
from collections.abc import Callable, Sequence

import onnx_ir as ir
from onnxscript.rewriter import pattern

from kvfuse.rewriter.rules import KVFUSE_DOMAIN, NearMiss, apply_rules, trace_rules


@dataclasses.dataclass
class Stage:
    """One named step: rules to apply, or a graph pass `run(model) -> dict | None`."""

    name: str
    rules: Sequence[pattern.RewriteRule] = ()
    run: Callable[[ir.Model], dict | None] | None = None


@dataclasses.dataclass
class StageRecord:
    name: str
    seconds: float
    counts: dict[str, int]
    nodes_after: int


@dataclasses.dataclass
class LayerOutcome:
    """Whether one attention candidate (a Softmax of the input graph) was fused."""

    layer: str
    fused: bool
    near_misses: list[NearMiss]
    lowering: str = ""  # the target's lowering of the fused layer (e.g. "gqa-rotary")
    lowering_reason: str = ""  # why that lowering (e.g. the kernel limit another avoids)


def run_stages(model: ir.Model, stages: Sequence[Stage]) -> list[StageRecord]:
    """Run `stages` in order; returns what each did."""
    records = []
    for stage in stages:
        start = time.perf_counter()
        if stage.rules:
            counts = apply_rules(model, stage.rules)
        else:
            counts = stage.run(model) or {}
        records.append(
            StageRecord(stage.name, time.perf_counter() - start, counts, count_nodes(model))
        )
    return records


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def op_histogram(model: ir.Model) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.all_nodes()).most_common())


# the dynamo exporter names nodes by op (`node_Softmax_261`) and records the module path
# (`...m.model.layers.0.self_attn: LlamaAttention/...`) in this metadata entry instead
MODULE_PATH = "namespace"
LAYER_NAME = re.compile(r"(?:layers?|h|blocks?|past_key_values)[./_](\d+)")


def layer_of(name: str) -> str | None:
    """The layer index a node name mentions (`/model/layers.3/...` → "3"), if any."""
    match = LAYER_NAME.search(name or "")
    return match.group(1) if match else None


def node_layer(node: ir.Node, depth: int = 12) -> str | None:
    """The layer a node belongs to: from its name or module path, else from the nearest ancestor
    (nodes a rule creates have generic names; their inputs lead back to the layer)."""
    frontier = [node]
    for _ in range(depth):
        next_frontier = []
        for current in frontier:
            layer = layer_of(current.name) or layer_of(current.metadata_props.get(MODULE_PATH))
            if layer is not None:
                return layer
            for value in current.inputs:
                if value is None:
                    continue
                if value.producer() is None and layer_of(value.name) is not None:
                    return layer_of(value.name)
                if value.producer() is not None:
                    next_frontier.append(value.producer())
        frontier = next_frontier
    return None


def attention_candidates(model: ir.Model) -> list[str]:
    """One label per attention candidate: the layer of each Softmax that weights a computed
    tensor (probs · V), or its node name. A Softmax that does not — an MoE router's, whose
    probabilities pick experts through TopK or scale expert outputs — is no attention."""
    return [node_layer(n) or n.name for n in model.graph if _is_candidate(n)]


def _is_candidate(node: ir.Node) -> bool:
    return node.op_type == "Softmax" and weights_values(node.outputs[0])


# ops a softmax's probabilities pass through on their way to probs · V (casts, the NaN guard,
# a sink column sliced off, dropout kept in an export)
_PROBABILITY_PASSTHROUGH = {"Cast", "Where", "Slice", "Dropout", "Identity", "Reshape"}


def weights_values(probs: ir.Value, depth: int = 4) -> bool:
    """Whether `probs` reaches MatMul(probs, x) with a computed x (not a weight) within
    `depth` pass-through ops."""
    frontier = [probs]
    for _ in range(depth + 1):
        next_frontier = []
        for value in frontier:
            for user, index in value.uses():
                if user.op_type == "MatMul" and index == 0:
                    other = user.inputs[1]
                    if (
                        other is not None
                        and other.const_value is None
                        and not other.is_initializer()
                    ):
                        return True
                elif user.op_type in _PROBABILITY_PASSTHROUGH:
                    next_frontier.extend(user.outputs)
        frontier = next_frontier
    return False


def attention_outcomes(
    model: ir.Model,
    candidates: list[str],
    explain_rules: Sequence[pattern.RewriteRule],
    diagnose: Callable[[ir.Node], NearMiss | None] | None = None,
) -> list[LayerOutcome]:
    """Which candidates fused: those whose Softmax (or partial kvfuse Attention) is gone."""
    left = [
        node_layer(n) or n.name
        for n in model.graph
        if _is_candidate(n) or (n.domain == KVFUSE_DOMAIN and n.op_type == "Attention")
    ]
    misses: dict[str | None, list[NearMiss]] = collections.defaultdict(list)
    diagnoses: dict[str, NearMiss] = {}
    for node in model.graph:
        attention = node.domain == KVFUSE_DOMAIN and node.op_type == "Attention"
        if diagnose is not None and (_is_candidate(node) or attention):
            found = diagnose(node)
            if found is not None:
                diagnoses[node_layer(node) or node.name] = found
    if left:
        tracer = trace_rules(model, explain_rules)
        for miss in tracer.attempts.values():
            if miss.matched_nodes >= 2:
                misses[node_layer(tracer.roots[miss.root]) or miss.root].append(miss)
    outcomes = []
    for layer in candidates:
        best = sorted(misses.get(layer, []), key=lambda m: -m.matched_nodes)[:3]
        if layer in diagnoses:  # plain-words first failed constraint goes first
            best.insert(0, diagnoses[layer])
        outcomes.append(LayerOutcome(layer, layer not in left, best))
    return outcomes
