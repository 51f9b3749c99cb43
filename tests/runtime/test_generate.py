"""The runtime on a tiny optimized Llama: sampling, stops, context, batch parity, streaming,
and the proof that the KV cache stays in place."""

from __future__ import annotations

import numpy as np
import pytest

from kvfuse.errors import KvfuseError
from kvfuse.exporters.reference import ConcatCacheRunner
from kvfuse.optimize import optimize
from kvfuse.runtime.generate import GenerationConfig, load
from kvfuse.runtime.sampling import Sampling
from kvfuse.runtime.session import Session
from kvfuse.runtime.text import StreamDecoder

MAX_CONTEXT = 64


@pytest.fixture(scope="module")
def tiny(tiny_export, tmp_path_factory):
    """(generator, export dir) for the tiny Llama optimized with a 64-position context."""
    _, export_dir = tiny_export("llama")
    out = tmp_path_factory.mktemp("runtime") / "model.onnx"
    optimize(export_dir, out, max_context=MAX_CONTEXT, quiet=True)
    return load(out), export_dir


def greedy(max_new_tokens=12, **kwargs) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, chat=False, **kwargs)


def test_greedy_tokens_equal_the_original_model(tiny):
    """Greedy generation through the planned-memory session equals the exported model's."""
    generator, export_dir = tiny
    completion = generator.generate("hello there", greedy(eos_free := 12))
    ids = np.array([generator.text.encode("hello there", chat=False)])
    reference = ConcatCacheRunner(export_dir / "model.onnx")
    logits, expected = reference.prefill(ids), []
    for _ in range(len(completion.tokens[0])):
        expected.append(int(logits[0, -1].argmax()))
        logits = reference.step(np.array([[expected[-1]]]))
    assert completion.tokens[0] == expected
    assert len(completion.tokens[0]) == eos_free or completion.finish_reasons == ["eos"]


def test_sampling_is_reproducible_with_a_seed(tiny):
    """Same seed → same tokens; another seed → different tokens; greedy ignores the seed."""
    generator, _ = tiny

    def sample(seed):
        sampling = Sampling(temperature=1.5, top_k=50, top_p=0.95, seed=seed)
        return generator.generate("abc", greedy(16, sampling=sampling)).tokens[0]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_repetition_penalty_changes_choices(tiny):
    generator, _ = tiny
    plain = generator.generate("aaaa", greedy(24)).tokens[0]
    penalized = generator.generate(
        "aaaa", greedy(24, sampling=Sampling(repetition_penalty=3.0))
    ).tokens[0]
    assert plain != penalized
    assert len(set(penalized)) >= len(set(plain))


def test_stops_on_max_new_tokens_and_stop_strings(tiny):
    generator, _ = tiny
    completion = generator.generate("xyz", greedy(5))
    assert completion.finish_reasons == ["length"] and len(completion.tokens[0]) == 5
    full = generator.generate("xyz", greedy(20)).texts[0]
    stop = full[3:5]  # a stop string that appears in the greedy text
    stopped = generator.generate("xyz", greedy(20, stop=(stop,)))
    assert stopped.finish_reasons == ["stop"]
    assert stopped.texts[0] == full[: full.index(stop)]


def test_stops_on_eos(tiny):
    """Declaring the first greedy token an eos ends generation before any text."""
    generator, _ = tiny
    first = generator.generate("hello", greedy(3)).tokens[0][0]
    saved = generator.text.eos_ids
    generator.text.eos_ids = {first}
    try:
        completion = generator.generate("hello", greedy(10))
    finally:
        generator.text.eos_ids = saved
    assert completion.finish_reasons == ["eos"] and completion.tokens == [[]]


def test_context_full_errors_or_stops_cleanly(tiny):
    generator, _ = tiny
    prompt = "p" * 40  # 40 tokens: 24 positions left
    with pytest.raises(KvfuseError, match="context of 64 positions is full"):
        generator.generate(prompt, greedy(100))
    completion = generator.generate(prompt, greedy(100, on_full_context="stop"))
    assert completion.finish_reasons == ["context"]
    # every position holds a token; the last new token is sampled from the last position's
    # logits and needs no slot of its own
    assert 40 + len(completion.tokens[0]) == MAX_CONTEXT + 1
    with pytest.raises(KvfuseError, match="prompt has 70 tokens but the model's context holds 64"):
        generator.generate("q" * 70, greedy(4))


def test_batch_rows_of_different_lengths_match_their_solo_runs(tiny):
    """Right-padded batch: each row's greedy tokens are exactly what it produces alone."""
    generator, _ = tiny
    prompts = ["hi", "a much longer prompt", "mid size"]
    batched = generator.generate(prompts, greedy(10)).tokens
    alone = [generator.generate(p, greedy(10)).tokens[0] for p in prompts]
    assert batched == alone


def test_long_prompt_is_prefilled_in_chunks(tiny):
    """A prompt longer than the prefill chunk gives the same tokens as one-shot prefill."""
    generator, _ = tiny
    prompt = "chunked prefill works"
    whole = generator.generate(prompt, greedy(8)).tokens
    chunked = generator.generate(prompt, greedy(8, prefill_chunk=5)).tokens
    assert whole == chunked


def test_streaming_multibyte_text(tiny):
    """Deltas never split a character: each is valid text and they join to the full text."""
    generator, _ = tiny
    decoder = StreamDecoder(generator.text)
    tokens = generator.text.encode("日本語 é ü 🙂", chat=False)
    assert len(tokens) > len("日本語 é ü 🙂")  # multi-byte characters span several tokens
    deltas = [decoder.push(t) for t in tokens]
    assert "".join(deltas) == "日本語 é ü 🙂"
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some tokens were held back until their character was whole
    streamed = "".join(generator.stream("héllo", greedy(12)))
    assert streamed == generator.last.texts[0]


def test_cache_stays_in_place_and_its_size_is_reported(tiny):
    """The arena is the only KV memory: the first decode step's presents live in it."""
    generator, _ = tiny
    completion = generator.generate("in place", greedy(4))
    session = generator.session(1)
    assert completion.stats.kv_bytes == session.arena.nbytes == 2 * 2 * 2 * 64 * 16 * 4
    before = session.arena.ctypes.data
    session.check_in_place()
    assert session.arena.ctypes.data == before
    assert np.abs(session.kv[0][0, :, : len(completion.tokens[0]) + 8]).sum() > 0
    assert all(np.shares_memory(buffer, session.arena) for buffer in session.kv)


def test_broken_aliasing_is_caught(tiny, monkeypatch):
    """If present outputs are not bound to the arena, onnxruntime allocates new buffers: the
    in-place check must refuse instead of silently copying the cache every step."""
    generator, _ = tiny
    original = Session.__init__

    def unshared(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for _, present in self.spec.pairs:  # let onnxruntime allocate the outputs
            self.binding.bind_output(present, "cpu")

    monkeypatch.setattr(Session, "__init__", unshared)
    fresh = load(generator.spec.path)
    with pytest.raises(KvfuseError, match="instead of updating the KV buffer in place"):
        fresh.generate("hello", greedy(4))


def test_kvfuse_run_cli_prompt_and_chat(tiny):
    """`kvfuse run` answers a prompt, and `--chat` answers each typed line until EOF."""
    import subprocess
    import sys

    generator, _ = tiny
    command = [
        sys.executable,
        "-m",
        "kvfuse",
        "run",
        str(generator.spec.path),
        "--max-new-tokens",
        "5",
    ]
    done = subprocess.run(
        [*command, "--prompt", "hello"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "tokens/s" in done.stderr and "KV 0.0 MiB" in done.stderr
    chat = subprocess.run(
        [*command, "--chat"], input="first\nsecond\n", capture_output=True, text=True, timeout=120
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("you>") == 3  # two answered lines, then end of input
    assert chat.stderr.count("tokens/s") == 2
    prompts = [
        int(line.split("(")[1].split()[0])
        for line in chat.stderr.splitlines()
        if line.startswith("prefill")
    ]
    assert prompts[1] > prompts[0] + 5  # the second turn carries the first as history
    assert "prompt tokens reused" in chat.stderr.splitlines()[-1]  # the first turn's KV


def test_a_continued_prompt_reuses_the_cache_and_gives_fresh_tokens(tiny):
    """A prompt that starts with what the last generation left in the buffers is prefilled
    from there on, and its greedy tokens are those of a fresh run."""
    generator, _ = tiny
    first = generator.generate("hello", greedy(8, ignore_eos=True))
    prompt = generator.text.encode("hello", chat=False) + first.tokens[0] + [65, 66]
    again = generator.generate(prompt, greedy(8))
    assert again.stats.reused_tokens == len(prompt) - 3  # all but the last new token and AB
    fresh = load(generator.spec.path).generate(prompt, greedy(8))
    assert fresh.stats.reused_tokens == 0 and fresh.tokens == again.tokens


def test_prefix_reuse_can_be_turned_off(tiny):
    """`reuse_prefix=False` prefills every prompt from an empty cache (what a benchmark of
    prefill must measure), with the same tokens."""
    generator, _ = tiny
    prompt = generator.text.encode("hello", chat=False)
    first = generator.generate(prompt, greedy(6, ignore_eos=True))
    again = generator.generate(prompt, greedy(6, ignore_eos=True, reuse_prefix=False))
    assert again.stats.reused_tokens == 0 and again.tokens == first.tokens
    reused = generator.generate(prompt, greedy(6, ignore_eos=True))
    assert reused.stats.reused_tokens == len(prompt) - 1 and reused.tokens == first.tokens
