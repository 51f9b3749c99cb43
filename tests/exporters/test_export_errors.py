"""Bad input to `kvfuse export` gives one clear line and leaves nothing behind."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest

from kvfuse.errors import KvfuseError
from kvfuse.exporters.export import export


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvfuse", *args], capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    # progress lines (✓ step) and an --explain table may come first; the error is one line, last
    assert len(errors) == 1 and lines[-1] == errors[0], done.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_missing_path(tmp_path):
    """A source path that does not exist is named in the error; no output appears."""
    done = run_cli("export", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert_one_line_error(done, "nope", "does not exist")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_directory_that_is_not_a_causal_lm(tmp_path):
    """A BERT config is refused as not a causal language model."""
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    config = {"model_type": "bert", "architectures": ["BertForMaskedLM"]}
    (model_dir / "config.json").write_text(json.dumps(config))
    done = run_cli("export", str(model_dir), str(tmp_path / "out"))
    assert_one_line_error(done, "'bert'", "not a causal language model")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_directory_without_config(tmp_path):
    """An arbitrary directory is not mistaken for a model."""
    (tmp_path / "empty").mkdir()
    done = run_cli("export", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert_one_line_error(done, "no config.json")


def test_architecture_optimum_cannot_export(tmp_path):
    """A causal LM architecture without an Optimum ONNX config is refused before exporting."""
    model_dir = tmp_path / "mamba"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    done = run_cli("export", str(model_dir), str(tmp_path / "out"))
    assert_one_line_error(done, "Optimum cannot export the 'mamba' architecture")
    assert not (tmp_path / "out").exists()


def test_remote_code_is_not_run_by_default(tmp_path):
    """A config needing the model's own code asks for --trust-remote-code; the code never runs."""
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    marker = tmp_path / "code-ran"
    (model_dir / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'custom'\n"
    )
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig"}
    config = {"model_type": "custom", "auto_map": auto_map}
    (model_dir / "config.json").write_text(json.dumps(config))
    done = run_cli("export", str(model_dir), str(tmp_path / "out"))
    assert_one_line_error(done, "--trust-remote-code")
    assert not marker.exists(), "the model's code ran without the user asking"


def test_existing_output_is_refused_and_untouched(tiny_export, tmp_path):
    """An existing OUT_DIR is refused without --overwrite; its contents stay as they were."""
    hf_dir, _ = tiny_export("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = run_cli("export", str(hf_dir), str(out))
    assert_one_line_error(done, "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_only_when_complete(tiny_export, tmp_path):
    """With --overwrite the old directory is replaced by a complete export."""
    hf_dir, _ = tiny_export("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    done = run_cli("export", str(hf_dir), str(out), "--overwrite", "--quiet")
    assert done.returncode == 0, done.stderr
    assert (out / "model.onnx").is_file() and (out / "kvfuse-export.json").is_file()
    assert not (out / "old.txt").exists()
    assert leftovers(tmp_path) == []


def test_output_over_the_input_is_refused(tiny_export):
    """Exporting into the source directory (with --overwrite) would destroy it: refused."""
    hf_dir, _ = tiny_export("llama")
    before = sorted(p.name for p in hf_dir.iterdir())
    done = run_cli("export", str(hf_dir), str(hf_dir), "--overwrite")
    assert_one_line_error(done, "would overwrite the input")
    assert sorted(p.name for p in hf_dir.iterdir()) == before
    done = run_cli("export", str(hf_dir), str(hf_dir.parent), "--overwrite")
    assert_one_line_error(done, "would overwrite the input")


def test_disk_write_failure_leaves_nothing(tiny_export, tmp_path, monkeypatch):
    """A full disk while writing gives a one-line error and no partial output."""
    import kvfuse.exporters.export as export_module

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "write_metadata", disk_full)
    hf_dir, _ = tiny_export("llama")
    with pytest.raises(KvfuseError, match="the disk is full; nothing was written"):
        export(hf_dir, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_corrupt_gguf(tmp_path):
    """A truncated or non-GGUF .gguf file is reported as such."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    done = run_cli("export", str(bad), str(tmp_path / "out"))
    assert_one_line_error(done, "broken.gguf", "GGUF")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_every_command_has_help():
    """`kvfuse --help` and `kvfuse export --help` work."""
    for args in (["--help"], ["export", "--help"]):
        done = run_cli(*args)
        assert done.returncode == 0 and "Usage" in done.stdout


def test_directory_without_tokenizer_still_exports(tmp_path):
    """The tokenizer is optional: a model directory without one exports with the dynamo
    exporter too (it crashed inside transformers' tokenizer conversion), and the record says
    so. (Optimum's exporter skips a missing tokenizer itself.)"""
    from kvfuse.models.tiny import build_tiny_model

    hf_dir = build_tiny_model("llama", tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_dir / name).unlink()
    result = export(hf_dir, tmp_path / "out", quiet=True, exporter="dynamo")
    assert result.onnx_path.is_file() and result.summary.nodes > 0
    record = json.loads((tmp_path / "out" / "kvfuse-export.json").read_text())
    assert record["tokenizer"] == {"present": False, "chat_template": False}
    assert not (tmp_path / "out" / "tokenizer.json").exists()
