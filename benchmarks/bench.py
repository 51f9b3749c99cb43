"""Side-by-side decode/prefill benchmark of kvfuse and its peers on SmolLM2-135M (fp32, batch 1).

Each system runs in its own process (onnxruntime's spinning threads starve a neighbour), the
same thread count for all, repetitions interleaved across systems; medians are reported. Run:

    python benchmarks/bench.py [--rounds 3] [--threads 2] [--work /tmp/kvfuse-bench]

Systems: PyTorch eager `generate`; Optimum `ORTModelForCausalLM` (IOBinding); a plain
onnxruntime loop over Optimum's export; onnxruntime-genai 0.18 on a model its own builder made
from the same weights (needs a second virtualenv with transformers 5.x, see --genai-python);
kvfuse (`kvfuse.load`) for each target: `ort` (GroupQueryAttention), `onnx` (standard ops,
dynamic shapes) and `onnx --static` (a prefill graph of 128 tokens and a decode graph sharing
one weights file); and `kvfuse-genai`, kvfuse's `ort` model under onnxruntime-genai's runtime
(its C++ loop over the graph `optimize --genai-config` writes), which separates the graph's
quality from kvfuse's Python loop. Writes benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SYSTEMS = [
    "pytorch",
    "optimum",
    "plain-ort",
    "genai",
    "kvfuse",
    "kvfuse-genai",
    "kvfuse-onnx",
    "kvfuse-static",
    "kvfuse-static-prepack",
]
# kvfuse system → (model file, optimize options); every target gets the same 2048 positions
KVFUSE_MODELS = {
    "kvfuse": ("model-kvfuse.onnx", {}),
    "kvfuse-onnx": ("model-onnx.onnx", {"target": "onnx"}),
    "kvfuse-static": (
        "model-static.onnx",
        {"target": "onnx", "static": True, "prefill_len": 128, "batch_size": 1},
    ),
}
KVFUSE_MODELS["kvfuse-static-prepack"] = KVFUSE_MODELS["kvfuse-static"]  # its own copy per graph
STATIC_MARK = "model-static.kvfuse.json"  # the file a static pair lands last
KVFUSE_GENAI = "kvfuse-genai"  # genai's files for the `kvfuse` model (add_genai_files)
GENAI_DIRS = ("genai", KVFUSE_GENAI)
SHORT, LONG, NEW_SHORT, NEW_LONG, PARITY = 64, 1024, 128, 64, 32
TEXT = (
    "The history of computing is a story of people finding ways to make machines do more of "
    "the work of thinking. Early calculating devices used gears and levers; later, relays and "
    "vacuum tubes made programmable computers possible, and the transistor made them small. "
)


def prompt_ids(tokenizer, length: int) -> list[int]:
    ids = tokenizer(TEXT * 200)["input_ids"]
    return ids[:length]


# ── workers: one system per process ─────────────────────────────────────────────────────────
def worker(system: str, work: Path, threads: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "export")
    prompts = {n: prompt_ids(tokenizer, n) for n in (SHORT, 512, LONG)}
    run = RUNNERS[system](work, threads)
    result = {"system": system}
    run(prompts[SHORT], 2)  # warm-up: first-call allocations are not steady state
    for length in (SHORT, 512):
        times = [run(prompts[length], 1)[1] for _ in range(3)]
        result[f"prefill_{length}_ms"] = statistics.median(times) * 1e3
    tokens, _, rate = run(prompts[SHORT], NEW_SHORT, decode=True)
    result["decode_short_tps"], result["tokens"] = rate, tokens[:PARITY]
    result["decode_long_tps"] = run(prompts[LONG], NEW_LONG, decode=True)[2]
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss
    across exec, so a worker would inherit its (large) parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _decode_rate(stamps: list[float]) -> float:
    """Tokens/s after the first token (the first includes the prefill)."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


def torch_runner(work: Path, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    return _hf_generate(model, torch)


def optimum_runner(work: Path, threads: int):
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(
        work / "export",
        use_io_binding=True,
        session_options=options,
        provider="CPUExecutionProvider",
    )
    return _hf_generate(model, torch)


def _hf_generate(model, torch):
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.stamps, self.calls = [], 0

        def put(self, value):  # called with the prompt first, then once per new token
            self.calls += 1
            if self.calls > 1:
                self.stamps.append(time.perf_counter())

        def end(self):
            pass

    def run(ids, new, decode=False):
        clock = Clock()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                streamer=clock,
                pad_token_id=0,
            )
        tokens = out[0, len(ids) :].tolist()
        return tokens, clock.stamps[0] - start, _decode_rate(clock.stamps)

    return run


def plain_runner(work: Path, threads: int):

    from kvfuse.exporters.reference import ConcatCacheRunner

    runner = ConcatCacheRunner(work / "export" / "model.onnx", threads=threads)

    def run(ids, new, decode=False):
        start = time.perf_counter()
        logits = runner.prefill(np.array([ids]))
        tokens, stamps = [int(logits[0, -1].argmax())], [time.perf_counter()]
        for _ in range(new - 1):
            logits = runner.step(np.array([[tokens[-1]]]))
            tokens.append(int(logits[0, -1].argmax()))
            stamps.append(time.perf_counter())
        return tokens, stamps[0] - start, _decode_rate(stamps)

    return run


def genai_runner(work: Path, threads: int, directory: str = "genai"):
    import onnxruntime_genai as og

    model = og.Model(str(work / directory))

    def run(ids, new, decode=False):
        params = og.GeneratorParams(model)
        params.set_search_options(
            do_sample=False, max_length=len(ids) + new, min_length=len(ids) + new
        )
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)
        tokens, stamps = [], []
        while len(tokens) < new and not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            stamps.append(time.perf_counter())
        return tokens, stamps[0] - start, _decode_rate(stamps)

    return run


def kvfuse_runner(work: Path, threads: int, system: str = "kvfuse"):
    from kvfuse import GenerationConfig, load

    prepack = system.endswith("-prepack")
    generator = load(work / "export" / KVFUSE_MODELS[system][0], threads=threads, prepack=prepack)

    def run(ids, new, decode=False):
        config = GenerationConfig(
            max_new_tokens=new, ignore_eos=True, chat=False, prefill_chunk=2048
        )
        completion = generator.generate(ids, config)
        stats = completion.stats
        return completion.tokens[0], stats.prefill_ms / 1e3, stats.decode_tokens_per_s

    return run


RUNNERS = {
    "pytorch": torch_runner,
    "optimum": optimum_runner,
    "plain-ort": plain_runner,
    "genai": genai_runner,
    "kvfuse": kvfuse_runner,
    "kvfuse-genai": lambda work, threads: genai_runner(work, threads, KVFUSE_GENAI),
    "kvfuse-onnx": lambda work, threads: kvfuse_runner(work, threads, "kvfuse-onnx"),
    "kvfuse-static": lambda work, threads: kvfuse_runner(work, threads, "kvfuse-static"),
    "kvfuse-static-prepack": lambda work, threads: kvfuse_runner(
        work, threads, "kvfuse-static-prepack"
    ),
}


# ── orchestration ─────────────────────────────────────────────────────────────────────────
def prepare(work: Path, genai_python: str | None, wanted: list[str] | None = None) -> list[str]:
    """Export, optimize what the `wanted` systems (default: all) run, and (if a builder
    environment is given) build genai's own model."""
    from kvfuse import export, optimize
    from kvfuse.exporters import default_model
    from kvfuse.exporters.export import DEFAULT_HF_DIR
    from kvfuse.genai import add_genai_files

    wanted = wanted or SYSTEMS

    if not (work / "export" / "model.onnx").exists():
        export("default", work / "export", overwrite=True)
    hf_dir = default_model.default_gguf_path().parent / DEFAULT_HF_DIR
    if not (work / "hf").exists():
        (work / "hf").symlink_to(hf_dir)
    needed = {"kvfuse" if s == KVFUSE_GENAI else s for s in wanted}
    for file, options in dict(KVFUSE_MODELS[s] for s in needed if s in KVFUSE_MODELS).items():
        done = STATIC_MARK if options.get("static") else file
        if not (work / "export" / done).exists():
            optimize(work / "export", work / "export" / file, max_context=2048, **options)
    if KVFUSE_GENAI in wanted and not (work / KVFUSE_GENAI / "genai_config.json").exists():
        add_genai_files(work / "export" / KVFUSE_MODELS["kvfuse"][0], work / KVFUSE_GENAI)
    systems = [s for s in SYSTEMS if s != "genai" and s in wanted]
    if genai_python and not (work / "genai" / "genai_config.json").exists():
        subprocess.run(
            [
                genai_python,
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(hf_dir),
                "-o",
                str(work / "genai"),
                "-p",
                "fp32",
                "-e",
                "cpu",
                "-c",
                str(work / "genai-cache"),
            ],
            check=True,
        )
    if (work / "genai" / "genai_config.json").exists() and "genai" in wanted:
        systems.insert(min(3, len(systems)), "genai")
    return systems


def set_genai_threads(work: Path, threads: int) -> None:
    for directory in GENAI_DIRS:
        _set_threads(work / directory / "genai_config.json", threads)


def _set_threads(path: Path, threads: int) -> None:
    if path.exists():
        config = json.loads(path.read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        options["intra_op_num_threads"] = threads
        path.write_text(json.dumps(config, indent=2))


def read_bandwidth(threads: int) -> float:
    """GB/s of an fp32 GEMV over a 512 MiB weight in onnxruntime: what decode is bound by."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rows, cols = 8192, 16384
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemv",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [rows, cols]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    x = np.ones((1, rows), np.float32)
    w = np.random.default_rng(0).random((rows, cols), dtype=np.float32)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        session.run(None, {"x": x, "w": w})
        times.append(time.perf_counter() - start)
    return w.nbytes / statistics.median(times[3:]) / 1e9


def weight_bytes(work: Path) -> int:
    import onnx

    model = onnx.load(str(work / "export" / "model-kvfuse.onnx"))
    return sum(
        onnx.numpy_helper.to_array(t).nbytes
        for t in model.graph.initializer
        if not t.name.startswith("kvfuse.rotary")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kvfuse-bench"))
    parser.add_argument(
        "--genai-python",
        help="python of a venv with transformers 5.x and "
        "onnxruntime-genai, to run genai's model builder",
    )
    parser.add_argument("--worker")
    parser.add_argument("--systems", help="comma-separated subset")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.work, args.threads)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    wanted = args.systems.split(",") if args.systems else None
    systems = prepare(args.work, args.genai_python, wanted)
    set_genai_threads(args.work, args.threads)
    bandwidth = read_bandwidth(args.threads)
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for round_index in range(args.rounds):
        for system in systems if round_index % 2 == 0 else systems[::-1]:  # interleave
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    system,
                    "--work",
                    str(args.work),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                continue
            results[system].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1} {system}: {results[system][-1]}", file=sys.stderr)
    write_report(results, bandwidth, weight_bytes(args.work), args)


def write_report(results, bandwidth, weights, args) -> None:
    roofline = bandwidth * 1e9 / weights
    reference = (results.get("pytorch") or [{}])[0].get("tokens")
    rows = []
    for system, runs in results.items():
        if not runs:
            continue
        median = {
            k: statistics.median(r[k] for r in runs)
            for k in runs[0]
            if isinstance(runs[0][k], float)
        }
        same = (
            "yes"
            if runs[0]["tokens"] == reference
            else _first_mismatch(runs[0]["tokens"], reference)
        )
        rows.append((system, median, same))
    plain = next((m for s, m, _ in rows if s == "plain-ort"), None)
    lines = [
        "# Benchmark results",
        "",
        f"SmolLM2-135M-Instruct fp32, batch 1, {args.threads} threads, greedy; medians of "
        f"{args.rounds} interleaved rounds, one process per system. Machine: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}. Measured read bandwidth (onnxruntime fp32 GEMV "
        f"over 512 MiB): {bandwidth:.1f} GB/s; weights read per decoded token "
        f"{weights / 1e6:.0f} MB → roofline {roofline:.1f} tokens/s.",
        "",
        f"Prompts of {SHORT} and 512 tokens for prefill; decode of {NEW_SHORT} tokens after a "
        f"{SHORT}-token prompt (short) and {NEW_LONG} tokens after a {LONG}-token prompt (long).",
        "",
        "| system | prefill 64 (ms) | prefill 512 (ms) | decode short (tok/s) | decode long "
        "(tok/s) | long/short | vs plain ORT | of roofline | peak RSS (MB) | same greedy "
        f"tokens as PyTorch (first {PARITY}) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system, m, same in rows:
        versus = m["decode_short_tps"] / plain["decode_short_tps"] if plain else float("nan")
        lines.append(
            f"| {system} | {m['prefill_64_ms']:.0f} | {m['prefill_512_ms']:.0f} | "
            f"{m['decode_short_tps']:.1f} | {m['decode_long_tps']:.1f} | "
            f"{m['decode_long_tps'] / m['decode_short_tps']:.2f} | {versus:.2f}× | "
            f"{m['decode_short_tps'] / roofline:.0%} | {m['peak_rss_mb']:.0f} | {same} |"
        )
    out = Path(__file__).with_name("RESULTS.md")
    previous = out.read_text() if out.exists() else ""
    marks = [previous.index(mark) for mark in (GPU_MARK, "<!-- section:") if mark in previous]
    kept = previous[min(marks) :] if marks else ""  # other scripts' sections (GPU, serving)
    out.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
    print("\n".join(lines))


GPU_MARK = "<!-- gpu: benchmarks/bench_gpu.py -->"


def _first_mismatch(tokens, reference) -> str:
    if reference is None:
        return "no reference"
    pairs = enumerate(zip(tokens, reference, strict=False))
    index = next((i for i, (a, b) in pairs if a != b), None)
    return f"no (from token {index})"


if __name__ == "__main__":
    main()
