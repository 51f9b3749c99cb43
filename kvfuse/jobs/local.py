"""Jobs on this machine: N worker processes, each started fresh for one job and ended after it
(`multiprocessing.Pool(maxtasksperchild=1)` under "spawn": no state, memory or onnxruntime
threads carried from one model to the next; not `ProcessPoolExecutor(max_tasks_per_child=…)`,
which can deadlock, cpython gh-115634)."""

from __future__ import annotations

import multiprocessing
import queue as queues
from collections.abc import Iterator
from pathlib import Path

from kvfuse.jobs.job import run_job
from kvfuse.jobs.plan import Job

_reports = None  # the worker's end of the progress queue (set by the pool's initializer)


def run_local(jobs: list[Job], out_root: Path, workers: int, board) -> Iterator[dict]:
    """Run `jobs` in `workers` processes; yield each row as its job ends (any order)."""
    context = multiprocessing.get_context("spawn")
    reports = context.Queue()
    with context.Pool(workers, _init_worker, (reports,), maxtasksperchild=1) as pool:
        pending = [pool.apply_async(_run_one, (job, out_root)) for job in jobs]
        while pending:
            _drain(reports, board, wait=0.25)
            for result in [r for r in pending if r.ready()]:
                pending.remove(result)
                _drain(reports, board, wait=0)
                yield result.get()


def _init_worker(reports) -> None:
    global _reports
    _reports = reports


def _run_one(job: Job, out_root: Path) -> dict:
    return run_job(job, out_root, lambda name, stage: _reports.put((name, stage)))


def _drain(reports, board, wait: float) -> None:
    try:
        while True:
            board.update(*reports.get(timeout=wait) if wait else reports.get_nowait())
            wait = 0
    except queues.Empty:
        pass
