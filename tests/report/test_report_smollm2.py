"""The report of SmolLM2's export against its optimized form, in every format."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest

from kvfuse.report import write_all
from kvfuse.report.diff import build_report

pytestmark = pytest.mark.slow
SCHEMA = json.loads((Path(__file__).parents[2] / "kvfuse/report/schema.json").read_text())


def test_smollm2_report(smollm2_export, optimized_smollm2, tmp_path, capsys):
    start = time.perf_counter()
    report = build_report(smollm2_export.onnx_path, optimized_smollm2.output, optimized_smollm2)
    seconds = time.perf_counter() - start
    jsonschema.validate(report, SCHEMA)
    assert report["models"]["a"]["nodes"] == smollm2_export.summary.nodes
    assert report["rewrites_by_rule"]["attention/cached_bhsd_rope"] == 30
    assert len(report["io"]["aliases"]) == 60 and report["numerics"]["passed"]
    assert sum(layer["fused"] for layer in report["layers"]) == 30
    paths = write_all(report, tmp_path / "smollm2")
    assert [p.suffix for p in paths] == [".json", ".md", ".html"]
    assert "<svg" in paths[2].read_text()
    with capsys.disabled():
        print(f"\nSmolLM2 graph diff built in {seconds:.1f} s")
