"""Running a static pair: prefill graph + decode graph over one arena and one copy of weights."""

from __future__ import annotations

import numpy as np
import pytest

from kvfuse.errors import KvfuseError
from kvfuse.optimize import optimize
from kvfuse.runtime.generate import GenerationConfig, load
from kvfuse.runtime.session import Session

PREFILL_LEN = 16


@pytest.fixture(scope="module")
def models(tiny_export, tmp_path_factory):
    """Tiny Llama optimized three ways: ort, onnx (dynamic), onnx --static (S = 16 and 1)."""
    export_dir = tiny_export("llama")[1]
    out = tmp_path_factory.mktemp("static-pair")
    built = {
        "ort": optimize(export_dir, out / "ort.onnx", max_context=64, quiet=True),
        "onnx": optimize(export_dir, out / "onnx.onnx", target="onnx", max_context=64, quiet=True),
    }
    static = {"target": "onnx", "static": True, "prefill_len": PREFILL_LEN, "max_context": 64}
    built["static"] = optimize(export_dir, out / "static.onnx", quiet=True, **static)
    built["static_batch2"] = optimize(
        export_dir, out / "static2.onnx", quiet=True, batch_size=2, **static
    )
    return {name: result.output for name, result in built.items()}


GREEDY = GenerationConfig(max_new_tokens=16, ignore_eos=True)


@pytest.mark.parametrize("length", [5, PREFILL_LEN, 40])
def test_pair_generates_what_the_dynamic_targets_generate(models, length):
    """A padded short prompt, an exact one, and a 40-token prompt in three prefill steps (the
    last overlapping): 16 greedy tokens equal those of the ort and dynamic onnx models."""
    prompt = [int(t) for t in np.random.default_rng(length).integers(3, 250, length)]
    names = ("ort", "onnx", "static")
    tokens = {name: load(models[name]).generate(prompt, GREEDY).tokens[0] for name in names}
    assert tokens["static"] == tokens["onnx"] == tokens["ort"], tokens


def test_pair_runs_both_graphs_over_one_arena(models):
    """The OUT.onnx path finds the pair; both graphs ran, each present stayed in the arena."""
    generator = load(models["static"].parent / "static.onnx")
    generator.generate([5] * 40, GREEDY)
    session = generator.session(1)
    assert session.prefill_len == PREFILL_LEN and set(session._probed) == {1, PREFILL_LEN}
    session.check_in_place()
    kv = np.stack(session.kv)  # every layer's buffer [B, Hkv, T, D] (one shape here)
    assert np.abs(kv[:, 0, :, 40 + 15 :]).sum() == 0  # nothing past the end
    assert np.abs(kv[:, 0, :, : 40 + 15]).min(axis=-1).max() > 0


def test_a_copied_cache_is_refused(models, monkeypatch):
    """If present is not bound to the past buffer, TensorScatter copies the whole cache and
    onnxruntime says so in a warning: the first run must refuse."""
    original = Session._open

    def unshared(self, path):
        session, binding = original(self, path)
        for _, present in self.spec.pairs:
            binding.bind_output(present, "cpu")
        return session, binding

    monkeypatch.setattr(Session, "_open", unshared)
    with pytest.raises(KvfuseError, match="copied the KV cache instead of updating it in place"):
        load(models["static"]).generate([5, 6, 7], GREEDY)


def test_batch_prompts_must_fit_one_static_prefill(models):
    """Batched rows are right-padded into one prefill step; longer rows get a clear error."""
    generator = load(models["static_batch2"])
    short = generator.generate([[5, 6, 7], [8, 9, 10, 11, 12]], GREEDY)
    alone = load(models["static"])
    assert short.tokens[1] == alone.generate([8, 9, 10, 11, 12], GREEDY).tokens[0]
    with pytest.raises(KvfuseError, match="must fit one static prefill step of 16 tokens"):
        generator.generate([[5] * 20, [6] * 3], GREEDY)


def test_incomplete_or_truncated_pair_is_refused(models, tmp_path):
    """A pair whose weights file is missing or cut short: one-line errors, no traceback."""
    import shutil
    import subprocess
    import sys

    source = models["static"].parent
    copy = tmp_path / "pair"
    copy.mkdir()
    for name in ("static.prefill.onnx", "static.decode.onnx", "static.kvfuse.json"):
        shutil.copy(source / name, copy / name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, copy / name)
    with pytest.raises(KvfuseError, match="static.weights is missing"):
        load(copy / "static.onnx")
    weights = (source / "static.weights").read_bytes()
    (copy / "static.weights").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(KvfuseError, match="lies outside static.weights"):
        load(copy / "static.onnx").generate([5, 6], GREEDY)
    done = subprocess.run(
        [sys.executable, "-m", "kvfuse", "run", str(copy / "static.onnx"), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "lies outside static.weights" in done.stderr


def test_prepacked_sessions_generate_the_same_tokens(models):
    """`prepack=True`: each graph loads its own weights from the shared file (no in-memory
    sharing) and generates exactly what the shared-weights pair does."""
    prompt = [int(t) for t in np.random.default_rng(7).integers(3, 250, 40)]
    shared = load(models["static"]).generate(prompt, GREEDY).tokens
    own = load(models["static"], prepack=True)
    assert own.generate(prompt, GREEDY).tokens == shared
    assert own.session(1).weights is None
