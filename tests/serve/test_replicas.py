"""`kvfuse serve --replicas N` on Ray Serve: two replicas, each its own engine, answer the
openai client behind Ray Serve's proxy with the answers one engine gives."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import kvfuse
from kvfuse.serve.replicas import REPLICA_HEADER, ReplicaPlan

QUESTION = [{"role": "user", "content": "hello there"}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def replicas(ray_cluster, tiny_served_model):
    """`kvfuse serve --replicas 2` (half a CPU and one thread each) on the session's Ray
    cluster, serving the tiny Llama; Ctrl-C at the end removes the application."""
    port = free_port()
    command = [sys.executable, "-m", "kvfuse", "serve", str(tiny_served_model), "--replicas", "2"]
    command += ["--replica-cpus", "0.5", "--slots", "2", "--threads", "1", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--ray", ray_cluster],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    url = f"http://127.0.0.1:{port}"
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in server.stderr], daemon=True
    ).start()
    deadline, said = time.monotonic() + 300, []
    while not any("replicas up" in line for line in said):  # once every replica runs
        assert server.poll() is None, "".join(said)
        assert time.monotonic() < deadline, "the replicas did not come up in 300 s"
        try:
            said.append(lines.get(timeout=1))
        except queue.Empty:
            pass
    assert _healthy(url)
    yield tiny_served_model, url
    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=120) == 0
    assert not _healthy(url), "the application is still served after Ctrl-C"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_two_replicas_answer_the_openai_client(replicas):
    """Concurrent chat completions are spread over both replicas, and every answer is the
    greedy answer kvfuse's own runtime gives; a streamed answer is the same text."""
    model, url = replicas
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    expected = kvfuse.load(model).generate("hello there", kvfuse.GenerationConfig(max_new_tokens=8))

    def ask(_):
        raw = client.chat.completions.with_raw_response.create(
            model="any", messages=QUESTION, max_tokens=8, temperature=0
        )
        return raw.headers[REPLICA_HEADER], raw.parse().choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(12)))
    assert len({replica for replica, _ in answers}) == 2, "both replicas answered"
    assert {text for _, text in answers} == {expected.texts[0]}
    stream = client.chat.completions.create(
        model="any", messages=QUESTION, max_tokens=8, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == expected.texts[0]


def test_autoscale_bounds_are_checked():
    """--autoscale MIN MAX needs 0 ≤ MIN ≤ MAX and MAX ≥ 1; each replica's target is its rows."""
    options = ReplicaPlan(autoscale=(1, 3), engine_options={"slots": 4}).deployment_options()
    assert options["autoscaling_config"]["target_ongoing_requests"] == 4
    assert options["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in options
    with pytest.raises(kvfuse.KvfuseError, match="--autoscale 3 1"):
        ReplicaPlan(autoscale=(3, 1)).deployment_options()
