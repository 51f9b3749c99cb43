"""The TGI routes through huggingface_hub's InferenceClient, and raw SSE as proxies see it."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from kvfuse.runtime.generate import GenerationConfig, load
from tests.serve.conftest import metric, still_serves


@pytest.fixture(scope="module", autouse=True)
def loopback_hub_client():
    """huggingface_hub refuses every request under HF_HUB_OFFLINE=1; let its client reach
    127.0.0.1 only (everything else stays refused), for this module's tests."""
    import huggingface_hub
    import requests
    from huggingface_hub.utils._http import OfflineAdapter

    def session() -> requests.Session:
        made = requests.Session()
        made.mount("http://", OfflineAdapter())
        made.mount("https://", OfflineAdapter())
        made.mount("http://127.0.0.1:", requests.adapters.HTTPAdapter())
        return made

    huggingface_hub.configure_http_backend(backend_factory=session)
    yield
    huggingface_hub.configure_http_backend()


@pytest.fixture(scope="module")
def client(server):
    return InferenceClient(base_url=server.url)


def test_text_generation_whole_and_streamed(client):
    """Greedy by default (no do_sample): details name every token; the stream's tokens carry
    the same ids and its last event the whole text and the details."""
    whole = client.text_generation("hello", max_new_tokens=10, details=True)
    assert whole.details.generated_tokens == len(whole.details.tokens) <= 10
    events = list(client.text_generation("hello", max_new_tokens=10, details=True, stream=True))
    assert [e.token.id for e in events if not e.token.special] == [
        t.id for t in whole.details.tokens
    ]
    assert "".join(e.token.text for e in events) == whole.generated_text
    assert events[-1].generated_text == whole.generated_text
    assert events[-1].details.finish_reason == whole.details.finish_reason
    assert all(e.generated_text is None for e in events[:-1])


def test_sampling_reports_and_reproduces_its_seed(client):
    def sample(seed=None):
        return client.text_generation(
            "abc", max_new_tokens=12, do_sample=True, temperature=1.3, seed=seed, details=True
        )

    first = sample(seed=5)
    assert first.details.seed == 5 and sample(seed=5).generated_text == first.generated_text
    unseeded = sample()
    assert unseeded.details.seed is not None
    assert sample(seed=unseeded.details.seed).generated_text == unseeded.generated_text


def test_stop_sequence(client):
    full = client.text_generation("xyz", max_new_tokens=30, details=True)
    stop = full.generated_text[4:7]
    cut = full.generated_text[: full.generated_text.index(stop)]
    stopped = client.text_generation("xyz", max_new_tokens=30, stop=[stop], details=True)
    assert stopped.generated_text == cut
    assert stopped.details.finish_reason == "stop_sequence"
    streamed = list(client.text_generation("xyz", max_new_tokens=30, stop=[stop], stream=True))
    assert "".join(streamed) == cut


def test_chat_completion_through_the_openai_route(client):
    answer = client.chat_completion(
        [{"role": "user", "content": "hi"}], max_tokens=6, temperature=0.0
    )
    streamed = client.chat_completion(
        [{"role": "user", "content": "hi"}], max_tokens=6, temperature=0.0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == answer.choices[0].message.content and answer.usage.completion_tokens <= 6


def test_raw_routes_and_shapes(server):
    """POST / answers a list; /generate a dict; /generate_stream pings first and sends one
    `data:` line per event; /info and /health answer; bad bodies are 422 in TGI's shape."""
    body = {"inputs": "ab", "parameters": {"max_new_tokens": 4, "details": True}}
    listed = httpx.post(server.url + "/", json=body).json()
    single = httpx.post(server.url + "/generate", json=body).json()
    assert isinstance(listed, list) and listed[0]["generated_text"] == single["generated_text"]
    assert single["details"]["input_length"] == 2
    with httpx.stream("POST", server.url + "/generate_stream", json=body) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert lines[0].startswith(":")  # a comment before the first token: proxies see a byte
    events = [json.loads(line[len("data:") :]) for line in lines if line.startswith("data:")]
    assert len(events) == len(lines) - 1
    assert events[-1]["generated_text"] == single["generated_text"]
    info = httpx.get(server.url + "/info").json()
    assert info["max_total_tokens"] == 128 and info["model_id"] == server.engine.name
    assert httpx.get(server.url + "/health").status_code == 200
    for bad in ({"inputs": ""}, {"inputs": "a", "parameters": {"temperature": -1}}):
        refused = httpx.post(server.url + "/generate", json=bad)
        assert refused.status_code == 422 and refused.json()["error_type"] == "validation"
    over = httpx.post(server.url + "/generate", json={"inputs": "a" * 128, "parameters": {}})
    assert over.status_code == 422 and "maximum context length is 128" in over.json()["error"]
    assert "128 input tokens and asks for 1 new tokens" in over.json()["error"]
    assert still_serves(server.url)


def test_sixteen_concurrent_clients_get_their_solo_greedy_tokens(server, tiny_served_model):
    """16 clients at once (4 rows: 12 wait), prompts of 1 to 76 tokens (several prefill
    chunks), streaming and not, both APIs: each gets exactly the tokens the runtime gives
    that prompt alone."""
    prompts = [("hello world, " * 6)[: 1 + 5 * i] for i in range(16)]
    generator = load(tiny_served_model, threads=1)
    solo = [
        generator.generate(p, GenerationConfig(max_new_tokens=20, chat=False)).tokens[0]
        for p in prompts
    ]
    got: dict[int, list[int] | str] = {}

    def ask(index: int) -> None:
        prompt = prompts[index]
        if index % 4 == 0:  # OpenAI completions, streamed: compare the text
            oa = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
            chunks = oa.completions.create(
                model="m", prompt=prompt, max_tokens=20, temperature=0.0, stream=True
            )
            got[index] = "".join(c.choices[0].text for c in chunks)
            return
        tgi = InferenceClient(base_url=server.url)
        if index % 4 == 1:
            events = tgi.text_generation(prompt, max_new_tokens=20, details=True, stream=True)
            got[index] = [e.token.id for e in events if not e.token.special]
        else:
            answer = tgi.text_generation(prompt, max_new_tokens=20, details=True)
            got[index] = [t.id for t in answer.details.tokens]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for index, tokens in enumerate(solo):
        expected = generator.text.decode(tokens) if index % 4 == 0 else tokens
        assert got[index] == expected, f"client {index} ({len(prompts[index])} characters)"
    assert metric(server.url, "kvfuse_active_rows") == 0
    assert metric(server.url, "kvfuse_queue_length") == 0
