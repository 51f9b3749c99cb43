"""Servers on 127.0.0.1 over the tiny model, started in this process for the tests."""

from __future__ import annotations

import time

import httpx
import pytest

from kvfuse.serve import Engine, start


@pytest.fixture(scope="module")
def server(tiny_served_model):
    """4 rows, 16 may wait, 8-token prompt chunks (so prompts take several steps)."""
    with start(tiny_served_model, slots=4, max_queue=16, prefill_chunk=8, threads=1) as running:
        yield running


@pytest.fixture
def slow_server(tiny_served_model):
    """Factory of servers whose every step takes `delay` s longer, so that requests overlap
    for long enough to queue, disconnect or time out on a loaded machine."""
    running = []

    def make(delay: float = 0.03, **options):
        engine = Engine(tiny_served_model, threads=1, prefill_chunk=8, **options)
        step = engine._steps.step

        def slowed(*args):
            time.sleep(delay)
            return step(*args)

        engine._steps.step = slowed
        running.append(start(engine))
        return running[-1]

    yield make
    for one in running:
        one.stop()
        one.engine.close()


def metric(url: str, name: str) -> float:
    """One sample of /metrics (0 when absent), e.g. 'kvfuse_requests_total{outcome="stop"}'."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def still_serves(url: str) -> bool:
    """The server answers a fresh request after whatever happened before."""
    body = {"inputs": "ok", "parameters": {"max_new_tokens": 2}}
    answer = httpx.post(url + "/generate", json=body, timeout=30)
    return answer.status_code == 200 and isinstance(answer.json()["generated_text"], str)
