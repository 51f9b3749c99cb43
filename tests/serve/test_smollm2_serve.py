"""The real SmolLM2 served: a chat answer, UTF-8-whole deltas, concurrent greedy parity."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from kvfuse.runtime.generate import GenerationConfig, load
from kvfuse.serve import start


@pytest.fixture(scope="module")
def smollm2_server(optimized_smollm2):
    with start(optimized_smollm2.output, slots=4, threads=2) as running:
        yield running


@pytest.mark.slow
def test_smollm2_chat_streams_whole_characters(smollm2_server):
    """Paris, streamed; a French answer's accented characters arrive whole in its deltas."""
    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="-", max_retries=0)

    def ask(question: str, max_tokens: int) -> list[str]:
        chunks = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
        )
        return [c.choices[0].delta.content or "" for c in chunks if c.choices]

    assert "Paris" in "".join(ask("What is the capital of France?", 12))
    deltas = ask("Écris une phrase en français avec « café » et « été ».", 32)
    text = "".join(deltas)
    assert any(ord(character) > 127 for character in text)  # accents came through
    assert not any("\ufffd" in delta for delta in deltas)


@pytest.mark.slow
def test_smollm2_concurrent_greedy_requests_get_their_solo_tokens(
    smollm2_server, optimized_smollm2
):
    """Four prompts of different lengths at once, decoded as one batch: each gets exactly the
    tokens the runtime gives it alone."""
    generator = load(optimized_smollm2.output, threads=2)
    prompts = ["The capital of France is", "One, two, three,", "def add(a, b):", "Hi" * 40]
    solo = [
        generator.generate(p, GenerationConfig(max_new_tokens=10, chat=False)).tokens[0]
        for p in prompts
    ]
    got: dict[int, list[int]] = {}

    def ask(index: int) -> None:
        body = {"inputs": prompts[index], "parameters": {"max_new_tokens": 10, "details": True}}
        answer = httpx.post(smollm2_server.url + "/generate", json=body, timeout=300).json()
        got[index] = [token["id"] for token in answer["details"]["tokens"]]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [got.get(i) for i in range(len(prompts))] == solo
