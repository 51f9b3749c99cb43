"""Steps over some rows of a Session's KV arena: the batching engine's view of the memory.

Each layer buffer of the arena, [B, Hkv, max_context, D] (its layer's own Hkv and D), is B
independent rows. A step here runs the session on a contiguous span of rows [first, first + n):
every layer's past and present are bound, by pointer, to the same [n, Hkv, max_context, D] slice
of that layer's buffer (the address of its row `first`), so the graph writes
each row's new positions in place at that row's own valid length (GroupQueryAttention reads
`seqlens_k` per row). A prompt chunk is a span of one row — onnxruntime's GroupQueryAttention
takes more than one new token with a past only at batch 1 — and a decode step is a span of
many rows, one token each, ragged lengths allowed.

    rows = RowSteps(Session(spec, batch=8))
    logits = rows.step(first=3, input_ids=prompt[None, :64], lengths_after=np.array([64]))
    logits = rows.step(first=0, input_ids=tokens[:, None], lengths_after=lengths)  # 8 rows

Each (first, n) binding is made once and kept; its first run is checked in place (the present
outputs' addresses must be the arena's). The session is a CPU `Session` or a `CudaSession`
(`kvfuse.runtime.device`, run eagerly): each says where its arena lies (`kv_location`), its
dtype, and the address of a row (`row_address`); the logits come back to host memory.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from kvfuse.errors import KvfuseError
from kvfuse.runtime.session import Session


class RowSteps:
    """Run steps on spans of one Session's arena rows, bound by pointer."""

    def __init__(self, session: Session) -> None:  # or a CudaSession
        spec = session.spec
        if spec.prefill_path is not None or spec.batch_size is not None:
            raise KvfuseError(
                "serving needs a model with a dynamic batch; optimize it without --static "
                "and without --batch-size"
            )
        self.session, self.spec = session, spec
        self.rows = session.batch
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}
        self._logits: dict[tuple[int, int, int], np.ndarray] = {}
        self._checked: set[tuple[int, int]] = set()

    def step(self, first: int, input_ids: np.ndarray, lengths_after: np.ndarray) -> np.ndarray:
        """Feed `input_ids` [n, S] to rows first … first+n−1, each at its own end.

        Args:
            first: the first row of the span.
            input_ids: [n, S] new tokens; S > 1 only for a single row (a prompt chunk).
            lengths_after: [n] each row's valid length once these tokens are in.

        Returns:
            logits [n, vocab] at each row's last new position — a reused buffer: copy what
            you keep.
        """
        count, steps = input_ids.shape
        if steps > 1 and count != 1:
            raise KvfuseError("a step of more than one token takes a single row")
        if first < 0 or first + count > self.rows:
            raise KvfuseError(f"rows {first}..{first + count - 1} lie outside 0..{self.rows - 1}")
        if int(lengths_after.max()) > self.spec.max_context or int(lengths_after.min()) < steps:
            raise KvfuseError(f"row lengths {lengths_after.tolist()} do not fit this step")
        binding = self._binding(first, count)
        lengths_after = np.asarray(lengths_after, np.int64)
        feeds = {  # kept alive here until the run: onnxruntime reads them where they lie
            "input_ids": np.ascontiguousarray(input_ids, np.int64),
            "seqlens_k": (lengths_after - 1).astype(np.int32),
            "total_sequence_length": np.array(lengths_after.max(), np.int32),
            "position_ids": lengths_after[:, None] - steps + np.arange(steps)[None, :],
        }
        for name, value in feeds.items():
            if name in self.spec.inputs:
                binding.bind_cpu_input(name, value)
        logits = self._logits_buffer(binding, count, steps)
        self.session.session.run_with_iobinding(binding)
        if (first, count) not in self._checked:
            self._check_in_place(binding, first)
            self._checked.add((first, count))
        return logits[:, -1]

    def _binding(self, first: int, count: int) -> ort.IOBinding:
        if (first, count) not in self._bindings:
            session = self.session
            binding = session.session.io_binding()
            spec = self.spec
            where, dtype = session.kv_location, session.kv_dtype
            for index, (past, present) in enumerate(spec.pairs):
                heads, dim = spec.kv_shapes[index]  # each layer's own
                shape = [count, heads, spec.max_context, dim]
                pointer = session.row_address(index, first)  # rows are contiguous in a buffer
                binding.bind_input(past, *where, dtype, shape, pointer)
                binding.bind_output(present, *where, dtype, shape, pointer)
            self._bindings[first, count] = binding
        return self._bindings[first, count]

    def _logits_buffer(self, binding: ort.IOBinding, count: int, steps: int) -> np.ndarray:
        width = 1 if self.spec.last_logits_only else steps
        key = (id(binding), count, width)
        if key not in self._logits:
            self._logits[key] = np.empty((count, width, self.spec.vocab_size), np.float32)
        buffer = self._logits[key]
        binding.bind_output("logits", "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        return buffer

    def _check_in_place(self, binding: ort.IOBinding, first: int) -> None:
        written = {value.data_ptr() for value in binding.get_outputs()}
        for index, (_, present) in enumerate(self.spec.pairs):
            if self.session.row_address(index, first) not in written:
                raise KvfuseError(
                    f"onnxruntime wrote {present} to new memory instead of the arena rows it "
                    "was bound to; the cache would be copied every step"
                )
