"""Jobs on a Ray cluster: each one a Ray task with its CPU and memory needs declared, run in a
worker process used for that task only (`max_calls=1`). The task writes into a directory of
its own node and returns it as a tar archive, which the driver unpacks under OUT_ROOT: no
filesystem needs to be shared for the outputs (the sources must be readable on the nodes —
`default`, or paths on a shared filesystem). Progress goes through a small actor."""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kvfuse.cluster import connect
from kvfuse.files import staged_directory
from kvfuse.jobs.job import lost_row, one_line, run_job
from kvfuse.jobs.plan import Job


def run_ray(jobs: list[Job], out_root: Path, address: str | None, board) -> Iterator[dict]:
    """Run `jobs` as Ray tasks; yield each row as its job ends (any order)."""
    ray = connect(address)
    progress = ray.remote(num_cpus=0)(Progress).remote()
    task = ray.remote(max_calls=1)(_task)
    refs = {}
    for job in jobs:
        needs = job.options["resources"]
        options = {"num_cpus": needs["cpus"], "memory": int(needs["memory_gb"] * 2**30)}
        refs[task.options(name=f"kvfuse-job-{job.name}", **options).remote(job, progress)] = job
    while refs:
        done, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
        for name, stage in ray.get(progress.take.remote()):
            board.update(name, stage)
        for ref in done:
            job = refs.pop(ref)
            try:
                row, archive = ray.get(ref)
            except ray.exceptions.RayError as error:  # the worker died, ran out of memory …
                yield lost_row(job, out_root, f"the Ray task failed: {one_line(error)}")
                continue
            _unpack(archive, out_root / job.name)
            yield row


class Progress:
    """A Ray actor collecting (job, stage) reports until the driver takes them."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str]] = []

    def put(self, name: str, stage: str) -> None:
        self.reports.append((name, stage))

    def take(self) -> list[tuple[str, str]]:
        reports, self.reports = self.reports, []
        return reports


def _task(job: Job, progress) -> tuple[dict, bytes]:
    root = Path(tempfile.mkdtemp(prefix="kvfuse-job-"))
    try:
        row = run_job(job, root, lambda name, stage: progress.put.remote(name, stage))
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            archive.add(root / job.name, arcname=".")
        return row, buffer.getvalue()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _unpack(archive: bytes, destination: Path) -> None:
    with staged_directory(destination, overwrite=True) as staging:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(staging, filter="data")
