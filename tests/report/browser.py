"""Open a report in a real headless Chromium at a laptop's screen size: a screenshot of the first
screen, the console's errors, and measurements taken inside the page (bounding boxes, chart
marks, folded rows) by a probe script appended to a copy of the page."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import struct
import subprocess
from pathlib import Path

WIDTH, HEIGHT = 1366, 768  # a common laptop screen
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--hide-scrollbars",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    f"--window-size={WIDTH},{HEIGHT}",
]

PROBE = """
<script>
(function () {
  function box(element) {
    if (!element) { return null; }
    var r = element.getBoundingClientRect();
    return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, height: r.height};
  }
  var verdict = document.getElementById('verdict');
  var io = document.getElementById('io-folded');
  var found = {
    viewport: [window.innerWidth, window.innerHeight],
    verdict: box(verdict),
    verdict_text: verdict ? verdict.innerText : '',
    near_misses: box(document.getElementById('near-misses')),
    cells: Array.from(document.querySelectorAll('#layer-cells a')).map(function (a) {
      return {text: a.textContent, href: a.getAttribute('href'), box: box(a), css: a.className,
              target: !!document.getElementById(a.getAttribute('href').slice(1))};
    }),
    charts: Array.from(document.querySelectorAll('svg.chart')).map(function (svg) {
      return {id: svg.id, box: box(svg), values: Array.from(
        svg.querySelectorAll('[data-value]')).map(function (m) { return +m.dataset.value; }),
        drawn: Array.from(svg.querySelectorAll('[data-value]')).filter(function (m) {
          return m.getBoundingClientRect().width > 0; }).length};
    }),
    io_rows: io ? Array.from(io.tBodies[0].rows).map(function (r) { return r.innerText; }) : [],
    io_full_rows: document.querySelectorAll('#io-full tbody tr').length,
    io_full_open: !!(document.getElementById('io-all') || {}).open,
    io_full_visible: document.getElementById('io-full') ?
      document.getElementById('io-full').checkVisibility() : null
  };
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(found);
  document.body.appendChild(pre);
})();
</script>
"""


@dataclasses.dataclass
class Page:
    probe: dict  # what the probe measured in the page
    console_errors: str
    screenshot: Path


def open_page(chromium: str, page: Path, work: Path) -> Page:
    """Screenshot `page` (the first screen only) and measure it in Chromium."""
    work.mkdir(parents=True, exist_ok=True)
    common = [chromium, *FLAGS, f"--user-data-dir={work / 'profile'}"]
    shot = subprocess.run(
        [*common, f"--screenshot={work / 'first-screen.png'}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    probed = work / f"{page.stem}-probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(
        [*common, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=180
    )
    console = [
        line
        for line in (shot.stderr + dom.stderr).splitlines()
        if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)
    ]
    match = re.search(r"<pre id=\"probe\">(.*?)</pre>", dom.stdout, re.S)
    probe = json.loads(html.unescape(match.group(1))) if match else {}
    return Page(probe, "\n".join(console), work / "first-screen.png")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def assert_opens_on_verdict(page: Page) -> None:
    """The verdict card lies wholly inside the first screen of a laptop-sized window (the page's
    own viewport: headless Chromium keeps some of the window's height for its frame, as a
    browser on a 1366×768 laptop does)."""
    width, height = page.probe["viewport"]
    assert width == WIDTH and 500 < height <= HEIGHT, page.probe["viewport"]
    card = page.probe["verdict"]
    assert card is not None, "no #verdict element"
    assert 0 <= card["top"] and card["bottom"] <= height and card["height"] > 80, card
    assert png_size(page.screenshot) == (WIDTH, HEIGHT)
