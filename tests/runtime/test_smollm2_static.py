"""The real model as a static, standard-ops pair: verified, fully static, one weights file,
and it answers through `kvfuse run` with the weights held once in memory."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

from kvfuse.rewriter import static
from kvfuse.runtime.generate import GenerationConfig, load
from tests.runtime.test_smollm2_runtime import ask_paris

pytestmark = pytest.mark.slow


def test_pair_is_standard_static_and_verified(static_smollm2):
    """30/30 layers fused into TensorScatter + Attention; no vendor op, no dynamic dim, no
    shape op in either graph; both read one weights file; verification passes."""
    result = static_smollm2
    assert result.fused_layers == 30 and result.ops_after["Attention"] == 30
    assert result.verification.passed, result.verification.summary()
    directory = result.output.parent
    for role, name in result.signature.static["graphs"].items():
        path = directory / name
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)
        static.check_static(onnx.shape_inference.infer_shapes(proto, strict_mode=True), role)
        assert path.stat().st_size < 5e6  # the graph; the weights live in the shared file
    weights = directory / result.shared_weights.file
    assert weights.stat().st_size == result.shared_weights.bytes_total > 500e6
    print(f"SmolLM2 static pair: {result.verification.summary()}")


def test_answers_with_one_copy_of_the_weights(static_smollm2):
    """`kvfuse run` on OUT.onnx answers; the two sessions add far less than a second copy of
    the 538 MB of weights to the process (measured from /proc, printed)."""
    probe = (
        "import sys; from kvfuse.runtime.generate import load, GenerationConfig\n"
        "rss = lambda: int(next(l for l in open('/proc/self/status') "
        "if l.startswith('VmRSS')).split()[1]) // 1024\n"
        "g = load(sys.argv[1]); base = rss(); s = g.session(1)\n"
        "c = g.generate('What is the capital of France?', GenerationConfig(max_new_tokens=24))\n"
        "print(base, rss(), s.weights.nbytes // 2**20, repr(c.texts[0]))\n"
    )
    model = static_smollm2.output.parent / "model-static.onnx"
    done = subprocess.run(
        [sys.executable, "-c", probe, str(model)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    before, after, weights_mib, text = done.stdout.split(maxsplit=3)
    print(f"RSS {before} MiB → {after} MiB with both sessions; weights {weights_mib} MiB; {text}")
    assert "Paris" in text
    assert int(after) - int(before) < 1.3 * int(weights_mib)  # one copy plus working memory


def test_kvfuse_run_cli_on_the_pair(static_smollm2):
    done = ask_paris(static_smollm2.output.parent / "model-static.onnx")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and "tokens/s" in done.stderr


def test_long_prompt_runs_in_overlapping_static_chunks(static_smollm2, optimized_smollm2):
    """A 150-token prompt (three 64-token prefill steps, the last overlapping): the same 16
    greedy tokens as the `ort` model."""
    config = GenerationConfig(max_new_tokens=16, ignore_eos=True, chat=False)
    text = "The history of computing is a story of people finding ways to make machines " * 12
    pair, ort_model = load(static_smollm2.output), load(optimized_smollm2.output)
    ids = pair.text.encode(text, chat=False)[:150]
    assert len(ids) == 150
    assert pair.generate(ids, config).tokens == ort_model.generate(ids, config).tokens
