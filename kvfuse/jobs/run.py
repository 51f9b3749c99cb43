"""`kvfuse optimize-many`: plan the jobs, keep the ones already done, run the rest (locally or on
Ray) with live progress, and write the index after every finished job.

MODELS.json ─ load_jobs ─ reuse rows whose key is unchanged ─ run_local | run_ray ─┐
                                              OUT_ROOT/index.json + index.html ◀──┘ (per row)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kvfuse.errors import KvfuseError
from kvfuse.files import check_not_input
from kvfuse.jobs.board import Board
from kvfuse.jobs.index import write_index
from kvfuse.jobs.job import ROW_FILE
from kvfuse.jobs.plan import Job, load_jobs

LOCAL = object()  # run_many(ray=LOCAL): no Ray; ray=None starts a local Ray cluster


def run_many(
    models_file: str | Path,
    out_root: str | Path,
    *,
    jobs: int = 1,
    ray=LOCAL,
    retry_failed: bool = False,
    quiet: bool = False,
) -> list[dict]:
    """Export, optimize and benchmark every model of a models file, each as its own job.

    Args:
        models_file: the JSON list of models (schema: kvfuse/jobs/models.schema.json).
        out_root: directory for each model's results and the index.
        jobs: worker processes when running locally.
        ray: `LOCAL` (default) runs on this machine; a Ray address joins that cluster;
            None starts a local Ray cluster.
        retry_failed: run again the models whose last run failed (by default a failed model
            whose inputs and options did not change keeps its row, like a passed one).
        quiet: no live progress.

    Returns:
        The rows, in the models file's order ("status" "ok" or "failed" with a "reason";
        "reused" when the row comes from an earlier run).
    """
    models_file, out_root = Path(models_file), Path(out_root)
    planned = load_jobs(models_file)
    check_not_input(out_root, [Path(j.source) for j in planned if j.source != "default"])
    if out_root.exists() and not out_root.is_dir():
        raise KvfuseError(f"{out_root} exists and is not a directory; choose another OUT_ROOT")
    if jobs < 1:
        raise KvfuseError(f"--jobs must be at least 1, not {jobs}")
    out_root.mkdir(parents=True, exist_ok=True)
    rows = {job.name: _previous(job, out_root, retry_failed) for job in planned}
    todo = [job for job in planned if rows[job.name] is None]
    _remove_leftovers(out_root, todo)
    with Board([job.name for job in planned], quiet) as board:
        for row in rows.values():
            if row is not None:
                board.finish(row["name"], row)
        write_index(out_root, _ordered(planned, rows), models_file)
        for row in _runner(todo, out_root, jobs, ray, board):
            rows[row["name"]] = row
            board.finish(row["name"], row)
            write_index(out_root, _ordered(planned, rows), models_file)
    return _ordered(planned, rows)


def _runner(todo: list[Job], out_root: Path, jobs: int, ray, board):
    if not todo:
        return iter(())
    if ray is LOCAL:
        from kvfuse.jobs.local import run_local

        return run_local(todo, out_root, min(jobs, len(todo)), board)
    from kvfuse.jobs.ray_runner import run_ray

    return run_ray(todo, out_root, ray, board)


def _previous(job: Job, out_root: Path, retry_failed: bool) -> dict | None:
    """The row of an earlier run of the same job (same key), if it is to be kept."""
    try:
        row = json.loads((out_root / job.name / ROW_FILE).read_text())
    except (OSError, ValueError):
        return None
    if row.get("key") != job.key or (retry_failed and row.get("status") != "ok"):
        return None
    return {**row, "reused": True}


def _ordered(planned: list[Job], rows: dict) -> list[dict]:
    return [rows[job.name] or {"name": job.name, "source": job.source} for job in planned]


def _remove_leftovers(out_root: Path, todo: list[Job]) -> None:
    """Staging directories a killed run left behind for the jobs about to run again."""
    for job in todo:
        for leftover in out_root.glob(f".{job.name}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
