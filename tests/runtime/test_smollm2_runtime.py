"""The real model answers a real question through `kvfuse run` and `kvfuse.load`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvfuse.runtime.generate import GenerationConfig, load

pytestmark = pytest.mark.slow


def test_chat_answer_through_the_api(optimized_smollm2):
    generator = load(optimized_smollm2.output)
    completion = generator.generate(
        "What is the capital of France?", GenerationConfig(max_new_tokens=24)
    )
    assert "Paris" in completion.texts[0], completion.texts
    assert completion.stats.kv_bytes == 60 * 1 * 3 * 256 * 64 * 4
    assert completion.stats.decode_tokens_per_s > 0 and completion.stats.prefill_ms > 0


def test_kvfuse_run_streams_and_reports(optimized_smollm2):
    done = ask_paris(optimized_smollm2.output)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "tokens/s" in done.stderr and "prefill" in done.stderr and "KV 11.2 MiB" in done.stderr


def ask_paris(model) -> subprocess.CompletedProcess:
    """`kvfuse run MODEL --prompt "What is the capital of France?"` in a fresh process."""
    command = [sys.executable, "-m", "kvfuse", "run", str(model), "--max-new-tokens", "24"]
    return subprocess.run(
        [*command, "--prompt", "What is the capital of France?"],
        capture_output=True,
        text=True,
        timeout=600,
    )
