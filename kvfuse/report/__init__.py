"""Reports about ONNX models: summaries, and graph diffs as JSON, Markdown and HTML."""

from __future__ import annotations

import json
from pathlib import Path

from kvfuse.errors import KvfuseError

FORMATS = (".json", ".md", ".html")


def render(report: dict, suffix: str) -> str:
    """The report in the format a file suffix names: .json, .md or .html."""
    from kvfuse.report.html import to_html
    from kvfuse.report.markdown import to_markdown

    if suffix == ".json":
        return json.dumps(report, indent=2) + "\n"
    if suffix == ".md":
        return to_markdown(report)
    if suffix == ".html":
        return to_html(report)
    raise KvfuseError(f"unknown report format {suffix!r}; use one of {', '.join(FORMATS)}")


def write(report: dict, path: Path, overwrite: bool = True) -> Path:
    """Write one format (chosen by `path`'s suffix) atomically."""
    from kvfuse.files import staged_file

    path = Path(path)
    with staged_file(path, overwrite=overwrite) as staging:
        (staging / path.name).write_text(render(report, path.suffix))
    return path


def write_all(report: dict, stem: Path) -> list[Path]:
    """Write the JSON, Markdown and HTML reports as `stem`.json/.md/.html."""
    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix in FORMATS else stem
    return [write(report, stem.with_name(stem.name + suffix)) for suffix in FORMATS]
