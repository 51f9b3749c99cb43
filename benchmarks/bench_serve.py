"""`kvfuse serve` under load, on loopback: continuous batching against one request at a time.

For each model (an optimized `.onnx` or its directory; `LABEL=PATH` names it), a server is
started as its own process (`python -m kvfuse serve`, `--slots 16`) and driven by asyncio
clients over TGI's /generate_stream (one SSE event per token, so every token is timed):

1.-2. for 1, 4, 8 and 16 streams: the same requests (2 per stream) one at a time, then by
   that many concurrent clients: decode tok/s while every stream decodes, output tok/s (all
   tokens over the wall time), p50/p99 time to first token and inter-token latency; the
   one-at-a-time runs' median inter-token latency is the single-stream baseline;
3. 8 streams decoding while another client keeps admitting 512-token prompts: their p99
   inter-token latency against the single-stream median;
4. 1,000 short requests by 16 clients, 10% of them dropped mid-stream: afterwards /metrics
   must show no active row and an empty queue (no row leaked).

Every scenario is bounded by --time-limit (no new request after it; the row says so). The
table replaces this script's section of benchmarks/RESULTS.md (--no-write to only print).

    python benchmarks/bench_serve.py --model fp32=/tmp/smol/model.onnx [--model int4=...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SECTION = "<!-- section: bench_serve -->"


def main() -> None:
    args = _arguments()
    rows = []
    for label, path in args.model:
        profile = _profile(path, args)  # before the server starts: alone on the machine
        with _Server(path, args) as server:
            rows.append(asyncio.run(_measure(label, server, args)) | {"profile": profile})
    lines = _table(rows, args)
    print("\n".join(lines))
    if not args.no_write:
        _write_section(ROOT / "benchmarks" / "RESULTS.md", lines)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, type=_labelled)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--chunk-while-decoding", type=int, default=16)
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--long-prompt-tokens", type=int, default=512)
    parser.add_argument("--leak-requests", type=int, default=1000)
    parser.add_argument("--leak-new-tokens", type=int, default=16)
    parser.add_argument("--disconnect-fraction", type=float, default=0.1)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per scenario")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--note", default="", help="a line to print above the tables")
    return parser.parse_args()


def _labelled(text: str) -> tuple[str, Path]:
    label, _, path = text.rpartition("=")
    path = Path(path)
    return label or (path.parent.name if path.suffix == ".onnx" else path.name), path


class _Server:
    """`kvfuse serve` in its own process on a free loopback port."""

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable, "-m", "kvfuse", "serve", str(model), "--port", str(self.port),
            "--slots", str(args.slots), "--max-queue", str(args.leak_requests),
            "--threads", str(args.threads), "--prefill-chunk", str(args.prefill_chunk),
            "--chunk-while-decoding", str(args.chunk_while_decoding),
        ]  # fmt: skip
        self.model = model

    def __enter__(self) -> _Server:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            self.command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.info = httpx.get(self.url + "/info").json()
                    return self
            except httpx.HTTPError:
                time.sleep(0.5)
            if self.process.poll() is not None:
                break
        self.process.kill()
        raise SystemExit(f"the server for {self.model} did not start: {' '.join(self.command)}")

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def metrics(self) -> dict[str, float]:
        samples = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(("kvfuse_", "process_resident_memory_bytes")):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples


class _Record:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.input_length = 0


async def _stream(http, inputs: str, new_tokens: int, drop_after: int | None = None) -> _Record:
    """One /generate_stream request; returns its token arrival times."""
    record = _Record()
    body = {"inputs": inputs, "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True}}
    async with http.stream("POST", "/generate_stream", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            record.times.append(time.perf_counter())
            if event.get("details"):
                record.input_length = event["details"]["input_length"]
            if drop_after is not None and len(record.times) >= drop_after:
                break  # leaving the `async with` closes the connection: a disconnect
    return record


async def _clients(url, streams, jobs, deadline, new_tokens) -> tuple[list[_Record], float]:
    """`streams` clients take prompts from `jobs` until none is left or the deadline passed."""
    queue = list(jobs)
    records: list[_Record] = []
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:

        async def client():
            while queue and time.monotonic() < deadline:
                inputs, drop = queue.pop()
                records.append(await _stream(http, inputs, new_tokens, drop))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(streams)))
        return records, time.perf_counter() - started


def _stats(records: list[_Record], wall: float, clients: int = 1) -> dict:
    ttft = [r.times[0] - r.start for r in records if r.times]
    gaps = [b - a for r in records for a, b in zip(r.times, r.times[1:], strict=False)]
    tokens = sum(len(r.times) for r in records)
    return {
        "requests": len(records),
        "tok_s": tokens / wall if wall else 0.0,
        "decode_tok_s": _decode_rate(records, clients),
        "ttft_p50": _pct(ttft, 50),
        "ttft_p99": _pct(ttft, 99),
        "itl_p50": _pct(gaps, 50),
        "itl_p99": _pct(gaps, 99),
        "wall": wall,
    }


def _decode_rate(records: list[_Record], clients: int) -> float:
    """Tokens per second while every stream decodes. One client: its requests' tokens after
    the first over their decode time. Several: the first wave of `clients` requests (started
    together), from the moment the last of them had its first token to the moment the first
    of them ended, counting every token that arrived in between."""
    done = [r for r in records if len(r.times) > 1]
    if clients == 1:
        seconds = sum(r.times[-1] - r.times[0] for r in done)
        return sum(len(r.times) - 1 for r in done) / seconds if seconds else float("nan")
    wave = sorted(done, key=lambda r: r.start)[:clients]
    if len(wave) < clients:
        return float("nan")
    begin, end = max(r.times[0] for r in wave), min(r.times[-1] for r in wave)
    arrived = sum(begin < t <= end for r in records for t in r.times)
    return arrived / (end - begin) if end > begin else float("nan")


def _pct(values, q) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


async def _measure(label: str, server: _Server, args) -> dict:
    prompt = _prompt_of(server, args.prompt_tokens, seed=0)
    # distinct long prompts: a repeated one would be admitted from the row's cached prefix
    long_prompts = [_prompt_of(server, args.long_prompt_tokens, seed=100 + i) for i in range(64)]
    result = {"label": label, "levels": {}, "partial": []}
    await _clients(server.url, 1, [(prompt, None)], time.monotonic() + 60, 4)  # warm up
    singles = []
    for streams in [int(s) for s in args.streams.split(",")]:
        jobs = [(prompt, None)] * (streams * args.requests_per_stream)
        runs = {}
        for clients in sorted({1, streams}):  # the same requests one at a time, then at once
            deadline = time.monotonic() + args.time_limit
            records, wall = await _clients(server.url, clients, jobs, deadline, args.new_tokens)
            runs[clients] = _stats(records, wall, clients)
            if len(records) < len(jobs):
                result["partial"].append(f"{streams} streams ({clients} clients)")
            singles += records if clients == 1 else []
        result["levels"][streams] = (runs[1], runs[streams])
    result["single"] = _stats(singles, 1.0)  # its inter-token median is the baseline
    result["admission"] = await _admission(server, args, prompt, long_prompts)
    result["leak"] = await _leak(server, args)
    return result


async def _admission(server, args, prompt, long_prompts) -> dict:
    """8 decoding streams while long prompts keep arriving (one at a time, 1 token each,
    each prompt different)."""
    deadline = time.monotonic() + args.time_limit
    decoding = asyncio.ensure_future(
        _clients(server.url, 8, [(prompt, None)] * 8, deadline, 2 * args.new_tokens)
    )
    waits = []  # each long prompt's time to its first token
    async with httpx.AsyncClient(base_url=server.url, timeout=None) as http:
        while not decoding.done() and time.monotonic() < deadline:
            started = time.monotonic()
            await _stream(http, long_prompts[len(waits) % len(long_prompts)], 1)
            waits.append(time.monotonic() - started)
    records, wall = await decoding
    admit = float(np.median(waits)) if waits else float("nan")
    return {**_stats(records, wall), "admitted": len(waits), "admit_s": admit}


async def _leak(server, args) -> dict:
    """Short requests, some dropped mid-stream; then no row may be left holding a request."""
    rng = random.Random(0)
    short = _prompt_of(server, 16, seed=2)
    jobs = [
        (short, 2 if rng.random() < args.disconnect_fraction else None)
        for _ in range(args.leak_requests)
    ]
    deadline = time.monotonic() + args.time_limit
    rss_before = server.metrics().get("process_resident_memory_bytes", 0.0)
    records, wall = await _clients(server.url, 16, jobs, deadline, args.leak_new_tokens)
    await asyncio.sleep(1.0)  # a dropped stream's row is freed at the engine's next step
    samples = server.metrics()
    outcomes = {
        name.split('"')[1]: int(value)
        for name, value in samples.items()
        if name.startswith("kvfuse_requests_total{")
    }
    return {
        "requests": len(records),
        "wall": wall,
        "active_rows": int(samples.get("kvfuse_active_rows", -1)),
        "queue": int(samples.get("kvfuse_queue_length", -1)),
        "cancelled": outcomes.get("cancelled", 0),
        "rss_mb": (rss_before / 2**20, samples.get("process_resident_memory_bytes", 0) / 2**20),
        "outcomes": outcomes,
    }


def _profile(model: Path, args, repeats: int = 5) -> dict:
    """The engine's two kinds of step, timed directly on the runtime: a decode step over n
    rows, and a prompt chunk of C tokens on one row (each after 200 tokens of context, or half
    the model's context if that is shorter)."""
    from kvfuse.runtime.rows import RowSteps
    from kvfuse.runtime.session import Session
    from kvfuse.runtime.spec import read_spec

    spec = read_spec(model)
    steps = RowSteps(Session(spec, 16, args.threads))
    context = min(200, spec.max_context // 2)
    prompt = (np.arange(context + 64) % (spec.vocab_size - 16) + 8)[None]
    for row in range(16):
        steps.step(row, prompt[:, :context], np.array([context]))

    def timed(run) -> float:
        run()
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        return (time.perf_counter() - started) / repeats * 1e3

    def chunk_of(c: int) -> float:
        return timed(
            lambda: steps.step(0, prompt[:, context : context + c], np.array([context + c]))
        )

    def decode_of(n: int) -> float:
        return timed(lambda: steps.step(0, np.ones((n, 1), np.int64), np.full(n, context + 1)))

    decode = {n: decode_of(n) for n in (1, 4, 8, 16)}
    chunk = {c: chunk_of(c) for c in (4, 8, 16, 32, 64) if context + c <= spec.max_context}
    return {"decode": decode, "chunk": chunk}


def _prompt_of(server: _Server, tokens: int, seed: int) -> str:
    """A text of exactly `tokens` tokens for the served model's tokenizer."""
    from kvfuse.runtime.spec import read_spec
    from kvfuse.runtime.text import Text

    text = Text(read_spec(server.model).directory)
    words = ["river", "stone", "light", "paper", "garden", "cloud", "music", "window", "bread"]
    rng = random.Random(seed)
    long_enough = " ".join(rng.choice(words) for _ in range(2 * tokens))
    return text.decode(text.encode(long_enough, chat=False)[:tokens])


def _table(rows: list[dict], args) -> list[str]:
    lines = [
        SECTION,
        "## Serving (`benchmarks/bench_serve.py`)",
        "",
        f"`kvfuse serve` with {args.slots} slots, {args.threads} threads, prefill chunks of "
        f"{args.prefill_chunk} tokens ({args.chunk_while_decoding} while rows decode); "
        "loopback clients on /generate_stream; prompts of "
        f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens each (greedy, eos ignored), "
        f"{args.requests_per_stream} request(s) per stream. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.",
        *(["", args.note] if args.note else []),
        "",
        "Decode tok/s counts tokens while every stream is past its prompt (one at a time: each "
        "request's tokens after its first); output tok/s is all tokens over the wall time, "
        "prompts included.",
        "",
        "| model | streams | requests | one at a time: decode / output tok/s, inter-token p50 "
        "(ms) | concurrent: decode tok/s | × | output tok/s | × | TTFT p50 / p99 (ms) | "
        "inter-token p50 / p99 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for streams, (alone, together) in row["levels"].items():
            lines.append(_line(row["label"], streams, alone, together))
    lines += ["", "| model | target | measured | met |", "|---|---|---|---|"]
    for row in rows:
        lines += _targets(row)
    lines += [
        "",
        "Profile (the engine's two kinds of step, timed on the runtime alone before the server "
        "starts, after 200 tokens of context): a turn with a prompt chunk costs a decode step "
        "plus a chunk step, and a chunk of C tokens costs about a decode step over C rows "
        "(each reads all the weights).",
        "",
        "| model | decode step: rows → ms | prompt chunk: tokens → ms |",
        "|---|---|---|",
    ]
    for row in rows:
        decode, chunk = row["profile"]["decode"], row["profile"]["chunk"]
        lines.append(
            f"| {row['label']} | {', '.join(f'{n} → {v:.1f}' for n, v in decode.items())} | "
            f"{', '.join(f'{c} → {v:.1f}' for c, v in chunk.items())} |"
        )
    lines += ["", *_explain(rows, args.chunk_while_decoding)]
    partial = [f"{row['label']}: {', '.join(row['partial'])}" for row in rows if row["partial"]]
    if partial:
        lines += ["", "Stopped by --time-limit before all requests ran: " + "; ".join(partial)]
    return [*lines, ""]


def _explain(rows: list[dict], chunk: int) -> list[str]:
    """What the profile says the targets can reach: the aggregate ceiling at 8 rows is
    8 × the single stream's inter-token median / decode(8); a turn admitting a chunk of C
    tokens while 8 rows decode costs decode(8) + chunk(C), and no less than decode(8) +
    decode(1) for any chunk."""
    lines = []
    for row in rows:
        decode, chunks, single = row["profile"]["decode"], row["profile"]["chunk"], row["single"]
        if 8 not in decode or 1 not in decode:
            continue
        ceiling = 8 * single["itl_p50"] / decode[8]
        text = (
            f"- {row['label']}: 8 rows decode in {decode[8]:.1f} ms against the single stream's "
            f"{single['itl_p50']:.1f} ms per token, so 8 streams reach at most {ceiling:.2f}× "
            "its rate"
        )
        if chunk in chunks:
            turn = decode[8] + chunks[chunk]
            floor = decode[8] + decode[1]
            text += (
                f"; a turn that admits a {chunk}-token chunk costs {decode[8]:.1f} + "
                f"{chunks[chunk]:.1f} = {turn:.1f} ms = {turn / single['itl_p50']:.2f}× the "
                f"single-stream median ({single['itl_p50']:.1f} ms), and a chunk of any size at "
                f"least {floor:.1f} ms = {floor / single['itl_p50']:.2f}×"
            )
        lines.append(text + ".")
    return lines


def _line(label, streams, alone, together) -> str:
    decode = together["decode_tok_s"] / alone["decode_tok_s"]
    output = together["tok_s"] / alone["tok_s"] if alone["tok_s"] else float("nan")
    return (
        f"| {label} | {streams} | {together['requests']} | {alone['decode_tok_s']:.1f} / "
        f"{alone['tok_s']:.1f}, {alone['itl_p50']:.1f} | {together['decode_tok_s']:.1f} | "
        f"{decode:.2f}× | {together['tok_s']:.1f} | {output:.2f}× | "
        f"{together['ttft_p50']:.0f} / {together['ttft_p99']:.0f} | "
        f"{together['itl_p50']:.1f} / {together['itl_p99']:.1f} |"
    )


def _targets(row) -> list[str]:
    single, eight = row["single"], row["levels"].get(8)
    admission, leak = row["admission"], row["leak"]
    out = []
    if eight:
        ratio = eight[1]["decode_tok_s"] / eight[0]["decode_tok_s"]
        out.append(f"| {row['label']} | aggregate decode at 8 streams ≥ 4× one stream's | "
                   f"{ratio:.2f}× | {'yes' if ratio >= 4 else 'no'} |")  # fmt: skip
    bound = admission["itl_p99"] / single["itl_p50"]
    out.append(
        f"| {row['label']} | p99 inter-token at 8 streams ≤ 3× single median while "
        f"{admission['admitted']} long prompts were admitted (each in "
        f"{admission['admit_s']:.1f} s, median) | {admission['itl_p99']:.1f} ms = "
        f"{bound:.2f}× {single['itl_p50']:.1f} ms | {'yes' if bound <= 3 else 'no'} |"
    )
    leaked = leak["active_rows"] != 0 or leak["queue"] != 0
    out.append(
        f"| {row['label']} | no row leaked after {leak['requests']} requests, "
        f"{leak['cancelled']} dropped mid-stream | active rows {leak['active_rows']}, queue "
        f"{leak['queue']} ({leak['wall']:.0f} s; server RSS {leak['rss_mb'][0]:.0f} → "
        f"{leak['rss_mb'][1]:.0f} MB) | {'no' if leaked else 'yes'} |"
    )
    return out


def _write_section(path: Path, lines: list[str]) -> None:
    """Replace this script's section of RESULTS.md (from its marker to the next marker of
    another script, e.g. bench_gpu.py's, or the end), keeping everything else in place; a
    first run puts it before any other script's section."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    head, found, rest = text.partition(SECTION)
    if not found and "<!-- " in text:  # before the others' sections (bench_gpu keeps those)
        head, rest = text[: text.index("<!-- ")], text[text.index("<!-- ") :]
        tail = rest
    else:
        tail = rest[rest.index("<!-- ") :] if "<!-- " in rest else ""
    path.write_text(head.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n" + tail)


if __name__ == "__main__":
    main()
