"""The OpenAI routes through the real `openai` client against a server on 127.0.0.1."""

from __future__ import annotations

import httpx
import openai
import pytest

from kvfuse.runtime.generate import GenerationConfig, load
from tests.serve.conftest import metric, still_serves, wait_for

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def solo(tiny_served_model):
    """Greedy tokens of one prompt generated alone, by the runtime without any server."""
    generator = load(tiny_served_model, threads=1)

    def tokens(prompt, max_new_tokens: int) -> list[int]:
        config = GenerationConfig(max_new_tokens=max_new_tokens, chat=False)
        return generator.generate(prompt, config).tokens[0]

    tokens.text = generator.text
    return tokens


def test_models_lists_the_served_model(client, server):
    (card,) = client.models.list().data
    assert card.id == server.engine.name and card.max_model_len == 128


def test_chat_completion_whole_and_streamed(client, solo):
    """A greedy chat answer is the runtime's solo answer; streamed deltas add up to it, with a
    usage chunk last when asked for."""
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **GREEDY)
    prompt = solo.text.encode_conversation(messages)
    expected = solo(prompt, 12)
    assert whole.choices[0].message.content == solo.text.decode(expected)
    assert whole.usage.prompt_tokens == len(prompt)
    assert whole.usage.completion_tokens == len(expected)
    assert whole.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks[-2:-1]] == [whole.choices[0].finish_reason]


def test_completion_sampling_parameters(client):
    """Per-request sampling: a seed reproduces, another seed differs, top_k=1 is greedy, a
    repetition penalty changes the choice, max_tokens is exact with ignore_eos."""

    def complete(max_tokens=24, **params):
        extra = {"ignore_eos": True, **params.pop("extra_body", {})}
        answer = client.completions.create(
            model="tiny", prompt="aaaa", max_tokens=max_tokens, extra_body=extra, **params
        )
        return answer.choices[0].text, answer.usage.completion_tokens

    assert complete(temperature=1.2, seed=7) == complete(temperature=1.2, seed=7)
    assert complete(temperature=1.2, seed=7) != complete(temperature=1.2, seed=8)
    greedy = complete(**GREEDY)
    assert complete(temperature=1.0, seed=3, extra_body={"top_k": 1}) == greedy
    assert complete(extra_body={"repetition_penalty": 3.0}, **GREEDY) != greedy
    assert complete(max_tokens=5, **GREEDY)[1] == 5


def test_stop_string_is_held_back_across_deltas(client):
    """A stop string spanning several tokens never leaks into the stream: the deltas add up to
    the text before it, and the finish reason says stop."""
    full = client.completions.create(
        model="tiny", prompt="xyz", max_tokens=30, extra_body={"ignore_eos": True}, **GREEDY
    )
    text = full.choices[0].text
    stop = text[6:9]  # three characters: three tokens of the byte-level tokenizer at least
    cut = text[: text.index(stop)]
    chunks = list(
        client.completions.create(
            model="tiny", prompt="xyz", max_tokens=30, stop=[stop], stream=True, **GREEDY
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_over_context_is_400_with_the_numbers(client, server):
    """prompt + max_tokens over the row: refused before any stream, saying the numbers."""
    prompt = "a" * 120
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="tiny", prompt=prompt, max_tokens=20, stream=stream)
        message = refused.value.body["message"]
        assert "maximum context length is 128 tokens" in message
        assert "120 input tokens" in message and "20 new tokens" in message
    assert metric(server.url, 'kvfuse_requests_total{outcome="rejected_context"}') >= 2
    assert still_serves(server.url)


def test_bad_bodies_get_openai_shaped_errors(server):
    for body in ({"messages": []}, {"messages": [{"role": "user", "content": "x"}], "n": 2}):
        answer = httpx.post(server.url + "/v1/chat/completions", json=body)
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"]
    assert still_serves(server.url)


def test_full_queue_is_429_with_retry_after(slow_server):
    """One row busy, one request waiting: the next is refused with Retry-After at once."""
    server = slow_server(slots=1, max_queue=1)
    body = {"prompt": "a", "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as running:
            running_lines = running.iter_lines()  # kept: a dropped iterator closes the stream
            next(running_lines)
            assert wait_for(lambda: metric(server.url, "kvfuse_active_rows") == 1)
            with http.stream("POST", "/v1/completions", json=body) as waiting:
                waiting_lines = waiting.iter_lines()
                next(waiting_lines)
                assert wait_for(lambda: metric(server.url, "kvfuse_queue_length") == 1)
                refused = http.post("/v1/completions", json=body | {"stream": False})
                assert refused.status_code == 429
                assert int(refused.headers["Retry-After"]) >= 1
                assert refused.json()["error"]["type"] == "rate_limit_exceeded"
                client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model="tiny", prompt="a", max_tokens=2)
            assert next(running_lines) is not None and next(waiting_lines) is not None
    assert metric(server.url, 'kvfuse_requests_total{outcome="rejected_queue"}') == 2
    assert still_serves(server.url)


def test_disconnect_frees_the_row(slow_server):
    """A client that leaves mid-stream, or while waiting for a whole answer, cancels its
    generation: its row is free at the next step (seen in /metrics)."""
    server = slow_server(slots=2, max_queue=2)
    body = {"prompt": "a", "max_tokens": 120, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert sum(line.startswith("data:") for line in (next(lines) for _ in range(6))) > 1
            assert metric(server.url, "kvfuse_active_rows") == 1
    assert wait_for(lambda: metric(server.url, 'kvfuse_requests_total{outcome="cancelled"}') == 1)
    assert metric(server.url, "kvfuse_active_rows") == 0
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body | {"stream": False}, timeout=0.5)
    assert wait_for(lambda: metric(server.url, 'kvfuse_requests_total{outcome="cancelled"}') == 2)
    assert metric(server.url, "kvfuse_active_rows") == 0
    assert still_serves(server.url)


def test_timed_out_request_ends_and_frees_its_row(slow_server):
    server = slow_server(request_timeout_s=0.5)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
    answer = client.completions.create(
        model="tiny", prompt="a", max_tokens=120, extra_body={"ignore_eos": True}
    )
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens < 120
    assert metric(server.url, 'kvfuse_requests_total{outcome="timeout"}') == 1
    assert metric(server.url, "kvfuse_active_rows") == 0
    assert still_serves(server.url)


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(slow_server):
    server = slow_server(delay=0.0)
    step, calls = server.engine._steps.step, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return step(*args)

    server.engine._steps.step = failing
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
    with pytest.raises(openai.APIError, match="injected failure"):
        for _ in client.completions.create(model="tiny", prompt="ab", max_tokens=9, stream=True):
            pass
    assert metric(server.url, 'kvfuse_requests_total{outcome="error"}') == 1
    assert still_serves(server.url)


def test_a_continuing_conversation_reuses_its_cached_prefix(client, solo):
    """The second turn's prompt starts with the first turn's prompt and answer: those tokens
    are not prefilled again, and the answer is the one a fresh prefill gives."""
    turn = [{"role": "user", "content": "hi"}]
    first = client.chat.completions.create(model="tiny", messages=turn, max_tokens=6, **GREEDY)
    history = [*turn, {"role": "assistant", "content": first.choices[0].message.content}]
    history.append({"role": "user", "content": "and then?"})
    second = client.chat.completions.create(model="tiny", messages=history, max_tokens=6, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens
    expected = solo(solo.text.encode_conversation(history), 6)
    assert second.choices[0].message.content == solo.text.decode(expected)
