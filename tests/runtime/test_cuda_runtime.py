"""The `cuda` target on the real CUDA provider (GPU machines only; see benchmarks/gpu_session.sh).

The model (`kvfuse optimize smollm2 OUT --target cuda`) and the float32 reference trace
(`python -m tests.runtime.cuda_trace` on the CPU `ort` model) are named by KVFUSE_CUDA_MODEL
and KVFUSE_CUDA_REFERENCE: the GPU machine has no exporter to make them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvfuse.rewriter.verify import HALF_TOLERANCE
from tests.runtime.cuda_trace import QUESTION, greedy_trace

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def cuda_model():
    from kvfuse.runtime.device import NO_DEVICE, cuda_available

    if not cuda_available():
        pytest.skip(NO_DEVICE)
    model, reference = os.environ.get("KVFUSE_CUDA_MODEL"), os.environ.get("KVFUSE_CUDA_REFERENCE")
    if not model or not reference:
        pytest.fail("set KVFUSE_CUDA_MODEL and KVFUSE_CUDA_REFERENCE (benchmarks/gpu_session.sh)")
    return model, dict(np.load(reference))


@pytest.fixture(scope="module")
def traces(cuda_model):
    from kvfuse.runtime.generate import load

    model, _ = cuda_model
    graph = load(model, device="cuda", cuda_graph=True)
    eager = load(model, device="cuda", cuda_graph=False)
    return {"graph": (graph, greedy_trace(graph)), "eager": (eager, greedy_trace(eager))}


def test_verification_on_the_gpu(cuda_model, traces):
    """Prefill + 8 decode steps of the float16 model on CUDA are within the optimizer's float16
    tolerance of the float32 CPU model's logits."""
    _, reference = cuda_model
    atol, rtol = HALF_TOLERANCE["float16"]
    found, expected = traces["eager"][1]["logits"], reference["logits"]
    used = np.abs(found - expected) / (atol + rtol * np.abs(expected))
    print(f"\nmax |Δlogits| {np.abs(found - expected).max():.3e}, tolerance used {used.max():.2f}")
    assert used.max() <= 1.0


def test_greedy_parity_with_cpu_float32(cuda_model, traces):
    """32 greedy tokens on the GPU equal the float32 CPU model's, or the first mismatch is a
    near tie of the reference (its top-2 margin within float16's tolerance)."""
    _, reference = cuda_model
    tokens = traces["graph"][1]["tokens"]
    assert np.array_equal(traces["graph"][1]["prompt"], reference["prompt"])
    mismatch = np.flatnonzero(tokens != reference["tokens"])
    if mismatch.size:
        first = int(mismatch[0])
        margin = float(reference["margins"][first])
        print(f"\nfirst mismatch at token {first}: reference margin {margin:.3f}")
        assert margin <= HALF_TOLERANCE["float16"][0] * 2, (first, margin)
    else:
        print(
            f"\n{len(tokens)} greedy tokens equal; smallest margin {reference['margins'].min():.3f}"
        )


def test_buffers_stay_where_they_were_put(traces):
    """KV presents are written at their arena slice; the decode inputs never move."""
    generator, _ = traces["graph"]
    session = generator.session(1)
    addresses = (session._ids.data_ptr(), session._seqlens.data_ptr())
    session.check_in_place()
    presents = {value.data_ptr() for value in session._decode.get_outputs()}
    assert set(session.kv_addresses) <= presents
    others = {session._decode_logits.data_ptr(), session._next.data_ptr()}
    assert presents - set(session.kv_addresses) == others
    greedy_trace(generator, steps=4)
    assert (session._ids.data_ptr(), session._seqlens.data_ptr()) == addresses
    assert session.decode_runs >= 36


def test_cuda_graph_replay_equals_eager(traces):
    """Replayed decode steps give the eager steps' tokens and logits."""
    graph, eager = traces["graph"][1], traces["eager"][1]
    assert np.array_equal(graph["tokens"], eager["tokens"])
    difference = np.abs(graph["logits"] - eager["logits"]).max()
    print(f"\nreplay vs eager: max |Δlogits| {difference:.3e}")
    assert difference <= 1e-3


def test_greedy_picked_on_the_device(traces):
    """`generate` with greedy sampling takes the graph's own ArgMax (8 bytes back per step)
    and gets the tokens the host's argmax over the copied logits gets."""
    from kvfuse.runtime.generate import GenerationConfig

    generator, trace = traces["graph"]
    assert generator.session(1).picks_greedy
    completion = generator.generate(
        QUESTION, GenerationConfig(max_new_tokens=len(trace["tokens"]), ignore_eos=True)
    )
    assert completion.tokens[0] == trace["tokens"].tolist()
    print(f"\n{completion.texts[0]!r} at {completion.stats.decode_tokens_per_s:.0f} tokens/s")


def test_server_engine_on_the_gpu(cuda_model, traces):
    """`kvfuse serve --device cuda`'s engine (KV rows in device memory, eager steps) gives a
    request the greedy tokens `generate` gives on the GPU."""
    from kvfuse.serve.engine import Engine, Params

    model, _ = cuda_model
    trace = traces["graph"][1]
    engine = Engine(model, slots=2, device="cuda")
    try:
        _, events = engine.generate(
            trace["prompt"].tolist(), Params(max_new_tokens=16, ignore_eos=True)
        )
    finally:
        engine.close()
    tokens = [e.token for e in events if e.token is not None]
    assert tokens == trace["tokens"][:16].tolist()
