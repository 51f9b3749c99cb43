"""Generation: tokenize → prefill → decode one token at a time → sample → stop.

prompt ─ Text.encode ─ prefill (chunks of `prefill_chunk`) ─┐
                                               ┌─ sample ◀─┘
                                               └─ decode step (1 token per row) ─ sample …
stop on eos · stop string · max_new_tokens · full context; stream text deltas as they come
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kvfuse.errors import KvfuseError
from kvfuse.runtime.sampling import Sampler, Sampling
from kvfuse.runtime.session import Session
from kvfuse.runtime.spec import read_spec
from kvfuse.runtime.text import StreamDecoder, Text

Prompt = str | list[int]


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What to generate and when to stop."""

    max_new_tokens: int = 128
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    chat: bool = True  # wrap the prompt with the model's chat template, if it has one
    on_full_context: str = "error"  # or "stop": end cleanly when the buffers are full
    # prompt tokens per step, as `kvfuse serve`: onnxruntime's GroupQueryAttention holds a
    # score scratch of heads × chunk × buffer positions (SmolLM2: 19 MB at 256, 38 MB at 512)
    prefill_chunk: int = 256
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    reuse_prefix: bool = True  # keep the KV of a prompt's prefix the last generation left


@dataclasses.dataclass
class Stats:
    prompt_tokens: list[int]
    new_tokens: list[int]
    prefill_ms: float
    decode_tokens_per_s: float
    kv_bytes: int
    reused_tokens: int = 0  # prompt tokens whose KV the previous generation left in place


@dataclasses.dataclass
class Completion:
    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]  # "eos", "stop", "length", "context"
    stats: Stats


class Generator:
    """An optimized model ready to generate; `kvfuse.load(path)` returns one."""

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        prepack: bool = False,
        device: str = "cpu",
        cuda_graph: bool = True,
        provider_options: dict | None = None,
    ) -> None:
        if device not in ("cpu", "cuda"):
            raise KvfuseError(f"device must be 'cpu' or 'cuda', not {device!r}")
        self.spec = read_spec(path)
        self.text = Text(self.spec.directory)
        self.threads, self.prepack = threads, prepack
        self.device, self.cuda_graph = device, cuda_graph
        self._sessions: dict[int, Session] = {}
        self._gpu = None  # the one CUDA InferenceSession, shared by every batch size
        if device == "cuda":
            from kvfuse.runtime.device import open_cuda_session

            self._gpu = open_cuda_session(self.spec, cuda_graph, 0, provider_options)

    def session(self, batch: int) -> Session:
        if batch not in self._sessions:
            if self._gpu is not None:
                from kvfuse.runtime.device import CudaSession

                self._sessions[batch] = CudaSession(self.spec, batch, self._gpu, self.cuda_graph)
            else:
                self._sessions[batch] = Session(self.spec, batch, self.threads, self.prepack)
        return self._sessions[batch]

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        config: GenerationConfig = GenerationConfig(),
    ) -> Completion:
        """Generate for one prompt or a batch (rows of different lengths are fine). A prompt
        is text, or a list of token ids used as they are."""
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
        run = _Run(self, [prompts] if single else list(prompts), config)
        for _ in run.steps():
            pass
        return run.completion()

    def stream(
        self, prompt: Prompt, config: GenerationConfig = GenerationConfig()
    ) -> Iterator[str]:
        """Yield text deltas of one prompt's completion as tokens arrive."""
        run = _Run(self, [prompt], config)
        yield from run.steps()
        self.last = run.completion()


class _Run:
    """One generation: the state of the loop, kept out of the Generator."""

    def __init__(self, generator: Generator, prompts: list[str], config: GenerationConfig):
        self.config, self.text = config, generator.text
        self.prompts = [
            generator.text.encode(p, config.chat) if isinstance(p, str) else list(p)
            for p in prompts
        ]
        self.max_context = generator.spec.max_context
        for ids in self.prompts:
            if not ids:
                raise KvfuseError("the prompt is empty after tokenization")
            if len(ids) >= self.max_context:
                raise KvfuseError(
                    f"the prompt has {len(ids)} tokens but the model's context holds "
                    f"{self.max_context}; shorten it or optimize with a larger --max-context"
                )
        self.session = generator.session(len(prompts))
        self.sampler = Sampler(config.sampling)
        self.new: list[list[int]] = [[] for _ in prompts]
        self.finish: list[str | None] = [None] * len(prompts)
        self.decoders = [StreamDecoder(self.text) for _ in prompts]
        self.texts = [""] * len(prompts)

    def steps(self) -> Iterator[str]:
        """The loop. Yields row 0's text deltas (for streaming)."""
        start = time.perf_counter()
        self.reused = self._reusable()
        self.session.held = []  # nothing is reusable until this generation ends
        if not self.reused:
            self.session.reset()
        logits, lengths = self._prefill(self.reused)
        fed = list(self.prompts[0]) if len(self.prompts) == 1 else None  # row 0's KV tokens
        self.prefill_ms = (time.perf_counter() - start) * 1e3
        decode_start, decoded = time.perf_counter(), 0
        on_device = self._greedy_on_device()
        picked = None
        while True:
            tokens = picked if picked is not None else self.sampler.pick(logits, self._seen())
            delta = self._accept(tokens)
            if delta:
                yield delta
            if all(self.finish):
                break
            if lengths.max() + 1 > self.max_context:
                self._context_full()
                break
            lengths = lengths + 1
            if on_device:  # the graph picks the greedy token: no logits copied back
                picked = self.session.next_tokens(tokens[:, None], lengths)
            else:
                logits = self.session.run(tokens[:, None], lengths)[:, 0]
            if fed is not None:
                fed.append(int(tokens[0]))
            decoded += 1
            if decoded == 1:
                self.session.check_in_place()  # the cache must not have moved
        self.session.held = fed or []  # what row 0 holds, for the next generation to reuse
        seconds = time.perf_counter() - decode_start
        self.decode_rate = decoded / seconds if decoded and seconds > 0 else 0.0

    def _greedy_on_device(self) -> bool:
        """Greedy decoding on a session that picks the token itself (target cuda on a GPU)."""
        sampling = self.config.sampling
        greedy = sampling.temperature == 0.0 and sampling.repetition_penalty == 1.0
        return greedy and getattr(self.session, "picks_greedy", False)

    def _seen(self) -> list[list[int]] | None:
        """Each row's tokens so far — only the repetition penalty needs them."""
        if self.config.sampling.repetition_penalty == 1.0:
            return None
        return [p + n for p, n in zip(self.prompts, self.new, strict=True)]

    def _reusable(self) -> int:
        """Prompt tokens already in the buffers: a single prompt that starts with what the
        last single-prompt generation left (a chat's next turn), on a dynamic-shape model."""
        held = self.session.held
        if not self.config.reuse_prefix or len(self.prompts) != 1 or self.session.prefill_len:
            return 0
        if not held:
            return 0
        prompt, size = self.prompts[0], min(len(held), len(self.prompts[0]) - 1)
        return next((i for i in range(size) if held[i] != prompt[i]), size)

    def _prefill(self, reused: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Fill the buffers with the prompts (past the `reused` tokens already there); returns
        each row's last logits and lengths."""
        lengths = np.array([len(p) for p in self.prompts])
        static = self.session.prefill_len  # a static prefill graph takes this many tokens
        chunk = static or self.config.prefill_chunk
        if len(self.prompts) == 1 and (lengths[0] > chunk or reused):  # chunks of `chunk`
            ids = np.array(self.prompts)
            for begin in range(reused, lengths[0], chunk):
                end = min(begin + chunk, lengths[0])
                if static:  # a full last chunk, overlapping the one before: the overlap's
                    begin = end - chunk  # positions are recomputed to the same values
                logits = self.session.run(ids[:, begin:end], np.array([end]))
            return logits[:, -1].copy(), lengths
        if static and lengths.max() > static:
            raise KvfuseError(
                f"batched prompts must fit one static prefill step of {static} tokens (the "
                f"longest has {lengths.max()}); run them one at a time or optimize with a larger "
                "--prefill-len"
            )
        # rows of different lengths: right-padded; each row's valid length bounds its keys
        padded = np.zeros((len(self.prompts), lengths.max()), np.int64)
        for row, ids in enumerate(self.prompts):
            padded[row, : len(ids)] = ids
        logits = self.session.run(padded, lengths)
        if logits.shape[1] == 1:  # the graph already picked each row's last position
            return logits[:, 0].copy(), lengths
        return logits[np.arange(len(lengths)), lengths - 1].copy(), lengths

    def _accept(self, tokens: np.ndarray) -> str:
        """Record each unfinished row's token and apply the stop conditions."""
        stream_delta = ""
        for row, token in enumerate(tokens.tolist()):
            if self.finish[row]:
                continue
            if token in self.text.eos_ids and not self.config.ignore_eos:
                self.finish[row] = "eos"
                continue
            self.new[row].append(token)
            delta = self.decoders[row].push(token)
            self.texts[row] += delta
            stop = next((s for s in self.config.stop if s in self.texts[row]), None)
            if stop is not None:
                cut = self.texts[row].index(stop)
                delta = delta[: max(0, len(delta) - (len(self.texts[row]) - cut))]
                self.texts[row] = self.texts[row][:cut]
                self.finish[row] = "stop"
            elif len(self.new[row]) >= self.config.max_new_tokens:
                self.finish[row] = "length"
            if row == 0:
                stream_delta = delta
        return stream_delta

    def _context_full(self) -> None:
        if self.config.on_full_context == "error":
            raise KvfuseError(
                f"the context of {self.max_context} positions is full after "
                f"{max(len(n) for n in self.new)} new tokens; pass a smaller max_new_tokens, "
                "choose on_full_context='stop', or optimize with a larger --max-context"
            )
        self.finish = [f or "context" for f in self.finish]

    def completion(self) -> Completion:
        stats = Stats(
            prompt_tokens=[len(p) for p in self.prompts],
            new_tokens=[len(n) for n in self.new],
            prefill_ms=self.prefill_ms,
            decode_tokens_per_s=self.decode_rate,
            kv_bytes=self.session.kv_bytes,
            reused_tokens=self.reused,
        )
        return Completion(self.texts, self.new, [f or "length" for f in self.finish], stats)


def load(
    path: str | Path,
    threads: int | None = None,
    prepack: bool = False,
    device: str = "cpu",
    cuda_graph: bool = True,
    provider_options: dict | None = None,
) -> Generator:
    """Load an optimized model (its `.onnx` or its directory) for generation.

    Args:
        path: the optimized `.onnx`, a static pair's OUT.onnx or either graph, or the directory.
        threads: onnxruntime intra-op threads (default: physical cores).
        prepack: static pair only — let each session load and pre-pack its own copy of the
            weights (faster MatMuls, one weights copy per graph) instead of sharing one copy.
        device: "cpu", or "cuda" for a `--target cuda` model on onnxruntime-gpu: KV buffers in
            device memory, decode steps replayed as a CUDA graph (one per batch size).
        cuda_graph: (device "cuda") capture and replay decode steps; False runs them eagerly.
        provider_options: (device "cuda") more CUDA provider options for onnxruntime.
    """
    return Generator(path, threads, prepack, device, cuda_graph, provider_options)
