"""The KV arena is checked against the memory available before it is allocated."""

from __future__ import annotations

import numpy as np
import pytest

from kvfuse.errors import KvfuseError
from kvfuse.optimize import optimize
from kvfuse.runtime import session as runtime_session
from kvfuse.runtime.generate import load


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
