"""Layers that differ in KV heads or head dim are lowered each in its own shape: every layer's
past/present buffer is [B, Hkv_l, max_context, D_l], the record lists each pair's shape, the
runtime's one arena holds a view per layer, and the model generates as PyTorch does. KV caches
of different types per layer are still refused, in one line naming them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kvfuse.errors import KvfuseError
from kvfuse.rewriter.retained_state import convert_to_retained_state
from kvfuse.rewriter.rules import KVFUSE_DOMAIN
from kvfuse.runtime.spec import read_spec

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119]
NEW_TOKENS = 16
# layer 0 keeps the model's [Hkv 2, D 16]; layer 1 has its own
LAYER_SHAPES = {
    "llama_layer_kv_heads": [(2, 16), (1, 16)],
    "llama_layer_head_dim": [(2, 16), (2, 32)],
}


@pytest.fixture(scope="module")
def pytorch_tokens(layerwise_export):
    """`pytorch_tokens(name)`: PyTorch's 16 greedy tokens after PROMPT (the model's own code)."""
    import torch
    from transformers import AutoModelForCausalLM

    done: dict[str, list[int]] = {}

    def get(name: str) -> list[int]:
        if name not in done:
            hf_dir, _ = layerwise_export(name)
            model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
            ids = list(PROMPT)
            with torch.no_grad():
                for _ in range(NEW_TOKENS):
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            done[name] = ids[len(PROMPT) :]
        return done[name]

    return get


@pytest.mark.parametrize("target", ["ort", "onnx-static"])
@pytest.mark.parametrize("name", list(LAYER_SHAPES))
def test_each_layer_keeps_its_own_cache_shape(layerwise_optimized, pytorch_tokens, name, target):
    """Both layers fused and verified, each buffer in its layer's [Hkv, D] (graph, record,
    arena views), the cache updated in place, 16 greedy tokens equal to PyTorch's."""
    import kvfuse

    result = layerwise_optimized(name, target)
    assert result.fused_layers == len(result.layers) == 2
    assert result.verification.passed and result.verification.max_abs_diff < 1e-4
    expected = [shape for shape in LAYER_SHAPES[name] for _ in ("key", "value")]
    assert result.signature.shapes == expected
    assert result.signature.kv_heads is None or result.signature.head_dim is None

    spec = read_spec(result.output)
    assert spec.kv_shapes == expected
    graph = onnx.load(spec.path, load_external_data=False).graph
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim][1:] for v in graph.input}
    assert [dims[past] for past, _ in spec.pairs] == [[h, 64, d] for h, d in expected]

    generator = kvfuse.load(result.output)
    config = kvfuse.GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = generator.generate(PROMPT, config).tokens[0]
    session = generator.session(1)
    session.check_in_place()
    _assert_one_arena(session, expected)
    assert tokens == pytorch_tokens(name)
    assert len(set(tokens)) > 1  # the random model does not just repeat one token


def _assert_one_arena(session, shapes) -> None:
    """Every layer buffer is a view of the one arena, in its own shape, none overlapping."""
    assert session.arena.ndim == 1
    assert session.kv_bytes == sum(64 * h * d for h, d in shapes) * session.arena.itemsize
    starts = [buffer.ctypes.data for buffer in session.kv]
    for buffer, (heads, dim) in zip(session.kv, shapes, strict=True):
        assert buffer.shape == (1, heads, 64, dim) and np.shares_memory(buffer, session.arena)
    ends = [start + buffer.nbytes for start, buffer in zip(starts, session.kv, strict=True)]
    assert starts[0] == session.arena.ctypes.data and starts[1:] == ends[:-1]


def test_a_record_whose_shapes_contradict_the_graph_is_refused(layerwise_optimized, tmp_path):
    """An old-style record (one kv_heads/head_dim for all layers) is read as every layer's shape;
    where the graph's layer 1 disagrees, the runtime refuses the record in one line."""
    out = tmp_path / "m.onnx"
    model = onnx.load(layerwise_optimized("llama_layer_kv_heads", "ort").output)
    prop = next(p for p in model.metadata_props if p.key == "kvfuse")
    record = json.loads(prop.value)
    assert [(p["kv_heads"], p["head_dim"]) for p in record["kv_pairs"][::2]] == [(2, 16), (1, 16)]
    assert "kv_heads" not in record and "head_dim" not in record  # layers differ
    record["kv_heads"], record["head_dim"] = 2, 16
    record["kv_pairs"] = [{"past": p["past"], "present": p["present"]} for p in record["kv_pairs"]]
    prop.value = json.dumps(record)
    onnx.save(model, out, save_as_external_data=False)
    reason = r"past_key_values\.1\.key: \[Hkv 1, D 16\] in the graph, \[Hkv 2, D 16\] here"
    with pytest.raises(KvfuseError, match=f"damaged or edited by hand .*{reason}"):
        read_spec(out)


def test_a_record_of_one_shape_for_all_layers_is_still_read(tiny_served_model, tmp_path):
    """Records written before per-layer shapes (kv_heads/head_dim only, once) give every
    layer that shape."""
    model = onnx.load(tiny_served_model)
    prop = next(p for p in model.metadata_props if p.key == "kvfuse")
    record = json.loads(prop.value)
    record["kv_pairs"] = [{"past": p["past"], "present": p["present"]} for p in record["kv_pairs"]]
    prop.value = json.dumps(record)
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=False)
    assert read_spec(tmp_path / "m.onnx").kv_shapes == [(2, 16)] * 4


def _two_layers(dtypes: list[ir.DataType]) -> ir.Model:
    """A graph of fused CachedAttention layers, layer i caching in dtypes[i]."""
    inputs, nodes, outputs = [], [], []
    for i, dtype in enumerate(dtypes):
        flat = [ir.Value(name=f"{n}{i}", type=ir.TensorType(dtype)) for n in "qkv"]
        pasts = [
            ir.Value(
                name=f"past_key_values.{i}.{kind}",
                type=ir.TensorType(dtype),
                shape=ir.Shape([1, 2, "past_sequence_length", 16]),
            )
            for kind in ("key", "value")
        ]
        node = ir.node(
            "CachedAttention",
            [*flat, *pasts],
            attributes={"num_heads": 4, "kv_num_heads": 2},
            domain=KVFUSE_DOMAIN,
            num_outputs=3,
        )
        inputs += flat + pasts
        nodes.append(node)
        outputs.append(node.outputs[0])
    graph = ir.Graph(inputs, outputs, nodes=nodes, opset_imports={"": 18, KVFUSE_DOMAIN: 1})
    return ir.Model(graph, ir_version=10)


def _never_lowered(*_args):
    raise AssertionError("a layer was lowered before the cache types were checked")


def test_layers_caching_in_different_types_are_refused():
    """One KV type for the arena: layers caching float32 and float16 are one KvfuseError
    naming each layer's type, before anything is lowered."""
    model = _two_layers([ir.DataType.FLOAT, ir.DataType.FLOAT16])
    with pytest.raises(KvfuseError, match=r"different types \(layer 0 FLOAT, layer 1 FLOAT16\)"):
        convert_to_retained_state(model, 32, 1, _never_lowered)
