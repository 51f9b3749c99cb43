"""Which nodes must stay float32: the half graph run against the float32 graph, tensor by tensor.

Models trained in float32 or bfloat16 can leave float16's range (±65,504) in places: the
residual stream, MLP activations. Two checks, both on the verification prompt's prefill:

1. overflow — every tensor of the float32 graph whose magnitude exceeds `HALF_SAFE` (float16
   only): its producer and every node reading it stay float32 (for a residual sum that is the
   layer's SkipSimplifiedLayerNormalization chain: the residual path stays float32);
2. divergence — the half graph (with what 1 kept) is run; the first tensor in graph order that
   is not finite where float32's is, or differs by more than `DIVERGENCE` of its float32
   magnitude, names the next node to keep. Repeat until the half graph passes verification
   against the original, or fail: nothing is written.

GroupQueryAttention has no float32 kernel on CUDA, so it is never kept; an attention that
breaks in float16 is an error naming the layer (bfloat16 has float32's range).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from kvfuse.errors import KvfuseError
from kvfuse.rewriter.precision import CAST_PREFIX, to_half

HALF_SAFE = 32768.0  # half of float16's largest value: room for the rounding of a sum
DIVERGENCE = 0.1  # |Δ|max / |float32|max of one tensor; float16's own error is ~1e-3
HALF_ONLY = {"GroupQueryAttention"}  # no float32 kernel on the CUDA provider
MAX_ROUNDS = 12


@dataclasses.dataclass
class KeptNode:
    """A node left in float32, and why."""

    node: str
    op_type: str
    reason: str


@dataclasses.dataclass
class PrecisionChoice:
    dtype: str
    kept: list[KeptNode]
    rounds: int
    counts: dict[str, int]


def choose_precision(
    lowered: bytes, dtype: str, run_prefill, verify_half
) -> tuple[bytes, PrecisionChoice, object]:
    """Convert `lowered` (float32, serialized) to `dtype`, keeping in float32 what must be.

    Args:
        lowered: the lowered float32 model.
        dtype: "float16" or "bfloat16".
        run_prefill: model bytes → {tensor name: array} of one prefill on the verification
            prompt, every node output included.
        verify_half: model bytes → a `Verification` against the original.

    Returns:
        The half model's bytes, what was kept in float32 and why, and its verification.
    """
    probe = _with_all_outputs(onnx.load_from_string(lowered))
    reference = run_prefill(probe.SerializeToString())
    order = [(n.name, n.op_type, list(n.input), list(n.output)) for n in probe.graph.node]
    if dtype == "float16":
        reference.update(_weights(probe))  # a weight beyond float16's range counts too
    kept = _overflowing(order, reference) if dtype == "float16" else []
    for rounds in range(1, MAX_ROUNDS + 1):
        candidate, counts = _convert(lowered, dtype, kept)
        found = run_prefill(_with_all_outputs(onnx.load_from_string(candidate)).SerializeToString())
        offender = _first_divergence(order, reference, found, {k.node for k in kept})
        verification = verify_half(candidate)
        if offender is None and verification.passed:
            return candidate, PrecisionChoice(dtype, kept, rounds, counts), verification
        if offender is None:
            raise KvfuseError(
                f"{dtype}: {verification.summary()}, and no single tensor diverges past "
                f"{DIVERGENCE:.0%} of its float32 magnitude to keep in float32; nothing was written"
            )
        if offender.op_type in HALF_ONLY:
            raise KvfuseError(
                f"{offender.node} ({offender.op_type}) {offender.reason} in {dtype} and has no "
                "float32 kernel on CUDA; try --dtype bfloat16 (float32's range); nothing was "
                "written"
            )
        kept.append(offender)
    raise KvfuseError(f"{dtype}: still diverging after keeping {len(kept)} nodes in float32")


def _convert(lowered: bytes, dtype: str, kept: list[KeptNode]) -> tuple[bytes, dict]:
    model = ir.serde.deserialize_model(onnx.load_from_string(lowered))
    counts = to_half(model, dtype, frozenset(k.node for k in kept))
    return ir.serde.serialize_model(model).SerializeToString(), counts


def _with_all_outputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every node output (but the precision casts') also a graph output, to be compared."""
    present = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        if node.name.startswith(CAST_PREFIX):
            continue
        for name in node.output:
            if name and name not in present:
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                present.add(name)
    return proto


def _weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The float32 initializers, as arrays (only their range is read)."""
    from onnx import numpy_helper

    return {
        t.name: numpy_helper.to_array(t)
        for t in proto.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    }


def _overflowing(order, reference: dict[str, np.ndarray]) -> list[KeptNode]:
    """Producers and readers of float32 tensors beyond float16's safe range."""
    kept: dict[str, KeptNode] = {}
    large: set[str] = set()
    produced = {output for _, _, _, outputs in order for output in outputs}
    for name, op, _, outputs in order:
        for output in outputs:
            value = reference.get(output)
            if value is None or value.dtype != np.float32 or value.size == 0:
                continue
            peak = float(np.abs(value).max())
            if peak > HALF_SAFE:
                reason = f"overflow: {output} reaches |x| {peak:.3g} (float16 max 65504)"
                kept.setdefault(name, KeptNode(name, op, reason))
                large.add(output)
    large |= {
        name
        for name, value in reference.items()
        if name not in produced
        and value.dtype == np.float32
        and value.size
        and float(np.abs(value).max()) > HALF_SAFE
    }
    for name, op, inputs, _ in order:
        tensor = next((t for t in inputs if t in large), None)
        if tensor is not None and name not in kept:
            kept[name] = KeptNode(name, op, f"reads {tensor}, beyond float16's range")
    return list(kept.values())


def _first_divergence(order, reference, found, kept: set[str]) -> KeptNode | None:
    """The first node (graph order) whose output is not finite or too far from float32's."""
    for name, op, _, outputs in order:
        if name in kept:
            continue
        for output in outputs:
            expected, value = reference.get(output), found.get(output)
            if expected is None or value is None or expected.dtype != np.float32:
                continue
            value = value.astype(np.float32)
            if not np.isfinite(value).all() and np.isfinite(expected).all():
                return KeptNode(name, op, f"overflows: {output} is not finite")
            scale = float(np.abs(expected).max()) or 1.0
            error = float(np.abs(value - expected).max()) / scale
            if error > DIVERGENCE:
                return KeptNode(name, op, f"diverges: {output} off by {error:.1%} of its range")
    return None
