"""Live progress of a run: one line per model (its stage, time in it, its result), redrawn on
stderr while the jobs run; silent when quiet."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from kvfuse.jobs.index import cells

DONE = ("ok", "failed")


class Board:
    """What each job is doing; `update` from any backend's reports, `finish` with its row."""

    def __init__(self, names: list[str], quiet: bool = False) -> None:
        self.stages = {name: "waiting" for name in names}
        self.since = {name: time.monotonic() for name in names}
        self.rows: dict[str, dict] = {}
        self.quiet = quiet
        self._live: Live | None = None

    def __enter__(self) -> Board:
        if not self.quiet:
            self._live = Live(self._table(), console=Console(stderr=True), refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(*exc)

    def update(self, name: str, stage: str) -> None:
        if name in self.stages and self.stages[name] != stage and name not in self.rows:
            self.stages[name], self.since[name] = stage, time.monotonic()
            self._redraw()

    def finish(self, name: str, row: dict) -> None:
        self.rows[name] = row
        self.stages[name] = "reused" if row.get("reused") else row["status"]
        self._redraw()

    def _redraw(self) -> None:
        if self._live is not None:
            self._live.update(self._table())

    def _table(self) -> Table:
        table = Table("model", "stage", "s", "layers", "nodes", "decode tok/s")
        table.add_column("status", no_wrap=True, overflow="ellipsis", max_width=48)
        now = time.monotonic()
        for name, stage in self.stages.items():
            row = self.rows.get(name)
            if row is None:
                running = stage != "waiting"
                elapsed = f"{now - self.since[name]:.0f}" if running else ""
                table.add_row(name, stage, elapsed, "", "", "", "")
                continue
            values = cells(row)
            seconds = row.get("seconds", {}).get("total")
            style = "green" if row["status"] == "ok" else "red"
            status = f"[{style}]{values[1]}[/{style}]"
            if row["status"] != "ok":
                status += f" {escape(values[2])}"
            took = "" if row.get("reused") or seconds is None else f"{seconds:.0f}"
            layers = values[2] if row["status"] == "ok" else ""
            table.add_row(name, self.stages[name], took, layers, values[3], values[7], status)
        return table
