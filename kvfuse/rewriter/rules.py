"""What a kvfuse rule is, and how the engine applies rule stages and keeps near misses.

A rule is an onnxscript `RewriteRuleClassBase` with a stable `family/variant` name. `check()`
returns `fail(reason, *culprits)` (one failure convention); rules hold no state between check
and rewrite. Nodes a rule creates carry its name in their metadata (`kvfuse.rule`) and the
input-graph nodes they replaced (`kvfuse.replaced`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _basics, pattern

KVFUSE_DOMAIN = "ai.kvfuse"
RULE_TAG = "kvfuse.rule"
REPLACED_TAG = "kvfuse.replaced"  # JSON list of [name, op_type] of the input-graph nodes replaced
# which lowering a layer's attention took (a short kind, e.g. "gqa-rotary") and why
LOWERING_TAG = "kvfuse.lowering"
LOWERING_REASON_TAG = "kvfuse.lowering_reason"


class Rule(pattern.RewriteRuleClassBase):
    """Base of every kvfuse rule; subclasses set `name` through `__init__`."""

    def __init__(self, name: str, **kwargs) -> None:
        super().__init__(name=name, **kwargs)


def fail(reason: str, *culprits: ir.Node | ir.Value | None) -> pattern.MatchResult:
    """The one way a check declines: a reason saying expected vs found, and the culprits."""
    return pattern.MatchResult().fail(reason, [c for c in culprits if c is not None])


def like(value: ir.Value, reference: ir.Value) -> ir.Value:
    """Give a value a rule created the dtype and shape of the value it replaces, so that shape
    inference can continue through kvfuse ops (which ONNX does not know)."""
    value.dtype = reference.dtype
    if reference.shape is not None:
        value.shape = ir.Shape(reference.shape)
    return value


def take_over(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Point every use and graph-output slot of `old` at `new`, keeping an output's name."""
    name = old.name
    for index, output in enumerate(graph.outputs):
        if output is old:
            old.name = f"{name}__replaced"
            new.name = name
            graph.outputs[index] = new
    ir.convenience.replace_all_uses_with(old, new)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register `array` as an initializer named `name` (or `name.1`, … if that is taken: an
    exporter may share one tensor between layers, each rewrite of it needs its own)."""
    base, index = name, 1
    while name in graph.initializers:
        name, index = f"{base}.{index}", index + 1
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def add_constant(graph: ir.Graph, anchor: ir.Node, array: np.ndarray) -> ir.Value:
    """A Constant node holding `array`, inserted before `anchor`; its output carries the value
    (so shape plumbing can read it before constant folding runs)."""
    tensor = ir.tensor(np.asarray(array))
    node = ir.node("Constant", [], attributes={"value": tensor})
    graph.insert_before(anchor, node)
    output = node.outputs[0]
    output.const_value, output.shape, output.dtype = tensor, ir.Shape(tensor.shape), tensor.dtype
    return output


def ok() -> pattern.MatchResult:
    return pattern.MatchResult()


@dataclasses.dataclass
class NearMiss:
    """The closest a rule came to matching at one root node, and why it stopped."""

    rule: str
    root: str
    matched_nodes: int
    reason: str
    culprits: list[str]


class NearMissTracer(_basics.MatchingTracer):
    """Records, for every (rule, root node), the best failed attempt and its reason."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: dict[tuple[str, str], NearMiss] = {}
        self.roots: dict[str, ir.Node] = {}  # root label → node, to place a miss in its layer

    def log(self, rule, container, node, match_result, status) -> None:  # noqa: D102
        super().log(rule, container, node, match_result, status)
        if status == _basics.MatchStatus.SUCCESS:
            return
        culprits = [
            getattr(item, "name", None) or str(item)
            for item in match_result.failure_nodes_and_values
        ]
        miss = NearMiss(
            rule=rule.name,
            root=node.name or node.op_type,
            matched_nodes=len(match_result.nodes),
            reason=match_result.reason or "structure differs",
            culprits=culprits,
        )
        key = (rule.name, miss.root)
        self.roots[miss.root] = node
        if key not in self.attempts or miss.matched_nodes > self.attempts[key].matched_nodes:
            self.attempts[key] = miss


def apply_rules(model: ir.Model, rules: Sequence[pattern.RewriteRule]) -> dict[str, int]:
    """Apply each rule in order (each to a fixpoint of one sweep); return per-rule counts."""
    counts = {}
    for rule in rules:
        rule_set = pattern.RewriteRuleSet([rule], commute=True)
        for variant in rule_set.rules:  # the rule and its commuted copies
            _record_replacements(variant)
        counts[rule.name] = rule_set.apply_to_model(model)
    return counts


def _record_replacements(rule: pattern.RewriteRule) -> None:
    """Make `rule` stamp on the nodes it creates which nodes it replaced (provenance), looking
    through kvfuse nodes an earlier rule created, so the final ops name input-graph nodes."""
    original = rule.try_rewrite

    def try_rewrite(*args, **kwargs):
        replacement = original(*args, **kwargs)
        if replacement is not None:
            replaced = [entry for node in replacement.match.nodes for entry in replaced_by(node)]
            for node in replacement.new_nodes:
                node.metadata_props[RULE_TAG] = rule.name
                node.metadata_props[REPLACED_TAG] = json.dumps(replaced)
        return replacement

    rule.try_rewrite = try_rewrite


def replaced_by(node: ir.Node) -> list[list[str]]:
    """The input-graph nodes `node` stands for: itself, or what a rule recorded on it."""
    if REPLACED_TAG in node.metadata_props:
        return json.loads(node.metadata_props[REPLACED_TAG])
    return [[node.name or "", node.op_type]]


def trace_rules(model: ir.Model, rules: Sequence[pattern.RewriteRule]) -> NearMissTracer:
    """Dry-run `rules` with a tracer (nothing changes) to learn why candidates failed."""
    tracer = NearMissTracer()
    pattern.RewriteRuleSet(list(rules), commute=True).apply_to_model(model, tracer=tracer)
    return tracer
