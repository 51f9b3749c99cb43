"""Weights kept in an external file: optimize leaves them there (memory-mapped), writes
OUT.onnx + OUT.onnx.data, verifies from the files; the runtime reads them; --max-context is
checked against the model's own limit."""

from __future__ import annotations

import shutil

import onnx
import pytest

from kvfuse.errors import KvfuseError
from kvfuse.optimize import optimize
from kvfuse.runtime.generate import GenerationConfig, load


@pytest.fixture(scope="module")
def external_export(tiny_export, tmp_path_factory):
    """The tiny Llama export with every tensor ≥ 1 KiB moved to `model.onnx_data`."""
    _, export_dir = tiny_export("llama")
    copy = tmp_path_factory.mktemp("external") / "onnx"
    shutil.copytree(export_dir, copy)
    model = onnx.load(str(copy / "model.onnx"))
    onnx.save_model(
        model,
        str(copy / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx_data",
        size_threshold=1024,
    )
    return copy


def test_external_weights_stay_external_and_verify(external_export, tmp_path):
    """The output is a small graph plus one `.data` file; verification passed; the rewritten
    model generates the same greedy tokens as the inline-weights export optimized alike."""
    out = tmp_path / "m.onnx"
    result = optimize(external_export, out, max_context=64, quiet=True)
    assert result.verification.passed and result.fused_layers == 2
    header = onnx.load(str(out), load_external_data=False)
    external = [t for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    assert external and locations == {"m.onnx.data"}
    inline = optimize(
        external_export.parent / "onnx", tmp_path / "inline.onnx", max_context=64, quiet=True
    )
    config = GenerationConfig(max_new_tokens=8, chat=False)
    tokens = load(out).generate("hello", config).tokens
    assert tokens == load(inline.output).generate("hello", config).tokens


def test_a_missing_data_file_is_one_line(external_export, tmp_path):
    """Weights pointing at a data file that is not there: refused before any rewriting."""
    broken = tmp_path / "onnx"
    shutil.copytree(external_export, broken)
    (broken / "model.onnx_data").unlink()
    with pytest.raises(KvfuseError, match="model.onnx_data"):
        optimize(broken, tmp_path / "out.onnx", quiet=True)
    assert not (tmp_path / "out.onnx").exists()


def test_max_context_past_the_models_limit_is_refused(tiny_export, tmp_path):
    """--max-context may reach the model's max positions (512 for the tiny Llama), not pass it."""
    _, export_dir = tiny_export("llama")
    with pytest.raises(KvfuseError, match="limit of 512 positions"):
        optimize(export_dir, tmp_path / "out.onnx", max_context=513, quiet=True)
    result = optimize(export_dir, tmp_path / "full.onnx", max_context=512, quiet=True)
    assert result.signature.max_context == 512 and result.verification.passed
