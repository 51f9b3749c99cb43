"""What one optimize call was asked for: the request checked (each refusal one line naming the
option and what to give instead) and its defaults filled in, before any model is read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kvfuse import quantization
from kvfuse.errors import KvfuseError
from kvfuse.model_files import resolve_input
from kvfuse.patterns import targets

DEFAULT_MAX_CONTEXT = 2048
DEFAULT_PREFILL_LEN = 128


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one optimize call was asked for, checked and with its defaults filled in."""

    model_path: Path
    export_info: dict | None
    output: Path
    target: str
    max_context: int
    batch_size: int | None
    logits: str
    static: bool
    prefill_len: int | None
    quant: quantization.Quantize | None = None
    dtype: str | None = None


def make_plan(source, output, target, max_context, batch_size, logits, static, prefill_len) -> Plan:
    if logits not in ("last", "all"):
        raise KvfuseError(f"logits must be 'last' or 'all', not {logits!r}")
    if target not in targets.TARGETS:
        choices = ", ".join(targets.TARGETS)
        raise KvfuseError(f"unknown target {target!r}; choose one of {choices}")
    model_path, export_info = resolve_input(Path(source))
    output = Path(output)
    if output.suffix != ".onnx":
        raise KvfuseError(f"output {output} must be an .onnx file path")
    max_context = _check_context(max_context, export_info) or _default_context(export_info)
    if static:
        batch_size = batch_size or 1
        prefill_len = _check_static_request(target, prefill_len, max_context)
    return Plan(
        model_path,
        export_info,
        output,
        target,
        max_context,
        batch_size,
        logits,
        static,
        prefill_len,
    )


def check_dtype(target: str, dtype: str | None) -> str | None:
    default = targets.TARGETS[target].dtype
    if dtype is None:
        return default
    if default is None:
        raise KvfuseError(f"--dtype is for half-precision targets (cuda), not {target!r}")
    if dtype not in ("float16", "bfloat16"):
        raise KvfuseError(f"--dtype must be float16 or bfloat16, not {dtype!r}")
    return dtype


def _check_static_request(target: str, prefill_len: int | None, max_context: int) -> int:
    if target != "onnx":
        raise KvfuseError("--static needs --target onnx (standard ops with static shapes)")
    prefill_len = prefill_len or min(DEFAULT_PREFILL_LEN, max_context)
    if not 1 < prefill_len <= max_context:
        raise KvfuseError(
            f"--prefill-len {prefill_len} must be between 2 and --max-context ({max_context})"
        )
    return prefill_len


def _check_context(max_context: int | None, export_info: dict | None) -> int | None:
    """--max-context may go up to the model's own limit (its max positions), not past it."""
    if max_context is None:
        return None
    positions = (export_info or {}).get("model", {}).get("max_positions")
    if max_context < 2:
        raise KvfuseError(f"--max-context {max_context} must be at least 2 positions")
    if positions and max_context > positions:
        raise KvfuseError(
            f"--max-context {max_context} is past the model's own limit of {positions} "
            f"positions (max_position_embeddings); give at most {positions}"
        )
    return max_context


def _default_context(export_info: dict | None) -> int:
    positions = (export_info or {}).get("model", {}).get("max_positions")
    return min(positions, DEFAULT_MAX_CONTEXT) if positions else DEFAULT_MAX_CONTEXT


def check_genai_request(plan: Plan) -> None:
    if plan.target != "ort" or plan.static:
        raise KvfuseError(
            "--genai-config needs --target ort without --static (onnxruntime-genai runs "
            "GroupQueryAttention graphs)"
        )
    if not (plan.export_info or {}).get("model"):
        raise KvfuseError(
            f"--genai-config needs the export's kvfuse-export.json beside {plan.model_path}; "
            "optimize a `kvfuse export` directory"
        )
