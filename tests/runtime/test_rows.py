"""Steps over spans of the arena's rows, bound by pointer: what the server batches over."""

from __future__ import annotations

import numpy as np
import pytest

from kvfuse.errors import KvfuseError
from kvfuse.runtime.generate import GenerationConfig, load
from kvfuse.runtime.rows import RowSteps
from kvfuse.runtime.session import Session
from kvfuse.runtime.spec import read_spec


@pytest.fixture(scope="module")
def rows(tiny_served_model):
    return RowSteps(Session(read_spec(tiny_served_model), batch=4, threads=1))


def test_a_prompt_chunk_writes_its_row_only_and_in_place(rows):
    """A batch-1 step on row 2 fills row 2's positions and leaves every other row as it was."""
    rows.session.arena[...] = 7.0
    rows.step(2, np.array([[5, 6, 7]]), np.array([3]))
    arena = np.stack(rows.session.kv)  # every layer's buffer [B, Hkv, T, D] (one shape here)
    others = np.delete(arena, 2, axis=1)
    assert np.all(others == 7.0)
    assert not np.any(arena[:, 2, :, :3] == 7.0) and np.all(arena[:, 2, :, 3:] == 7.0)


def test_ragged_decode_over_a_span_matches_each_row_alone(rows, tiny_served_model):
    """Rows 1..3 prefilled with prompts of different lengths, then decoded together for 6
    steps: each row's greedy tokens are those of its prompt generated alone."""
    prompts = [[10, 11], [20, 21, 22, 23, 24], [30]]
    alone = load(tiny_served_model, threads=1)
    expected = [
        alone.generate(p, GenerationConfig(max_new_tokens=6, chat=False, ignore_eos=True)).tokens[0]
        for p in prompts
    ]
    tokens, lengths = [], np.array([len(p) for p in prompts])
    for row, prompt in enumerate(prompts, start=1):
        tokens.append(int(rows.step(row, np.array([prompt]), np.array([len(prompt)]))[0].argmax()))
    got = [[t] for t in tokens]
    for _ in range(5):
        lengths = lengths + 1
        logits = rows.step(1, np.array(tokens)[:, None], lengths)
        tokens = logits.argmax(-1).tolist()
        for row, token in enumerate(tokens):
            got[row].append(token)
    assert got == expected


def test_a_chunk_of_several_tokens_takes_one_row(rows):
    with pytest.raises(KvfuseError, match="single row"):
        rows.step(0, np.zeros([2, 3], np.int64), np.array([3, 3]))
    with pytest.raises(KvfuseError, match="outside"):
        rows.step(3, np.zeros([2, 1], np.int64), np.array([1, 1]))


def test_rows_of_layers_with_their_own_cache_shapes(layerwise_optimized):
    """Layer 1 caches one KV head, layer 0 two: each layer's rows are bound at that layer's own
    row addresses, and a ragged decode over rows 0..2 gives each row its tokens alone."""
    path = layerwise_optimized("llama_layer_kv_heads", "ort").output
    rows = RowSteps(Session(read_spec(path), batch=3, threads=1))
    assert [buffer.shape[1] for buffer in rows.session.kv] == [2, 2, 1, 1]
    prompts = [[10, 11, 12], [20], [30, 31, 32, 33, 34]]
    alone = load(path, threads=1)
    config = GenerationConfig(max_new_tokens=5, chat=False, ignore_eos=True)
    expected = [alone.generate(p, config).tokens[0] for p in prompts]
    tokens = [
        int(rows.step(row, np.array([p]), np.array([len(p)]))[0].argmax())
        for row, p in enumerate(prompts)
    ]
    got, lengths = [[t] for t in tokens], np.array([len(p) for p in prompts])
    for _ in range(4):
        lengths = lengths + 1
        tokens = rows.step(0, np.array(tokens)[:, None], lengths).argmax(-1).tolist()
        for row, token in enumerate(tokens):
            got[row].append(token)
    assert got == expected
