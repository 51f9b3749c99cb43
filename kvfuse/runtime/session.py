"""An onnxruntime session over a retained-state model, with its KV memory planned up front.

Every layer's K and V buffer is a slice of one arena allocated once: [2·layers, B, Hkv,
max_context, D]. Each slice is bound, through IOBinding, as both the layer's `past` input and
its `present` output, so GroupQueryAttention writes the new positions into the buffer it reads
(onnxruntime's CPU kernel shares past and present only when they are the same memory). The
logits are bound into preallocated buffers, one per step length. After a step, `check_in_place`
compares each present output's address with its arena slice and fails if anything moved.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from kvfuse.errors import KvfuseError
from kvfuse.runtime.spec import ModelSpec


class Session:
    """Run steps of an optimized model: `run(input_ids, lengths_after)` → logits view."""

    def __init__(self, spec: ModelSpec, batch: int = 1, threads: int | None = None) -> None:
        if spec.batch_size is not None and batch != spec.batch_size:
            raise KvfuseError(f"this model was optimized for batch {spec.batch_size}, not {batch}")
        self.spec, self.batch = spec, batch
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(spec.path), options, providers=["CPUExecutionProvider"]
        )
        shape = (len(spec.pairs), batch, spec.kv_heads, spec.max_context, spec.head_dim)
        self.arena = np.zeros(shape, dtype=np.float32)  # the only KV memory, allocated once
        self.binding = self.session.io_binding()
        self._kv_values = [ort.OrtValue.ortvalue_from_numpy(self.arena[i]) for i in range(shape[0])]
        for (past, present), value in zip(spec.pairs, self._kv_values, strict=True):
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
        self._logits: dict[int, np.ndarray] = {}
        self._seqlens = np.zeros([batch], np.int32)
        self._total = np.zeros([], np.int32)

    @property
    def kv_bytes(self) -> int:
        return self.arena.nbytes

    def run(self, input_ids: np.ndarray, lengths_after: np.ndarray) -> np.ndarray:
        """One step: `input_ids` [B, S] at each row's current end; `lengths_after` [B] is each
        row's valid length once these tokens are in. Returns logits [B, S, vocab], or [B, 1,
        vocab] (each row's last position) for a model optimized with last-position logits —
        a reused buffer: copy what you keep."""
        steps = input_ids.shape[1]
        if int(lengths_after.max()) > self.spec.max_context:
            raise KvfuseError(f"context of {self.spec.max_context} positions is full")
        self._seqlens[:] = lengths_after - 1
        self._total[...] = lengths_after.max()
        self.binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        self.binding.bind_cpu_input("seqlens_k", self._seqlens)
        self.binding.bind_cpu_input("total_sequence_length", self._total)
        if "position_ids" in self.spec.inputs:
            start = lengths_after[:, None] - steps
            self.binding.bind_cpu_input("position_ids", start + np.arange(steps)[None, :])
        logits = self._logits_buffer(1 if self.spec.last_logits_only else steps)
        self.session.run_with_iobinding(self.binding)
        return logits

    def check_in_place(self) -> None:
        """Fail loudly if onnxruntime wrote any present output anywhere but its arena slice."""
        # get_outputs() lists outputs in binding order, so compare addresses as a set
        written = {value.data_ptr() for value in self.binding.get_outputs()}
        for index, (_, present) in enumerate(self.spec.pairs):
            if self.arena[index].ctypes.data not in written:
                raise KvfuseError(
                    f"onnxruntime wrote {present} to new memory instead of updating the KV "
                    "buffer in place (past and present are not shared); the cache would be copied "
                    "every step"
                )

    def reset(self) -> None:
        """Forget every cached position (the buffers stay where they are)."""
        self.arena[...] = 0.0

    def _logits_buffer(self, steps: int) -> np.ndarray:
        if steps not in self._logits:
            self._logits[steps] = np.empty((self.batch, steps, self.spec.vocab_size), np.float32)
        buffer = self._logits[steps]
        self.binding.bind_output(
            "logits", "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data
        )
        return buffer


def physical_cores() -> int:
    """Physical cores available to this process (hyperthread siblings counted once)."""
    try:
        allowed = os.sched_getaffinity(0)
        siblings = set()
        for cpu in allowed:
            path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
            with open(path) as f:
                siblings.add(f.read().strip())
        return max(1, len(siblings))
    except OSError:
        return max(1, (os.cpu_count() or 2) // 2)
