"""onnxruntime's profiler over kvfuse decode steps, summarised by op type.

    python benchmarks/profile_ops.py MODEL.onnx [--steps 64] [--context 64] [--threads 2]

Prints the share of node time per op type for single-token decode steps after a prefill of
`--context` tokens, and the time outside nodes (session overhead).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kvfuse.runtime.spec import read_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    spec = read_spec(args.model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_profiling = True
    options.profile_file_prefix = "/tmp/kvfuse-profile"
    session = ort.InferenceSession(str(spec.path), options, providers=["CPUExecutionProvider"])
    buffers = [np.zeros(shape, np.float32) for shape in spec.buffer_shapes(1)]  # per layer
    binding = session.io_binding()
    for index, (past, present) in enumerate(spec.pairs):
        value = ort.OrtValue.ortvalue_from_numpy(buffers[index])
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(present, value)
    binding.bind_output("logits", "cpu")

    def step(ids: np.ndarray, length: int) -> None:
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("seqlens_k", np.array([length - 1], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(length, np.int32))
        session.run_with_iobinding(binding)

    step(np.arange(args.context, dtype=np.int64)[None] + 100, args.context)
    start = time.perf_counter()
    for offset in range(args.steps):
        step(np.array([[200 + offset]], np.int64), args.context + offset + 1)
    wall = (time.perf_counter() - start) / args.steps
    trace = json.loads(Path(session.end_profiling()).read_text())
    summarise(trace, args.steps, wall)


def summarise(trace: list[dict], steps: int, wall: float) -> None:
    runs = [e for e in trace if e.get("name") == "model_run"]
    decode_runs = runs[-steps:]
    first = decode_runs[0]["ts"]
    by_op: dict[str, float] = collections.Counter()
    for event in trace:
        if (
            event.get("cat") == "Node"
            and event["name"].endswith("_kernel_time")
            and event["ts"] >= first
        ):
            by_op[event["args"]["op_name"]] += event["dur"]
    total_nodes = sum(by_op.values()) / steps / 1e3
    run_time = sum(e["dur"] for e in decode_runs) / steps / 1e3
    print(
        f"decode step: {wall * 1e3:.2f} ms wall, {run_time:.2f} ms in model_run, "
        f"{total_nodes:.2f} ms in kernels ({1 / wall:.1f} tokens/s)"
    )
    for op, micros in sorted(by_op.items(), key=lambda kv: -kv[1]):
        share = micros / steps / 1e3
        print(f"  {op:36s} {share:7.3f} ms/step  {share / total_nodes:6.1%}")


if __name__ == "__main__":
    main()
