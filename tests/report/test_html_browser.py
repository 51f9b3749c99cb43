"""The HTML report in a real headless Chromium at a laptop's size (1366×768): it opens on its
verdict card, its charts are drawn from the report's figures, the KV rows are folded, a partial
fusion shows why in the card, and the page logs no console errors."""

from __future__ import annotations

import onnx
import pytest

from kvfuse.optimize import PartialFusion, optimize
from kvfuse.report import digest, write_all
from kvfuse.report.diff import build_report
from tests.report.browser import assert_opens_on_verdict, open_page


@pytest.fixture(scope="module")
def llama_page(chromium, tiny_export, tmp_path_factory):
    _, export_dir = tiny_export("llama")
    work = tmp_path_factory.mktemp("browser")
    result = optimize(export_dir, work / "m.onnx", max_context=64, quiet=True)
    report = build_report(export_dir / "model.onnx", work / "m.onnx", result)
    html_path = write_all(report, work / "report")[2]
    return report, html_path, open_page(chromium, html_path, work / "chromium")


def test_console_error_detection_works(chromium, tmp_path):
    """Control: a page that throws is reported as having a console error."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><p>x</p><script>throw new Error('boom')</script></body></html>")
    assert "boom" in open_page(chromium, page, tmp_path).console_errors


def test_report_opens_on_its_verdict(llama_page, capsys):
    report, html_path, page = llama_page
    assert "http" not in html_path.read_text().replace("http://www.w3.org/2000/svg", "")
    assert page.console_errors == "", page.console_errors
    assert_opens_on_verdict(page)
    text = page.probe["verdict_text"]
    assert "2/2" in text and "verified against the original" in text
    assert f"{report['models']['a']['nodes']:,} → {report['models']['b']['nodes']:,}" in text
    assert "greedy tokens equal" in text and "KV MEMORY" in text.upper()
    cells = page.probe["cells"]
    assert [c["text"] for c in cells] == ["0", "1"] and all(c["target"] for c in cells)
    assert all(c["box"]["bottom"] <= page.probe["viewport"][1] for c in cells)
    with capsys.disabled():  # the screenshot's path belongs in the test output
        print(f"\nHTML report, first screen: {page.screenshot}")


def test_charts_are_drawn_from_the_report(llama_page):
    """Each chart has one drawn mark per figure, carrying the report's own numbers."""
    report, _, page = llama_page
    charts = {chart["id"]: chart for chart in page.probe["charts"]}
    assert set(charts) == {"ops-chart", "numerics-chart"}
    shown = digest.op_changes(report, limit=14)
    assert charts["ops-chart"]["values"] == [n for r in shown for n in (r["a"], r["b"])]
    steps = report["numerics"]["steps"]
    assert charts["numerics-chart"]["values"] == pytest.approx(
        [s["tolerance_used"] for s in steps], rel=1e-5, abs=1e-12
    )
    for chart in charts.values():
        assert chart["box"]["height"] > 100 and chart["box"]["right"] - chart["box"]["left"] > 300
        nonzero = sum(1 for value in chart["values"] if value > 0)
        assert chart["drawn"] >= nonzero > 0


def test_kv_rows_are_folded(llama_page):
    """4 KV inputs and 4 KV outputs are one row each; the full list is closed until asked."""
    report, _, page = llama_page
    rows = page.probe["io_rows"]
    total = len(report["io"]["inputs"]) + len(report["io"]["outputs"])
    assert page.probe["io_full_rows"] == total and len(rows) < total
    kv_in = [r for r in rows if r.startswith("4 KV inputs")]
    kv_out = [r for r in rows if r.startswith("4 KV outputs")]
    assert len(kv_in) == 1 and "past_key_values.*.key/value" in kv_in[0]
    assert len(kv_out) == 1 and "bound in place" in kv_out[0] and "64" in kv_out[0]
    assert not page.probe["io_full_open"] and page.probe["io_full_visible"] is False


def test_partial_fusion_shows_why_in_the_card(chromium, tiny_export, tmp_path):
    """Layer 1 of two does not fuse (its attention probabilities are also a graph output): the
    card says nothing was written, colours the cells by outcome and names the structure, the
    culprit and the rule that came closest, all in the first screen."""
    _, export_dir = tiny_export("llama")
    model = onnx.load(str(export_dir / "model.onnx"))
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"][1]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(softmax.output[0], 1, ["b", "h", "s", "t"])
    )
    onnx.save(model, tmp_path / "in.onnx")
    with pytest.raises(PartialFusion) as failure:
        optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", max_context=32, quiet=True)
    report = build_report(tmp_path / "in.onnx", tmp_path / "in.onnx", failure.value.result)
    page = open_page(chromium, write_all(report, tmp_path / "partial")[2], tmp_path / "chromium")
    assert page.console_errors == "", page.console_errors
    assert_opens_on_verdict(page)
    text = page.probe["verdict_text"]
    assert "1 of 2 attention layers fused, so nothing was written" in text
    assert f"layer 1: attention probabilities {softmax.output[0]} are also a graph output" in text
    assert softmax.name in text  # the culprit, named
    closest = max(
        (m for m in report["near_misses"] if "diagnosis" not in m["rule"]),
        key=lambda m: m["matched_nodes"],
    )
    assert f"Closest rule: {closest['rule']} ({closest['matched_nodes']} nodes matched" in text
    misses = page.probe["near_misses"]
    assert misses is not None and misses["bottom"] <= page.probe["verdict"]["bottom"]
    assert [(c["text"], c["css"]) for c in page.probe["cells"]] == [
        ("0", "cell"),
        ("1", "cell miss"),
    ]


def test_quantization_section_renders(llama_page, chromium, tmp_path):
    """A report with a quantization dict (the shape schema.json documents) draws its KLD per
    position in Chromium and names the scheme and quality in the card."""
    report, _, _ = llama_page
    kld = [0.002 * (1 + (i % 7)) for i in range(300)]
    quantized = {
        **report,
        "quantization": {
            "scheme": "int4",
            "mean_kld": sum(kld) / len(kld),
            "same_top1": 0.98,
            "max_kld": 0.05,
            "kld": kld,
        },
    }
    page = open_page(chromium, write_all(quantized, tmp_path / "q")[2], tmp_path / "chromium")
    assert page.console_errors == "", page.console_errors
    assert_opens_on_verdict(page)
    assert "int4" in page.probe["verdict_text"] and "same top-1 98.0%" in page.probe["verdict_text"]
    chart = next(c for c in page.probe["charts"] if c["id"] == "kld-chart")
    assert chart["values"] == pytest.approx(kld, rel=1e-5) and chart["drawn"] == len(kld)
