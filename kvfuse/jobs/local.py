"""Jobs on this machine: up to N at a time, each in a fresh process ("spawn") started for that
job alone, so no state, memory or onnxruntime threads carry from one model to the next.

A process per job rather than a pool: a worker that dies (a native crash, the kernel's
out-of-memory killer) becomes that model's failed row with its exit status, where a
`multiprocessing.Pool` would wait forever for the lost task (and `ProcessPoolExecutor(
max_tasks_per_child=…)` can deadlock, cpython gh-115634). Progress and the finished row come
back on one queue."""

from __future__ import annotations

import multiprocessing
import queue as queues
import signal
from collections.abc import Iterator
from pathlib import Path

from kvfuse.jobs.job import lost_row, run_job
from kvfuse.jobs.plan import Job


def run_local(jobs: list[Job], out_root: Path, workers: int, board) -> Iterator[dict]:
    """Run `jobs`, `workers` at a time; yield each row as its job ends (any order)."""
    context = multiprocessing.get_context("spawn")
    reports = context.Queue()
    waiting, running, rows = list(jobs), {}, {}
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                job = waiting.pop(0)
                process = context.Process(
                    target=_child, args=(job, out_root, reports), name=f"kvfuse-job-{job.name}"
                )
                process.start()
                running[job.name] = (job, process)
            _drain(reports, board, rows, wait=0.25)
            for name, (job, process) in list(running.items()):
                if name not in rows and not process.is_alive():
                    _drain(reports, board, rows, wait=0.5)  # a row sent just before exiting
                if name in rows or not process.is_alive():
                    process.join()
                    del running[name]
                    yield rows.pop(name, None) or _died(job, process.exitcode, out_root)
    finally:
        for _, process in running.values():
            process.terminate()
            process.join()


def _child(job: Job, out_root: Path, reports) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides what Ctrl-C stops
    row = run_job(job, out_root, lambda name, stage: reports.put(("stage", name, stage)))
    reports.put(("row", job.name, row))


def _drain(reports, board, rows: dict, wait: float) -> None:
    """Apply every report waiting on the queue (waiting up to `wait` s for the first)."""
    try:
        while True:
            kind, name, value = reports.get(timeout=wait) if wait else reports.get_nowait()
            wait = 0
            if kind == "row":
                rows[name] = value
            else:
                board.update(name, value)
    except queues.Empty:
        pass


def _died(job: Job, exitcode: int | None, out_root: Path) -> dict:
    how = f"killed by signal {-exitcode}" if exitcode and exitcode < 0 else f"exit {exitcode}"
    hint = " (out of memory?)" if exitcode == -signal.SIGKILL else ""
    return lost_row(job, out_root, f"the job's process died ({how}){hint}")
