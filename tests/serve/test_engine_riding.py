"""`chunk_while_decoding=0`: prompts admitted while other rows decode ride along in the decode
step, one token each, and every request still gets exactly its solo greedy tokens."""

from __future__ import annotations

import threading

from kvfuse.runtime.generate import GenerationConfig, load
from kvfuse.serve import Engine
from kvfuse.serve.engine import Params


def test_prompts_ride_along_in_the_decode_step(tiny_served_model):
    generator = load(tiny_served_model, threads=1)
    prompts = [generator.text.encode("hello world, " * (1 + i), chat=False) for i in range(6)]
    solo = [
        generator.generate(p, GenerationConfig(max_new_tokens=12, chat=False)).tokens[0]
        for p in prompts
    ]
    engine = Engine(tiny_served_model, slots=4, threads=1, prefill_chunk=8, chunk_while_decoding=0)
    chunks_while_decoding, ridden = [], []
    chunk, decode = engine._prefill_chunk, engine._decode

    def watched_chunk(row, size):
        decoding = [r for r in engine._rows if r.request and r.request.state == "decode"]
        chunks_while_decoding.append(bool(decoding))
        return chunk(row, size)

    def watched_decode(rows, riding=False):
        ridden.append(sum(1 for r in engine._rows if r.request and r.request.state == "prefill"))
        return decode(rows, riding)

    engine._prefill_chunk, engine._decode = watched_chunk, watched_decode
    got: dict[int, list[int]] = {}

    def ask(index: int) -> None:
        request, _ = engine.generate(prompts[index], Params(max_new_tokens=12))
        got[index] = request.new

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        engine.close()
    assert [got[i] for i in range(len(prompts))] == solo
    assert not any(chunks_while_decoding)  # no chunk step while a row was decoding
    assert sum(ridden) > 0  # prompt tokens went through decode steps
