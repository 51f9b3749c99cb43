"""Layers whose KV heads or head dim differ are refused in one line naming them (the KV arena
holds one [Hkv, D] for every layer), before anything is lowered."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from kvfuse.errors import KvfuseError
from kvfuse.rewriter.retained_state import convert_to_retained_state
from kvfuse.rewriter.rules import KVFUSE_DOMAIN


def _two_layers(shapes: list[tuple[int, int]]) -> ir.Model:
    """A graph of fused CachedAttention layers, layer i caching shapes[i] = (Hkv, D)."""
    inputs, nodes, outputs = [], [], []
    for i, (kv_heads, head_dim) in enumerate(shapes):
        flat = [ir.Value(name=f"{n}{i}", type=ir.TensorType(ir.DataType.FLOAT)) for n in "qkv"]
        pasts = [
            ir.Value(
                name=f"past_key_values.{i}.{kind}",
                type=ir.TensorType(ir.DataType.FLOAT),
                shape=ir.Shape([1, kv_heads, "past_sequence_length", head_dim]),
            )
            for kind in ("key", "value")
        ]
        node = ir.node(
            "CachedAttention",
            [*flat, *pasts],
            attributes={"num_heads": 4, "kv_num_heads": kv_heads},
            domain=KVFUSE_DOMAIN,
            num_outputs=3,
        )
        inputs += flat + pasts
        nodes.append(node)
        outputs.append(node.outputs[0])
    graph = ir.Graph(inputs, outputs, nodes=nodes, opset_imports={"": 18, KVFUSE_DOMAIN: 1})
    return ir.Model(graph, ir_version=10)


def _never_lowered(*_args):
    raise AssertionError("a layer was lowered before the shapes were checked")


@pytest.mark.parametrize(
    ("shapes", "named"),
    [
        ([(2, 16), (1, 16)], r"layer 0 \[Hkv 2, D 16\], layer 1 \[Hkv 1, D 16\]"),
        ([(2, 16), (2, 32)], r"layer 0 \[Hkv 2, D 16\], layer 1 \[Hkv 2, D 32\]"),
    ],
    ids=["kv-heads", "head-dim"],
)
def test_layers_of_different_cache_shapes_are_refused(shapes, named):
    """Different KV heads or head dims per layer: one KvfuseError naming each layer's shape."""
    with pytest.raises(KvfuseError, match=f"layers differ in KV heads or head dim \\({named}\\)"):
        convert_to_retained_state(_two_layers(shapes), 32, 1, _never_lowered)
