"""The HTML report opens offline in a real headless Chromium, draws its tables and SVG, and
logs no console errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kvfuse.optimize import optimize
from kvfuse.report import write_all
from kvfuse.report.diff import build_report

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed here if missing (needs root and the Debian registry)."""
    path = shutil.which("chromium")
    reason = "chromium is not on PATH"
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        done = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        path = shutil.which("chromium")
        reason = f"apt-get install chromium failed: {done.stderr.strip()[-300:]}"
    if path is None:
        pytest.skip(f"cannot run a headless browser here: {reason}")
    return path


def open_page(chromium: str, page: Path, tmp_path: Path) -> tuple[str, str]:
    """(DOM after scripts ran, console errors) for `page`; also saves a screenshot."""
    profile = tmp_path / "profile"
    common = [chromium, *FLAGS, f"--user-data-dir={profile}", "--window-size=1300,2400"]
    shot = subprocess.run(
        [*common, f"--screenshot={tmp_path / 'report.png'}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180
    )
    console = [
        line
        for line in (shot.stderr + dom.stderr).splitlines()
        if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)
    ]
    return dom.stdout, "\n".join(console)


def test_console_error_detection_works(chromium, tmp_path):
    """Control: a page that throws is reported as having a console error."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><p>x</p><script>throw new Error('boom')</script></body></html>")
    _, errors = open_page(chromium, page, tmp_path)
    assert "boom" in errors


def test_html_report_renders_in_chromium(chromium, tiny_export, tmp_path, capsys):
    _, export_dir = tiny_export("llama")
    result = optimize(export_dir, tmp_path / "m.onnx", max_context=64, quiet=True)
    report = build_report(export_dir / "model.onnx", tmp_path / "m.onnx", result)
    html_path = write_all(report, tmp_path / "report")[2]
    assert "http" not in html_path.read_text().replace("http://www.w3.org/2000/svg", "")
    dom, errors = open_page(chromium, html_path, tmp_path)
    assert errors == "", errors
    assert dom.count("<table") >= 5 and dom.count("<svg") == 2 and "<rect" in dom
    assert "GroupQueryAttention" in dom and "<details" in dom
    screenshot = tmp_path / "report.png"
    assert screenshot.stat().st_size > 10_000
    with capsys.disabled():  # the screenshot's path belongs in the test output
        print(f"\nHTML report screenshot: {screenshot} ({screenshot.stat().st_size} bytes)")
