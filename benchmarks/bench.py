"""Side-by-side decode/prefill benchmark of kvfuse and its peers on SmolLM2-135M (fp32, batch 1).

Each system runs in its own process (onnxruntime's spinning threads starve a neighbour), the
same thread count for all, repetitions interleaved across systems; medians are reported. Run:

    python benchmarks/bench.py [--rounds 3] [--threads 2] [--work /tmp/kvfuse-bench]

Systems: PyTorch eager `generate`; Optimum `ORTModelForCausalLM` (IOBinding); a plain
onnxruntime loop over Optimum's export; onnxruntime-genai 0.18 on a model its own builder made
from the same weights (needs a second virtualenv with transformers 5.x, see --genai-python);
kvfuse (`kvfuse.load`) for each target: `ort` (GroupQueryAttention), `onnx` (standard ops,
dynamic shapes) and `onnx --static` (a prefill graph of 128 tokens and a decode graph sharing
one weights file); `kvfuse-genai`, kvfuse's `ort` model under onnxruntime-genai's runtime (its
C++ loop over the graph `optimize --genai-config` writes), which separates the graph's quality
from kvfuse's Python loop. Quantized rows: kvfuse `--quantize int4`, `gguf` (the GGUF's own blocks)
and `int8`, int4 in genai's bits (`--symmetric --head int4`) and `--symmetric`, beside genai's
int4 model (its builder's defaults) and genai int4 with an 8-bit LM head; each quantized row
also gets its quality against the same fp32 reference (Optimum's export), teacher-forced over
2,048 tokens of `pydoc_data.topics` (`--quality` worker), a same-run table against genai int4,
and decode profiles by op type of kvfuse int4 and genai int4 (profile_ops.py). Every runtime
holds its own tokenizer, as a process generating text does. Raw results go to WORK/results.json
before the report (`--report-from` re-makes the report from it). Writes benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib
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
    "genai-int4",
    "genai-int4-head8",
    "kvfuse",
    "kvfuse-genai",
    "kvfuse-int4",
    "kvfuse-int4-head4",
    "kvfuse-int4-sym",
    "kvfuse-gguf",
    "kvfuse-int8",
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
for _mode in ("int4", "gguf", "int8"):
    KVFUSE_MODELS[f"kvfuse-{_mode}"] = (f"model-{_mode}.onnx", {"quantize": _mode})
# int4 in genai's bits (symmetric blocks, an int4 head), and symmetric blocks (--symmetric)
# (a dict: kvfuse.quantization.Quantize's fields, made into one when the model is built)
KVFUSE_MODELS["kvfuse-int4-head4"] = (
    "model-int4-head4.onnx",
    {"quantize": {"mode": "int4", "head": "int4", "zero_points": False}},
)
KVFUSE_MODELS["kvfuse-int4-sym"] = (
    "model-int4-sym.onnx",
    {"quantize": {"mode": "int4", "zero_points": False}},
)
# genai system → builder arguments (precision and extra options)
GENAI_MODELS = {
    "genai": ["-p", "fp32"],
    "genai-int4": ["-p", "int4"],
    "genai-int4-head8": [
        "-p",
        "int4",
        "--extra_options",
        "algo_config=rtn",
        "matmul_mixed_precision=last_matmul:int8",
    ],
}
CONTEXT = 2048  # KV positions of every ONNX row (kvfuse's --max-context, genai's max_length)
KVFUSE_GENAI = "kvfuse-genai"  # genai's files for the `kvfuse` model (add_genai_files)
QUANTIZED = [
    "genai-int4",
    "genai-int4-head8",
    "kvfuse-int4",
    "kvfuse-int4-head4",
    "kvfuse-int4-sym",
    "kvfuse-gguf",
    "kvfuse-int8",
]
QUALITY_TOKENS, QUALITY_WINDOW = 2048, 512
STATIC_MARK = "model-static.kvfuse.json"  # the file a static pair lands last
SHORT, LONG, NEW_SHORT, NEW_LONG, PARITY = 64, 1024, 128, 64, 32
TEXT = (
    "The history of computing is a story of people finding ways to make machines do more of "
    "the work of thinking. Early calculating devices used gears and levers; later, relays and "
    "vacuum tubes made programmable computers possible, and the transistor made them small. "
)


def prompt_ids(tokenizer, length: int) -> list[int]:
    return tokenizer.encode(TEXT * 200).ids[:length]


# ── workers: one system per process ─────────────────────────────────────────────────────────
def worker(system: str, work: Path, threads: int) -> dict:
    # the tokenizers library, not transformers (which imports torch: ~300 MB of every
    # worker's peak RSS that no runtime needs)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(work / "export" / "tokenizer.json"))
    prompts = {n: prompt_ids(tokenizer, n) for n in (SHORT, 512, LONG)}
    runtime = "genai" if system == KVFUSE_GENAI else system.split("-")[0]
    for module in RUNTIME_MODULES[runtime]:
        importlib.import_module(module)
    baseline = rss_mb()  # the runtime imported, no model loaded yet
    run = RUNNERS[system](work, threads)
    result = {"system": system, "baseline_rss_mb": baseline}
    run(prompts[SHORT], 2)  # warm-up: first-call allocations are not steady state
    for length in (SHORT, 512):
        times = [run(prompts[length], 1)[1] for _ in range(3)]
        result[f"prefill_{length}_ms"] = statistics.median(times) * 1e3
    tokens, _, rate = run(prompts[SHORT], NEW_SHORT, decode=True)
    result["decode_short_tps"], result["tokens"] = rate, tokens[:PARITY]
    result["decode_long_tps"] = run(prompts[LONG], NEW_LONG, decode=True)[2]
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# what each system's process imports before it loads a model (its runtime's baseline RSS)
RUNTIME_MODULES = {
    "pytorch": ["torch", "transformers"],
    "optimum": ["torch", "optimum.onnxruntime"],
    "plain": ["onnxruntime", "kvfuse.exporters.reference"],
    "genai": ["onnxruntime_genai"],
    "kvfuse": ["kvfuse.runtime.generate"],
}


def rss_mb() -> float:
    """This process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


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


def genai_runner(work: Path, threads: int, system: str = "genai"):
    import onnxruntime_genai as og

    model = og.Model(str(work / system))
    # held as kvfuse.load holds its tokenizer (and a process generating text holds one): the
    # prompts are token ids, but peak RSS compares the runtimes as they are used
    tokenizer = og.Tokenizer(model)

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

    run.tokenizer = tokenizer  # alive as long as the runner
    return run


def kvfuse_runner(work: Path, threads: int, system: str = "kvfuse"):
    from kvfuse import GenerationConfig, load

    prepack = system.endswith("-prepack")
    generator = load(work / "export" / KVFUSE_MODELS[system][0], threads=threads, prepack=prepack)

    def run(ids, new, decode=False):
        config = GenerationConfig(
            max_new_tokens=new,
            ignore_eos=True,
            chat=False,
            reuse_prefix=False,  # every prefill measured from an empty cache
            # prefill_chunk: the runtime's default (256), as a user runs it
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
    KVFUSE_GENAI: lambda work, threads: genai_runner(work, threads, KVFUSE_GENAI),
    "genai-int4": lambda work, threads: genai_runner(work, threads, "genai-int4"),
    "genai-int4-head8": lambda work, threads: genai_runner(work, threads, "genai-int4-head8"),
    "kvfuse": kvfuse_runner,
    **{
        f"kvfuse-{mode}": (lambda m: lambda work, threads: kvfuse_runner(work, threads, m))(
            f"kvfuse-{mode}"
        )
        for mode in ("int4", "int4-head4", "int4-sym", "gguf", "int8")
    },
    "kvfuse-onnx": lambda work, threads: kvfuse_runner(work, threads, "kvfuse-onnx"),
    "kvfuse-static": lambda work, threads: kvfuse_runner(work, threads, "kvfuse-static"),
    "kvfuse-static-prepack": lambda work, threads: kvfuse_runner(
        work, threads, "kvfuse-static-prepack"
    ),
}


# ── orchestration ─────────────────────────────────────────────────────────────────────────
def prepare(work: Path, genai_python: str | None, wanted: list[str] = SYSTEMS) -> list[str]:
    """Export, optimize and (if a builder environment is given) build the genai models that
    the `wanted` systems need; returns the systems that can run."""
    from kvfuse import export, optimize
    from kvfuse.exporters import default_model
    from kvfuse.exporters.export import DEFAULT_HF_DIR
    from kvfuse.genai import add_genai_files
    from kvfuse.quantization import Quantize

    if not (work / "export" / "model.onnx").exists():
        export("default", work / "export", overwrite=True)
    hf_dir = default_model.default_gguf_path().parent / DEFAULT_HF_DIR
    if not (work / "hf").exists():
        (work / "hf").symlink_to(hf_dir)
    for system, (file, options) in KVFUSE_MODELS.items():
        done = STATIC_MARK if options.get("static") else file
        needed = system in wanted or (system == "kvfuse" and KVFUSE_GENAI in wanted)
        if needed and not (work / "export" / done).exists():
            if isinstance(options.get("quantize"), dict):
                options = {**options, "quantize": Quantize(**options["quantize"])}
            optimize(work / "export", work / "export" / file, max_context=CONTEXT, **options)
    if KVFUSE_GENAI in wanted and not (work / KVFUSE_GENAI / "genai_config.json").exists():
        add_genai_files(work / "export" / KVFUSE_MODELS["kvfuse"][0], work / KVFUSE_GENAI)
    for system, arguments in GENAI_MODELS.items():
        built = (work / system / "genai_config.json").exists()
        if genai_python and system in wanted and not built:
            build = [genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir)]
            build += ["-o", str(work / system), "-e", "cpu", "-c", str(work / "genai-cache")]
            subprocess.run(build + arguments, check=True)
    return [s for s in wanted if s not in GENAI_MODELS or (work / s / "genai_config.json").exists()]


def set_genai_threads(work: Path, threads: int) -> None:
    """The same threads as every other row, and the same context as kvfuse's models: genai
    shares one past/present buffer of `search.max_length` positions (its builder writes the
    model's 8,192, which would be 4× the KV memory of kvfuse's 2,048)."""
    for system in [*GENAI_MODELS, KVFUSE_GENAI]:
        _set_threads(work / system / "genai_config.json", threads)


def _set_threads(path: Path, threads: int) -> None:
    if path.exists():
        config = json.loads(path.read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        options["intra_op_num_threads"] = threads
        config["search"]["max_length"] = CONTEXT
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


def model_bytes(work: Path, system: str) -> int:
    """Bytes on disk of what a system loads (graphs and weights files)."""
    if system in GENAI_MODELS or system == KVFUSE_GENAI:
        files = [f for f in (work / system).iterdir() if f.suffix in (".onnx", ".data")]
    elif system in KVFUSE_MODELS:
        stem = KVFUSE_MODELS[system][0].removesuffix(".onnx")
        files = [f for f in (work / "export").glob(f"{stem}.*") if f.suffix != ".json"]
    elif system == "pytorch":
        files = list((work / "hf").glob("*.safetensors"))
    else:
        files = [work / "export" / "model.onnx"]
    return sum(f.stat().st_size for f in files)


def quality_worker(system: str, work: Path, threads: int, tokens: int = QUALITY_TOKENS) -> dict:
    """KLD etc. of a quantized system against Optimum's fp32 export, on the same tokens."""
    from tokenizers import Tokenizer

    from kvfuse.exporters.reference import ConcatCacheRunner
    from kvfuse.rewriter import quality
    from kvfuse.rewriter.verify import FixedCacheRunner, _session

    text = quality.reference_text()[1]
    tokenizer = Tokenizer.from_file(str(work / "export" / "tokenizer.json"))
    ids = tokenizer.encode(text).ids[:tokens]
    reference = ConcatCacheRunner(work / "export" / "model.onnx", threads=threads)
    if system in GENAI_MODELS:
        facts = json.loads((work / "export" / "kvfuse-export.json").read_text())["model"]

        class GenaiCache(ConcatCacheRunner):
            """genai names its head dim `kv_cache_dim` (symbolic): an empty past [B, Hkv, 0, D]."""

            def _empty_past(self, name, batch):
                heads = self.inputs[name].shape[1]
                return np.zeros([batch, heads, 0, facts["head_dim"]], np.float32)

        candidate = GenaiCache(work / system / "model.onnx", threads=threads)
    else:
        file = work / "export" / KVFUSE_MODELS[system][0]
        sidecar = json.loads(file.with_suffix(".kvfuse.json").read_text())
        pairs = [(p["past"], p["present"]) for p in sidecar["kv_pairs"]]
        shape = [1, sidecar["kv_heads"], sidecar["max_context"], sidecar["head_dim"]]
        graph = quality.all_position_logits(file.read_bytes())  # weights: OUT.onnx.data
        session = _session(graph, data_folder=file.parent, optimized=True)
        candidate = FixedCacheRunner(session, pairs, shape, optimized=True)
    figures = quality.compare(reference, candidate, ids, QUALITY_WINDOW, greedy_steps=32)
    result = {"system": system, **{k: v for k, v in vars(figures).items() if k != "mismatches"}}
    result["mismatch_margins"] = [round(m.margin, 3) for m in figures.mismatches]
    del result["kld_by_position"]
    return result


def weight_bytes(work: Path) -> int:
    """Bytes of the fp32 weights a decode step reads, from the dims (the data is not loaded:
    onnx refuses a hard-linked data file, which kvfuse-genai's directory shares)."""
    import onnx

    path = work / "export" / "model-kvfuse.onnx"
    path = path if path.exists() else work / "export" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    return sum(
        int(np.prod(t.dims, dtype=np.int64))
        * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
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
    parser.add_argument("--quality", help="(internal) measure one quantized system's quality")
    parser.add_argument("--quality-tokens", type=int, default=QUALITY_TOKENS)
    parser.add_argument("--systems", help="comma-separated subset")
    parser.add_argument(
        "--report-from",
        type=Path,
        help="a results.json an earlier run saved: measure quality and profiles, write the report",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.work, args.threads)))
        return
    if args.quality:
        figures = quality_worker(args.quality, args.work, args.threads, args.quality_tokens)
        print(json.dumps(figures))
        return
    if args.report_from:
        raw = json.loads(args.report_from.read_text())
        args.rounds = raw["rounds"]
        report(args, list(raw["results"]), raw["results"], raw["bandwidth"])
        return
    args.work.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in SYSTEMS if not args.systems or s in args.systems.split(",")]
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
    raw = {"results": results, "bandwidth": bandwidth, "rounds": args.rounds}
    (args.work / "results.json").write_text(json.dumps(raw))  # a crash after here loses nothing
    report(args, systems, results, bandwidth)


def report(args, systems: list[str], results: dict, bandwidth: float) -> None:
    """Quality of the quantized rows, decode profiles and model sizes, then RESULTS.md."""
    qualities = {}
    for system in [s for s in systems if s in QUANTIZED]:
        done = _run_self(["--quality", system], args)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            continue
        qualities[system] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"quality {system}: {qualities[system]}", file=sys.stderr)
    profiles = {system: profile(args.work, system, args.threads) for system in systems}
    sizes = {system: model_bytes(args.work, system) for system in systems}
    write_report(results, bandwidth, weight_bytes(args.work), args, sizes, qualities, profiles)


PROFILED = ["kvfuse-int4", "kvfuse-int4-head4", "genai-int4"]  # decode time by op type


def profile(work: Path, system: str, threads: int) -> str | None:
    """onnxruntime's profiler over 32 decode steps of a PROFILED system's graph
    (benchmarks/profile_ops.py, its own process), as text; None for other systems."""
    if system not in PROFILED:
        return None
    if system in KVFUSE_MODELS:
        model = work / "export" / KVFUSE_MODELS[system][0]
    else:
        model = work / system / "model.onnx"
    script = Path(__file__).with_name("profile_ops.py")
    command = [sys.executable, str(script), str(model), "--steps", "32"]
    done = subprocess.run(command + ["--threads", str(threads)], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return done.stdout.strip()


def _run_self(arguments: list[str], args) -> subprocess.CompletedProcess:
    command = [sys.executable, __file__, *arguments, "--work", str(args.work)]
    command += ["--threads", str(args.threads), "--quality-tokens", str(args.quality_tokens)]
    return subprocess.run(command, capture_output=True, text=True)


def write_report(
    results, bandwidth, weights, args, sizes=None, qualities=None, profiles=None
) -> None:
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
        "(tok/s) | long/short | vs plain ORT | of roofline | peak RSS (MB) | peak RSS above "
        "the runtime's import (MB) | model (MB) | same greedy tokens as PyTorch "
        f"(first {PARITY}) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system, m, same in rows:
        versus = m["decode_short_tps"] / plain["decode_short_tps"] if plain else float("nan")
        lines.append(
            f"| {system} | {m['prefill_64_ms']:.0f} | {m['prefill_512_ms']:.0f} | "
            f"{m['decode_short_tps']:.1f} | {m['decode_long_tps']:.1f} | "
            f"{m['decode_long_tps'] / m['decode_short_tps']:.2f} | {versus:.2f}× | "
            f"{m['decode_short_tps'] / roofline:.0%} | {m['peak_rss_mb']:.0f} | "
            f"{m['peak_rss_mb'] - m['baseline_rss_mb']:.0f} | "
            f"{(sizes or {}).get(system, 0) / 1e6:.0f} | {same} |"
        )
    lines += _quality_table(qualities or {})
    lines += _targets({system: m for system, m, _ in rows}, qualities or {})
    lines += _profiles(profiles or {})
    out = Path(__file__).with_name("RESULTS.md")
    previous = out.read_text() if out.exists() else ""
    marks = [previous.index(m) for m in (SECTION_MARK, GPU_MARK) if m in previous]
    others = previous[min(marks) :] if marks else ""  # other scripts' sections (serving, GPU)
    out.write_text("\n".join(lines) + "\n" + ("\n" + others if others else ""))
    print("\n".join(lines))


def _quality_table(qualities: dict) -> list[str]:
    """Quality of each quantized row against the same fp32 reference (Optimum's export)."""
    if not qualities:
        return []
    tokens = next(iter(qualities.values()))["tokens"]
    lines = [
        "",
        f"Quality against the fp32 export, teacher-forced over {tokens} tokens of "
        f"pydoc_data.topics in windows of {QUALITY_WINDOW}; greedy: 32 tokens after the text's "
        "first 32, the fp32 model choosing, with the fp32 logit margin at each mismatch.",
        "",
        "| system | KLD mean | KLD 99.9% | same top-1 | perplexity fp32 → quantized | greedy "
        "equal | mismatch margins |",
        "|---|---|---|---|---|---|---|",
    ]
    for system, q in qualities.items():
        lines.append(
            f"| {system} | {q['kld_mean']:.4f} | {q['kld_p999']:.4f} | "
            f"{100 * q['same_top1']:.1f}% | {q['perplexity_original']:.3f} → "
            f"{q['perplexity_quantized']:.3f} | {q['greedy_equal']}/{q['greedy_steps']} | "
            f"{', '.join(map(str, q['mismatch_margins'])) or '—'} |"
        )
    return lines


def _targets(medians: dict, qualities: dict) -> list[str]:
    """Each quantized kvfuse row against genai int4 (its builder's defaults), in this run."""
    genai = medians.get("genai-int4")
    if genai is None:
        return []
    lines = [
        "",
        "Against `genai-int4` in this run (decode after 64 / 1,024 tokens, prefill of 512 "
        "tokens: > 1 is faster; peak RSS: < 1 is less; KLD: lower is better):",
        "",
        "| system | decode short | decode long | prefill 512 | peak RSS | KLD mean |",
        "|---|---|---|---|---|---|",
    ]
    base_kld = qualities.get("genai-int4", {}).get("kld_mean")
    for system, m in medians.items():
        if not system.startswith("kvfuse-int") and system != "kvfuse-gguf":
            continue
        kld = qualities.get(system, {}).get("kld_mean")
        kld_text = f"{kld:.4f} vs {base_kld:.4f}" if kld is not None and base_kld else "—"
        lines.append(
            f"| {system} | {m['decode_short_tps'] / genai['decode_short_tps']:.2f}× | "
            f"{m['decode_long_tps'] / genai['decode_long_tps']:.2f}× | "
            f"{genai['prefill_512_ms'] / m['prefill_512_ms']:.2f}× | "
            f"{m['peak_rss_mb'] / genai['peak_rss_mb']:.2f}× | {kld_text} |"
        )
    return lines


def _profiles(profiles: dict) -> list[str]:
    """Decode time by op type (onnxruntime's profiler: its per-node events inflate the step;
    the shares are what to compare), one block per profiled system."""
    lines = []
    for system, text in profiles.items():
        if text:
            lines += ["", f"Decode by op type, `{system}` (benchmarks/profile_ops.py):", "", "```"]
            lines += [text, "```"]
    if lines:
        lines = ["", "Where a decode step's time goes, same run:", *lines]
    return lines


GPU_MARK = "<!-- gpu: benchmarks/bench_gpu.py -->"
SECTION_MARK = "<!-- section:"  # benchmarks/bench_serve.py's section


def _first_mismatch(tokens, reference) -> str:
    if reference is None:
        return "no reference"
    pairs = enumerate(zip(tokens, reference, strict=False))
    index = next((i for i, (a, b) in pairs if a != b), None)
    return f"no (from token {index})"


if __name__ == "__main__":
    main()
