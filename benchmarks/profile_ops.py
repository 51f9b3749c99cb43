"""onnxruntime's profiler over decode steps, summarised by op type.

    python benchmarks/profile_ops.py MODEL.onnx [--steps 64] [--context 64] [--threads 2]

Prints the share of node time per op type for single-token decode steps after a prefill of
`--context` tokens, and the time outside nodes (session overhead). MODEL is a kvfuse-optimized
model, or an onnxruntime-genai model (a `genai_config.json` beside it: its inputs are fed as
genai's runtime feeds them, one shared past/present buffer per cache of `--max-length`
positions), so both run under the same profiler and the same harness.
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
    parser.add_argument("--max-length", type=int, default=2048, help="genai models' buffers")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_profiling = True
    options.profile_file_prefix = "/tmp/kvfuse-profile"
    if (args.model.parent / "genai_config.json").exists():
        session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
        step = genai_stepper(session, args.model, args.max_length)
    else:
        spec = read_spec(args.model)
        session = ort.InferenceSession(str(spec.path), options, providers=["CPUExecutionProvider"])
        step = kvfuse_stepper(session, spec)
    step(np.arange(args.context, dtype=np.int64)[None] + 100, args.context)
    start = time.perf_counter()
    for offset in range(args.steps):
        step(np.array([[200 + offset]], np.int64), args.context + offset + 1)
    wall = (time.perf_counter() - start) / args.steps
    trace = json.loads(Path(session.end_profiling()).read_text())
    summarise(trace, args.steps, wall)


def kvfuse_stepper(session: ort.InferenceSession, spec):
    buffers = [np.zeros(shape, np.float32) for shape in spec.buffer_shapes(1)]  # per layer
    values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in buffers]  # kept alive
    binding = session.io_binding()
    for (past, present), value in zip(spec.pairs, values, strict=True):
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(present, value)
    binding.bind_output("logits", "cpu")

    def step(ids: np.ndarray, length: int) -> None:
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("seqlens_k", np.array([length - 1], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(length, np.int32))
        session.run_with_iobinding(binding)

    step.buffers = values
    return step


def genai_stepper(session: ort.InferenceSession, model: Path, max_length: int):
    """genai's feeds with past_present_share_buffer: each past.N.key/value bound in place
    to its present, `max_length` positions, and an attention mask of the valid length."""
    config = json.loads((model.parent / "genai_config.json").read_text())
    head_size = config["model"]["decoder"]["head_size"]
    binding, values = session.io_binding(), []
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            shape = (1, value.shape[1], max_length, head_size)
            values.append(ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)))
            binding.bind_ortvalue_input(value.name, values[-1])
            present = value.name.replace("past_key_values.", "present.")
            binding.bind_ortvalue_output(present, values[-1])

    def step(ids: np.ndarray, length: int) -> None:
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, length), np.int64))
        binding.bind_output("logits", "cpu")  # logits of every new position: rebound per shape
        session.run_with_iobinding(binding)

    step.buffers = values
    return step


def summarise(trace: list[dict], steps: int, wall: float) -> None:
    runs = [e for e in trace if e.get("name") == "model_run"]
    decode_runs = runs[-steps:]
    first = decode_runs[0]["ts"]
    by_op: dict[str, float] = collections.Counter()
    by_node: dict[str, float] = collections.Counter()
    for event in trace:
        if (
            event.get("cat") == "Node"
            and event["name"].endswith("_kernel_time")
            and event["ts"] >= first
        ):
            by_op[event["args"]["op_name"]] += event["dur"]
            by_node[event["name"].removesuffix("_kernel_time")] += event["dur"]
    total_nodes = sum(by_op.values()) / steps / 1e3
    run_time = sum(e["dur"] for e in decode_runs) / steps / 1e3
    print(
        f"decode step: {wall * 1e3:.2f} ms wall, {run_time:.2f} ms in model_run, "
        f"{total_nodes:.2f} ms in kernels ({1 / wall:.1f} tokens/s)"
    )
    for op, micros in sorted(by_op.items(), key=lambda kv: -kv[1]):
        share = micros / steps / 1e3
        print(f"  {op:36s} {share:7.3f} ms/step  {share / total_nodes:6.1%}")
    print("largest nodes (the LM head is one of them):")
    for name, micros in by_node.most_common(3):
        print(f"  {name:56s} {micros / steps / 1e3:7.3f} ms/step")


if __name__ == "__main__":
    main()
