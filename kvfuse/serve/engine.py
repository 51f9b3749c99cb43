"""The batching engine: one thread owns the onnxruntime session and the KV arena's rows.

    submit ─▶ waiting (bounded) ─▶ a free row ─▶ prompt chunks ─▶ decode with the other rows
                                      ▲                                   │
                                      └── finished / stopped / cancelled / timed out

Every loop turn (`_turn`): retire what was cancelled or timed out, admit waiting requests into
free rows, run ONE decode step for every decoding row together (one token each, per-row valid
lengths), then ONE prompt chunk of the oldest prefilling row. Decode comes first, so a long
prompt delays each stream by one chunk per step, never by the whole prompt. With no chunk while
rows decode (`chunk_while_decoding=0`), prefilling rows ride along in the decode step instead,
one prompt token each: the streams' steps grow by a row, not by a chunk. A request is admitted
only when its prompt plus max_new_tokens fit a row, so a started request is never evicted.

A row keeps the tokens whose keys and values it holds after its request ends; a new request whose
prompt starts with them (a conversation that continues) is placed in that row and prefilled from
where they end.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvfuse.errors import KvfuseError
from kvfuse.runtime.rows import RowSteps
from kvfuse.runtime.sampling import Sampler, Sampling
from kvfuse.runtime.session import Session
from kvfuse.runtime.spec import read_spec
from kvfuse.runtime.text import StreamDecoder, Text
from kvfuse.serve.metrics import Metrics
from kvfuse.serve.textstream import StopFilter


class ContextTooLong(KvfuseError):
    """The prompt plus max_new_tokens do not fit one row; carries the numbers."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_context: int) -> None:
        self.prompt_tokens, self.max_new_tokens = prompt_tokens, max_new_tokens
        self.max_context = max_context
        super().__init__(
            f"This model's maximum context length is {max_context} tokens. However, your "
            f"request has {prompt_tokens} input tokens and asks for {max_new_tokens} new tokens "
            f"({prompt_tokens + max_new_tokens} in all); shorten the prompt or lower max_tokens"
        )


class QueueFull(KvfuseError):
    """Every row is busy and the waiting queue is full."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"the server is busy: every row is generating and {waiting} requests are waiting; "
            f"retry in {retry_after} s"
        )


@dataclasses.dataclass(frozen=True)
class Params:
    """One request's generation parameters."""

    max_new_tokens: int | None = None  # None: what is left of the row, at most `default`
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    timeout_s: float | None = None


@dataclasses.dataclass
class Event:
    """What a request's sink receives: tokens (text may be empty while held back), then one
    "done" — carrying the last token when one ended the request (stop string, length), and
    the held-back tail — or one "error" (text: the reason)."""

    kind: str  # "token", "done", "error"
    text: str = ""
    token: int | None = None
    logprob: float = 0.0
    finish_reason: str | None = None  # "eos", "stop", "length", "timeout", "cancelled"


class Request:
    """A submitted generation; the engine thread writes it, the sink reads Events."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: Params, sink: Callable[[Event], None]):
        self.id = next(Request._ids)
        self.prompt, self.params, self.sink = prompt, params, sink
        self.created = time.monotonic()
        self.deadline = self.created + params.timeout_s if params.timeout_s else None
        self.new: list[int] = []
        self.cached_tokens = 0  # prompt tokens whose KV a previous request left in the row
        self.finish_reason: str | None = None
        self.cancelled = False
        self.state = "waiting"  # → "prefill" → "decode" → "done"
        self.seed = params.sampling.seed
        self._sampler = Sampler(params.sampling)
        self._stop: StopFilter | None = None
        self._decoder: StreamDecoder | None = None
        self._pending = 0  # the sampled token to feed next
        self._last_token_at: float | None = None

    @property
    def text(self) -> str:
        return self._stop.text if self._stop else ""


class _Row:
    def __init__(self, index: int) -> None:
        self.index = index
        self.request: Request | None = None
        self.fed: list[int] = []  # tokens whose keys/values this row holds, in order


class Engine:
    """Continuous batching over the rows of one KV arena.

    Args:
        model: an optimized model (`.onnx` or its directory) with a dynamic batch.
        slots: rows of the arena, i.e. requests generating at once.
        max_queue: requests that may wait for a row; one more is refused (QueueFull).
        threads: onnxruntime intra-op threads (default: physical cores).
        prefill_chunk: prompt tokens per step while no other row is decoding.
        chunk_while_decoding: prompt tokens per step while other rows decode: bounds how much
            one prompt delays every stream's next token (a chunk of C tokens costs about a
            decode step of C rows: both read all the weights once); 0: no chunk step while
            rows decode — each prefilling row feeds one prompt token into the decode step
            (the least delay for the streams, the slowest admission).
        default_max_new_tokens: max_new_tokens when a request gives none (capped by its row).
        request_timeout_s: a request still running after this long (queue wait included) is
            ended with finish reason "timeout" (None: never), unless it sets its own.
        name: the model's name in the APIs (default: the model directory's name).
        device: "cpu", or "cuda" (a `--target cuda` model: the KV rows in device memory,
            steps run eagerly — spans of rows change from step to step).
    """

    def __init__(
        self,
        model: str | Path,
        slots: int = 4,
        max_queue: int = 64,
        threads: int | None = None,
        prefill_chunk: int = 256,
        chunk_while_decoding: int = 16,
        default_max_new_tokens: int = 256,
        request_timeout_s: float | None = 600.0,
        name: str | None = None,
        device: str = "cpu",
    ) -> None:
        if min(slots, prefill_chunk) < 1 or chunk_while_decoding < 0 or max_queue < 0:
            raise KvfuseError(
                "slots and --prefill-chunk must be ≥ 1, --chunk-while-decoding and max_queue ≥ 0"
            )
        self.spec = read_spec(model)
        self.text = Text(self.spec.directory)
        self.name = name or self.spec.directory.name
        self.max_context = self.spec.max_context
        self.slots, self.max_queue = slots, max_queue
        self.chunks = {False: prefill_chunk, True: chunk_while_decoding}  # by "rows decode"
        self.default_max_new_tokens = default_max_new_tokens
        self.request_timeout_s = request_timeout_s
        self._steps = RowSteps(_session(self.spec, slots, threads, device))
        self.metrics = Metrics(slots)
        self._rows = [_Row(i) for i in range(slots)]
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._busy = 0  # requests admitted and not yet finished (under _lock)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="kvfuse-engine", daemon=True)
        self._thread.start()

    # ---- the API other threads call --------------------------------------------------------
    def submit(self, prompt: list[int], params: Params, sink: Callable[[Event], None]) -> Request:
        """Queue a request, or refuse it at once (ContextTooLong, QueueFull) before anything
        streams. `sink` is called from the engine thread with each Event."""
        if not prompt:
            raise KvfuseError("the prompt is empty after tokenization")
        room = self.max_context - len(prompt)
        if params.max_new_tokens is None:
            wanted = max(1, min(self.default_max_new_tokens, room))
            params = dataclasses.replace(params, max_new_tokens=wanted)
        if params.timeout_s is None and self.request_timeout_s:
            params = dataclasses.replace(params, timeout_s=self.request_timeout_s)
        if room < 1 or params.max_new_tokens > room:
            self.metrics.outcome("rejected_context")
            raise ContextTooLong(len(prompt), params.max_new_tokens, self.max_context)
        request = Request(list(prompt), params, sink)
        with self._lock:
            if self._busy + len(self._waiting) >= self.slots + self.max_queue:
                self.metrics.outcome("rejected_queue")
                raise QueueFull(len(self._waiting), self._retry_after())
            self._waiting.append(request)
            self.metrics.queue.set(len(self._waiting))
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away); its row is freed at the next step."""
        request.cancelled = True
        with self._lock:
            self._lock.notify()

    def generate(self, prompt: list[int], params: Params = Params()) -> tuple[Request, list[Event]]:
        """Blocking convenience: submit, wait for the end, return the request and its events."""
        events: queue.Queue[Event] = queue.Queue()
        request = self.submit(prompt, params, events.put)
        received = []
        while not received or received[-1].kind == "token":
            received.append(events.get())
        return request, received

    def active_rows(self) -> int:
        return sum(row.request is not None for row in self._rows)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Stop the engine thread (requests still running are cancelled)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=30)

    # ---- the engine thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._busy:
                    self._lock.wait(timeout=1.0)
                if self._stopping:
                    break
            try:
                self._turn()
            except Exception as error:  # a failed step: fail its requests, keep serving
                self._fail_all(f"generation failed: {error}")
        self._fail_all("the server is shutting down", "cancelled")

    def _turn(self) -> None:
        self._retire()
        self._admit()
        decoding = [row for row in self._rows if row.request and row.request.state == "decode"]
        riding = not self.chunks[True]  # prompts advance inside the decode step
        if decoding:
            self._decode(decoding, riding)
        prefilling = [row for row in self._rows if row.request and row.request.state == "prefill"]
        if prefilling and not (decoding and riding):
            oldest = min(prefilling, key=lambda row: row.request.id)
            self._prefill_chunk(oldest, self.chunks[bool(decoding)])
        self.metrics.rows.set(self.active_rows())
        self.metrics.queue.set(len(self._waiting))

    def _retire(self) -> None:
        """Finish requests that were cancelled or ran out of time; drop cancelled waiters."""
        now = time.monotonic()
        for row in self._rows:
            request = row.request
            if request and request.cancelled:
                self._finish(row, "cancelled")
            elif request and request.deadline and now > request.deadline:
                self._finish(row, "timeout")
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled or (r.deadline and now > r.deadline)]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:
            reason = "cancelled" if request.cancelled else "timeout"
            request.state, request.finish_reason = "done", reason
            self.metrics.outcome(reason)
            request.sink(Event("done", finish_reason=reason))

    def _admit(self) -> None:
        """Waiting requests, oldest first, into free rows — the row already holding the
        longest start of the prompt, else the lowest (decode spans stay short)."""
        while True:
            free = [row for row in self._rows if row.request is None]
            with self._lock:
                if not free or not self._waiting:
                    return
                request = self._waiting.popleft()
                self._busy += 1
            row = max(free, key=lambda r: (_common_prefix(r.fed, request.prompt), -r.index))
            reuse = min(_common_prefix(row.fed, request.prompt), len(request.prompt) - 1)
            del row.fed[reuse:]
            request.cached_tokens, request.state, row.request = reuse, "prefill", request
            request._decoder = StreamDecoder(self.text)
            request._stop = StopFilter(request.params.stop)

    def _prefill_chunk(self, row: _Row, size: int) -> None:
        """The next `size` tokens of one row's prompt through a batch-1 view of its memory."""
        request = row.request
        begin = len(row.fed)
        chunk = request.prompt[begin : begin + size]
        logits = self._steps.step(row.index, np.array([chunk]), np.array([begin + len(chunk)]))
        row.fed.extend(chunk)
        if len(row.fed) == len(request.prompt):
            request.state = "decode"
            self._accept(row, logits[0])

    def _decode(self, decoding: list[_Row], riding: bool = False) -> None:
        """One token for every decoding row, as one step over the span of rows they cover
        (rows in between are fed a throwaway token just past what they hold); `riding`: every
        prefilling row joins the step with its next prompt token."""
        states = ("decode", "prefill") if riding else ("decode",)
        members = [row for row in self._rows if row.request and row.request.state in states]
        first, last = members[0].index, members[-1].index
        span = self._rows[first : last + 1]
        ids, lengths = np.zeros([len(span), 1], np.int64), np.zeros([len(span)], np.int64)
        prompting = {id(row) for row in members if row.request.state == "prefill"}
        for offset, row in enumerate(span):
            if row.request and row.request.state == "decode":
                ids[offset, 0] = row.request._pending
                lengths[offset] = len(row.fed) + 1
            elif id(row) in prompting:
                ids[offset, 0] = row.request.prompt[len(row.fed)]
                lengths[offset] = len(row.fed) + 1
            else:  # free or mid-prompt: write a slot nothing reads (or the next chunk rewrites)
                del row.fed[self.max_context - 1 :]
                lengths[offset] = len(row.fed) + 1
        started = time.perf_counter()
        logits = self._steps.step(first, ids, lengths)
        for offset, row in enumerate(span):
            if id(row) in prompting:
                row.fed.append(int(ids[offset, 0]))
                if len(row.fed) == len(row.request.prompt):
                    row.request.state = "decode"
                    self._accept(row, logits[offset])
            elif row.request and row.request.state == "decode":
                row.fed.append(row.request._pending)
                self._accept(row, logits[offset])
        self.metrics.step(len(decoding), time.perf_counter() - started)

    def _accept(self, row: _Row, logits: np.ndarray) -> None:
        """Sample the row's next token and apply its stop conditions."""
        request = row.request
        seen = (
            [request.prompt + request.new]
            if request.params.sampling.repetition_penalty != 1.0
            else None
        )
        token = int(request._sampler.pick(logits[None, :], seen)[0])
        now = time.monotonic()
        if request._last_token_at is None:
            self.metrics.ttft.observe(now - request.created)
        else:
            self.metrics.itl.observe(now - request._last_token_at)
        request._last_token_at = now
        if token in self.text.eos_ids and not request.params.ignore_eos:
            return self._finish(row, "eos")
        request.new.append(token)
        request._pending = token
        text = request._stop.push(request._decoder.push(token))
        logprob = _logprob(logits, token)
        if request._stop.stopped:
            return self._finish(row, "stop", Event("done", text, token, logprob))
        if len(request.new) >= request.params.max_new_tokens:
            return self._finish(row, "length", Event("done", text, token, logprob))
        request.sink(Event("token", text, token, logprob))

    def _finish(self, row: _Row, reason: str, last: Event | None = None) -> None:
        """End the row's request; `last` is its final token, when one ended it (an eos, a
        cancellation or a timeout has none)."""
        request, row.request = row.request, None
        request.state, request.finish_reason = "done", reason
        last = last or Event("done")
        last.finish_reason = reason
        if reason != "stop":  # what the decoder and the stop filter held back
            last.text += request._stop.push(request._decoder.flush())
            last.text += request._stop.flush()
        with self._lock:
            self._busy -= 1
        self.metrics.outcome(reason, time.monotonic() - request.created)
        request.sink(last)

    def _fail_all(self, message: str, reason: str = "error") -> None:
        for row in self._rows:
            if row.request is not None:
                request, row.request = row.request, None
                row.fed.clear()  # the failed step may have left the memory half written
                request.state, request.finish_reason = "done", reason
                with self._lock:
                    self._busy -= 1
                self.metrics.outcome(reason)
                request.sink(Event("error", message))
        with self._lock:
            while self._stopping and self._waiting:
                self._waiting.popleft().sink(Event("error", message))

    def _retry_after(self) -> int:
        """Seconds until a row is likely free: a typical request's duration, at least 1."""
        return max(1, round(self.metrics.typical_request_s()))


def _common_prefix(a: list[int], b: list[int]) -> int:
    size = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:size]) != np.asarray(b[:size]))
    return int(mismatch[0]) if mismatch.size else size


def _logprob(logits: np.ndarray, token: int) -> float:
    top = float(logits.max())
    return float(logits[token]) - top - float(np.log(np.exp(logits - top).sum()))


def _session(spec, slots: int, threads: int | None, device: str):
    """The rows' session: on the CPU, or on the GPU through the CUDA provider."""
    if device == "cpu":
        return Session(spec, slots, threads)
    if device != "cuda":
        raise KvfuseError(f"device must be 'cpu' or 'cuda', not {device!r}")
    from kvfuse.runtime.device import CudaSession, open_cuda_session

    return CudaSession(spec, slots, open_cuda_session(spec, cuda_graph=False), cuda_graph=False)
