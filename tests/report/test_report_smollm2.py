"""The report of SmolLM2's export against its optimized form, in every format; in Chromium at a
laptop's size it opens on its verdict."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest

from kvfuse.report import write_all
from kvfuse.report.diff import build_report
from tests.report.browser import assert_opens_on_verdict, open_page

pytestmark = pytest.mark.slow
SCHEMA = json.loads((Path(__file__).parents[2] / "kvfuse/report/schema.json").read_text())


def test_smollm2_report(smollm2_export, optimized_smollm2, chromium, tmp_path, capsys):
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
    page = open_page(chromium, paths[2], tmp_path / "chromium")
    assert page.console_errors == "", page.console_errors
    assert_opens_on_verdict(page)
    text = page.probe["verdict_text"]
    assert "Fused 30/30 attention layers into GroupQueryAttention" in text
    assert "verified against the original (greedy tokens equal)" in text
    assert f"{report['models']['a']['nodes']:,} → {report['models']['b']['nodes']:,}" in text
    assert len(page.probe["cells"]) == 30 and all(c["target"] for c in page.probe["cells"])
    kv_rows = [r for r in page.probe["io_rows"] if r.startswith("60 KV")]
    assert len(kv_rows) == 2 and "[batch_size, 3, 256, 64]" in kv_rows[0], kv_rows
    with capsys.disabled():
        print(f"\nSmolLM2 graph diff built in {seconds:.1f} s; first screen: {page.screenshot}")
