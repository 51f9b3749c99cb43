"""Which earlier rows a run keeps: the same key only, and failed ones unless retried."""

from __future__ import annotations

import json

from kvfuse.jobs.plan import load_jobs
from kvfuse.jobs.run import _previous


def test_a_row_is_kept_only_for_the_same_key_and_failures_on_request(tmp_path):
    """An unchanged job keeps its row (marked reused); a changed key, or --retry-failed on a
    failed row, runs it again; a torn job.json is treated as not run."""
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"models": ["default"]}))
    job = load_jobs(models)[0]
    row_file = tmp_path / "out" / job.name / "job.json"
    row_file.parent.mkdir(parents=True)

    def previous(row, retry_failed=False):
        row_file.write_text(json.dumps(row) if isinstance(row, dict) else row)
        return _previous(job, tmp_path / "out", retry_failed)

    assert previous({"name": job.name, "key": job.key, "status": "ok"})["reused"] is True
    assert previous({"name": job.name, "key": "0" * 64, "status": "ok"}) is None
    failed = {"name": job.name, "key": job.key, "status": "failed", "reason": "x"}
    assert previous(failed)["reason"] == "x"
    assert previous(failed, retry_failed=True) is None
    assert previous('{"name": "def') is None
