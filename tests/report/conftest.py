"""Fixtures of the report tests: Debian's chromium for the headless-browser checks."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


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
