"""An onnxruntime session over a retained-state model, with its KV memory planned up front.

Every layer's K and V buffer is a view into one arena allocated once, buffer after buffer, each
[B, Hkv, max_context, D] with its own layer's KV heads and head dim (layers may differ; the
arena itself is one flat array, `self.kv` its per-buffer views). Each view is bound, through
IOBinding, as both the layer's `past` input and its `present` output, so the graph writes the
new positions into the buffer it reads (onnxruntime's GroupQueryAttention and TensorScatter
update in place only when past and present are the same memory). The logits are bound into
preallocated buffers, one per step length.

A static pair (`--target onnx --static`) is two sessions — a prefill graph of `prefill_len` new
tokens and a decode graph of one — over the same arena and the same in-memory weights (see
`shared_weights`; `prepack=True` trades that for a pre-packed copy per session). A step
shorter than the prefill length is right-padded, which is valid for a first prompt (the
padding's cache slots lie past the valid length and are never read).

Two checks refuse a silent cache copy: the first run of each graph is made with onnxruntime's
warnings captured (it warns when an in-place update falls back to copying), and
`check_in_place` compares each present output's address with its arena slice.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile

import numpy as np
import onnxruntime as ort

from kvfuse.errors import KvfuseError
from kvfuse.runtime.shared_weights import SharedWeights
from kvfuse.runtime.spec import ModelSpec, arena_layout, arena_text

COPY_WARNING = "in-place optimization not activated"


class Session:
    """Run steps of an optimized model: `run(input_ids, lengths_after)` → logits view."""

    def __init__(
        self, spec: ModelSpec, batch: int = 1, threads: int | None = None, prepack: bool = False
    ) -> None:
        if spec.batch_size is not None and batch != spec.batch_size:
            raise KvfuseError(f"this model was optimized for batch {spec.batch_size}, not {batch}")
        self.spec, self.batch = spec, batch
        self.threads = threads or physical_cores()
        graphs = {None: spec.path}
        self.weights = None
        if spec.prefill_path is not None:
            graphs = {1: spec.path, spec.prefill_len: spec.prefill_path}
            if not prepack:  # else each session reads (and pre-packs) its own copy
                self.weights = SharedWeights(spec.weights_path, list(graphs.values()))
        if spec.dtype not in ("float32", "float16"):
            raise KvfuseError(f"onnxruntime's CPU kernels cannot run this {spec.dtype} model")
        shapes = spec.buffer_shapes(batch)
        offsets, elements = arena_layout(shapes)
        check_fits(elements * np.dtype(spec.kv_dtype).itemsize, arena_text(shapes))
        self.arena = untouched_array(elements, spec.kv_dtype)  # the only KV memory, allocated once
        # layer buffer i: a view at its offset, in its own shape
        self.kv = [
            self.arena[offset : offset + math.prod(shape)].reshape(shape)
            for offset, shape in zip(offsets, shapes, strict=True)
        ]
        self._kv_values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in self.kv]
        self._graphs = {length: self._open(path) for length, path in graphs.items()}
        self.session, self.binding = self._graphs[1 if spec.prefill_path else None]  # decode
        self._logits: dict[tuple[int, int | None], np.ndarray] = {}
        self._probed: set[int | None] = set()
        self._seqlens = np.zeros([batch], np.int32)
        self.held: list[int] = []  # tokens row 0 holds, left by the last single-prompt run
        self._total = np.zeros([], np.int32)

    def _open(self, path) -> tuple[ort.InferenceSession, ort.IOBinding]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 4  # errors come back as exceptions
        if self.weights is not None:
            self.weights.add_to(options)
        session = open_session(path, options)
        binding = session.io_binding()
        for (past, present), value in zip(self.spec.pairs, self._kv_values, strict=True):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return session, binding

    @property
    def kv_bytes(self) -> int:
        return self.arena.nbytes

    kv_location = ("cpu", 0)  # where the arena lies, for bindings by pointer (rows.py)

    @property
    def kv_dtype(self):
        return self.arena.dtype

    def row_address(self, index: int, row: int) -> int:
        """The address of layer-buffer `index`'s row `row` in the arena."""
        return self.kv[index][row].ctypes.data

    @property
    def prefill_len(self) -> int | None:
        """New tokens per prefill step of a static pair (None: any length)."""
        return self.spec.prefill_len

    def run(self, input_ids: np.ndarray, lengths_after: np.ndarray) -> np.ndarray:
        """One step: `input_ids` [B, S] at each row's current end; `lengths_after` [B] is each
        row's valid length once these tokens are in. Returns logits [B, S, vocab], or [B, 1,
        vocab] (each row's last position) for a model optimized with last-position logits —
        a reused buffer: copy what you keep."""
        steps = input_ids.shape[1]
        if int(lengths_after.max()) > self.spec.max_context:
            raise KvfuseError(f"context of {self.spec.max_context} positions is full")
        key, width = self._graph_for(steps, lengths_after)
        session, binding = self._graphs[key]
        self._seqlens[:] = lengths_after - 1
        self._total[...] = lengths_after.max()
        ids = np.ascontiguousarray(input_ids, np.int64)
        if width > steps:  # a first prompt right-padded into the static prefill graph
            ids = np.pad(ids, [(0, 0), (0, width - steps)])
        binding.bind_cpu_input("input_ids", ids)
        inputs = self.spec.inputs
        binding.bind_cpu_input("seqlens_k", self._seqlens)
        if "total_sequence_length" in inputs:
            binding.bind_cpu_input("total_sequence_length", self._total)
        if "position_ids" in inputs:
            start = np.maximum(lengths_after[:, None] - steps, 0)
            binding.bind_cpu_input("position_ids", start + np.arange(width)[None, :])
        logits = self._logits_buffer(binding, key, 1 if self.spec.last_logits_only else width)
        try:
            if key in self._probed:
                session.run_with_iobinding(binding)
            else:
                self._probe(session, binding)
                self._probed.add(key)
        except KvfuseError:
            raise
        except Exception as error:  # onnxruntime failing a step of a damaged or edited model
            raise KvfuseError(
                f"onnxruntime failed running {self.spec.path.name}: {ort_reason(error)}; "
                "re-run kvfuse optimize"
            ) from error
        if logits.dtype != np.float32:  # sampling works in float32
            return logits[:, :steps].astype(np.float32)
        return logits[:, :steps]

    def _graph_for(self, steps: int, lengths_after: np.ndarray) -> tuple[int | None, int]:
        """Which graph runs a step of `steps` new tokens, and the width it is padded to."""
        if self.spec.prefill_path is None:
            return None, steps
        if steps == 1:
            return 1, 1
        if steps > self.spec.prefill_len or (
            steps < self.spec.prefill_len and int(lengths_after.max()) > steps
        ):
            raise KvfuseError(
                f"a static prefill step takes {self.spec.prefill_len} new tokens (fewer only "
                f"for a first prompt), not {steps} after {int(lengths_after.max()) - steps}"
            )
        return self.spec.prefill_len, self.spec.prefill_len

    def _probe(self, session: ort.InferenceSession, binding: ort.IOBinding) -> None:
        """A first run with onnxruntime's warnings captured: refuse a cache it copied."""
        options = ort.RunOptions()
        options.log_severity_level = 1  # warnings
        with _captured_stderr() as captured:
            session.run_with_iobinding(binding, options)
        log = "".join(captured)
        if COPY_WARNING in log:
            line = next(line for line in log.splitlines() if COPY_WARNING in line)
            raise KvfuseError(
                "onnxruntime copied the KV cache instead of updating it in place "
                f"({line.split('] ')[-1].strip()}); past and present must be one buffer"
            )

    def check_in_place(self) -> None:
        """Fail loudly if onnxruntime wrote any present output anywhere but its arena slice."""
        for key in self._probed:  # the graphs that have run
            binding = self._graphs[key][1]
            # get_outputs() lists outputs in binding order, so compare addresses as a set
            written = {value.data_ptr() for value in binding.get_outputs()}
            for index, (_, present) in enumerate(self.spec.pairs):
                if self.kv[index].ctypes.data not in written:
                    raise KvfuseError(
                        f"onnxruntime wrote {present} to new memory instead of updating the KV "
                        "buffer in place (past and present are not shared); the cache would be "
                        "copied every step"
                    )

    def reset(self) -> None:
        """Forget every cached position (the buffers stay where they are, and as they are:
        attention reads only each row's valid positions — seqlens_k, or the mask over the
        fixed buffer — so clearing them would only make the whole arena resident, 94 MB for
        SmolLM2 at 2,048 positions, and cost a memset per generation)."""
        self.held = []

    def _logits_buffer(self, binding, key, steps: int) -> np.ndarray:
        if (steps, key) not in self._logits:
            shape = (self.batch, steps, self.spec.vocab_size)
            self._logits[steps, key] = np.empty(shape, self.spec.logits_dtype)
        buffer = self._logits[steps, key]
        binding.bind_output(
            "logits", "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data
        )
        return buffer


@contextlib.contextmanager
def _captured_stderr():
    """Redirect file descriptor 2 (where onnxruntime logs) into a temporary file; the yielded
    list holds what was written once the block ends."""
    text: list[str] = []
    with tempfile.TemporaryFile(mode="w+", errors="replace") as file:
        saved = os.dup(2)
        os.dup2(file.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            text.append(file.read())


def open_session(path, options: ort.SessionOptions) -> ort.InferenceSession:
    """An onnxruntime CPU session; a model it refuses (damaged, edited, an op it lacks) is
    one line naming the file and onnxruntime's reason."""
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's pybind errors share no base class but Exception
        raise KvfuseError(
            f"onnxruntime cannot load {path}: {ort_reason(error)}; re-run kvfuse optimize"
        ) from error


def ort_reason(error: Exception) -> str:
    """onnxruntime's message without its status prefix, first line, shortened."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text.split(" : ")[-1][:300]


def untouched_array(shape, dtype) -> np.ndarray:
    """A zero-filled array whose pages become resident only where they are written.

    Anonymous memory from `mmap` rather than numpy's allocator: numpy advises transparent huge
    pages for large arrays, and the first step — one position written per head — then faults in
    2 MiB pages spanning every head's buffer (SmolLM2 at 2,048 positions: 88 of its 90 MiB
    resident after one token). Here a buffer costs memory as its positions fill.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    pages = mmap.mmap(-1, max(nbytes, 1))
    return np.frombuffer(pages, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def check_fits(arena_bytes: int, shape_text: str) -> None:
    """Refuse a KV arena larger than the memory available now (before allocating it);
    `shape_text` names its shape (`spec.arena_text`)."""
    available = available_memory()
    if available is not None and arena_bytes > available:
        raise KvfuseError(
            f"the KV arena {shape_text} needs {_size(arena_bytes)} but only {_size(available)} "
            "of memory is available; optimize with a smaller --max-context (or batch size)"
        )


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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
