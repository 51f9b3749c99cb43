"""The KV arena is checked against the memory available before it is allocated, and costs
memory only where positions have been written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvfuse.errors import KvfuseError
from kvfuse.optimize import optimize
from kvfuse.runtime import session as runtime_session
from kvfuse.runtime.generate import load
from kvfuse.runtime.session import Session
from kvfuse.runtime.spec import read_spec


def test_kv_arena_larger_than_memory_is_refused(tiny_export, tmp_path, monkeypatch):
    """Before allocating, the arena's bytes are compared with the memory available: the error
    gives both figures."""
    _, export_dir = tiny_export("llama")
    out = tmp_path / "m.onnx"
    optimize(export_dir, out, max_context=64, quiet=True)
    monkeypatch.setattr(runtime_session, "available_memory", lambda: 1000)
    with pytest.raises(KvfuseError, match="needs 32.0 KiB but only 1000 bytes") as error:
        load(out).session(1)
    assert "[4, 1, 2, 64, 16]" in str(error.value)
    monkeypatch.undo()  # the real figure: this machine's available memory, read from the OS
    assert runtime_session.available_memory() > np.prod([4, 1, 2, 64, 16]) * 4
    assert load(out).session(1).kv_bytes == np.prod([4, 1, 2, 64, 16]) * 4


def resident_bytes(array: np.ndarray) -> int:
    """Bytes of `array`'s memory that are resident now, from this process's /proc/self/smaps."""
    start, end = array.ctypes.data, array.ctypes.data + array.nbytes
    resident, mapping = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            mapping = (low, high)
        elif head == "Rss:" and mapping and mapping[0] < end and mapping[1] > start:
            resident += int(line.split()[1]) * 1024
    return resident


def test_arena_pages_become_resident_as_positions_fill(tiny_export, tmp_path):
    """A step of 8 tokens makes only those positions' pages resident, not the arena: 32 rows ×
    512 positions (8 MiB, past numpy's 4 MiB huge-page threshold, under which one token per
    head made every 2 MiB around it resident) hold one 4 KiB page per head buffer."""
    _, export_dir = tiny_export("llama")
    out = tmp_path / "m.onnx"
    optimize(export_dir, out, max_context=512, quiet=True, verify_numerics=False)
    session = Session(read_spec(out), batch=32, threads=1)
    assert session.kv_bytes == 4 * 32 * 2 * 512 * 16 * 4
    assert resident_bytes(session.arena) == 0  # allocated, nothing written yet
    session.run(np.tile(np.arange(5, 13), (32, 1)), np.full([32], 8))
    session.check_in_place()
    planes = 4 * 32 * 2  # layer buffers × rows × KV heads, 8 positions × 16 floats each
    assert 0 < resident_bytes(session.arena) <= planes * 4096 < session.kv_bytes / 4
