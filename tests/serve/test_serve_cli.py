"""`kvfuse serve` as a user runs it: a process listening on 127.0.0.1, stopped by a signal."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import httpx
import openai

from tests.serve.conftest import wait_for


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_kvfuse_serve_answers_then_stops_on_sigint(tiny_served_model):
    port = free_port()
    command = [sys.executable, "-m", "kvfuse", "serve", str(tiny_served_model)]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--slots", "2", "--max-queue", "4", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _healthy(url), seconds=60), "the server never became healthy"
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        answer = client.completions.create(model="m", prompt="hi", max_tokens=3, temperature=0)
        assert answer.usage.prompt_tokens == 2
        assert httpx.get(url + "/info").json()["slots"] == 2
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr


def test_kvfuse_serve_refuses_a_missing_model_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "kvfuse", "serve", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
