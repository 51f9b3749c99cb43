"""`kvfuse export --exporter`: the choice is checked before anything is written."""

from __future__ import annotations

import pytest

from kvfuse.errors import KvfuseError
from kvfuse.exporters.export import export
from tests.exporters.test_export_errors import assert_one_line_error, run_cli


def test_unknown_exporter_is_refused_in_one_line(tmp_path):
    """A misspelt exporter names the choices; no output directory appears."""
    done = run_cli("export", "default", str(tmp_path / "out"), "--exporter", "dynamo2")
    assert_one_line_error(done, "unknown exporter 'dynamo2'", "optimum, dynamo")
    assert not (tmp_path / "out").exists()


def test_unknown_exporter_from_python(tmp_path):
    """The Python API refuses it the same way."""
    with pytest.raises(KvfuseError, match="choose one of optimum, dynamo"):
        export("default", tmp_path / "out", exporter="torchscript")
