"""One model's job, run in a process of its own: export → optimize (→ quantize) → benchmark.

    DEST/<name>/  model/model.onnx (+ .kvfuse.json, tokenizer, genai files)
                  report.json · report.md · report.html     job.json (its row)   job.log

The directory is staged and renamed into place whatever happens, so DEST/<name>/job.json
exists only for a job that ran to its end (passed or failed); a failure keeps job.json and
job.log only. The job uses kvfuse's public functions (export, optimize, load) and nothing of
their insides.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import kvfuse
from kvfuse.errors import KvfuseError
from kvfuse.files import staged_directory
from kvfuse.jobs.plan import Job

ROW_FILE = "job.json"
LOG_FILE = "job.log"
MODEL_DIR = "model"
Report = Callable[[str, str], None]  # (job name, stage)


def run_job(job: Job, dest_root: Path, report: Report | None = None) -> dict:
    """Run one job into `dest_root / job.name`; never raises for the model's own failures.

    Args:
        job: the model and its options.
        dest_root: where the job's directory is written (replacing an older one).
        report: called with (job name, stage) as the job moves on.

    Returns:
        The job's row: status "ok" or "failed" (with a one-line reason), and its figures.
    """
    report = report or (lambda name, stage: None)
    row = {"name": job.name, "source": job.source, "key": job.key, "options": job.options}
    row["worker"] = {"host": socket.gethostname(), "pid": os.getpid()}
    started = time.perf_counter()
    with staged_directory(Path(dest_root) / job.name, overwrite=True) as staging:
        with _log_to(staging / LOG_FILE):
            try:
                row.update(_stages(job, staging, lambda stage: report(job.name, stage)))
                row["status"] = "ok"
            except Exception as error:  # the model's failure is its row, not the run's
                traceback.print_exc()
                row.update(status="failed", reason=one_line(error))
                _keep_only(staging, {LOG_FILE})
        row["seconds"] = {**row.get("seconds", {}), "total": time.perf_counter() - started}
        (staging / ROW_FILE).write_text(json.dumps(row, indent=2) + "\n")
    report(job.name, row["status"])
    return row


def lost_row(job: Job, dest_root: Path, reason: str) -> dict:
    """The failed row of a job whose process never reported back, written like any other."""
    row = {"name": job.name, "source": job.source, "key": job.key, "options": job.options}
    row.update(status="failed", reason=reason)
    with staged_directory(Path(dest_root) / job.name, overwrite=True) as staging:
        (staging / ROW_FILE).write_text(json.dumps(row, indent=2) + "\n")
    return row


def one_line(error: BaseException) -> str:
    """A failure as one line: kvfuse's own message, or the exception's type and first line."""
    if isinstance(error, KvfuseError):
        return str(error)
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _stages(job: Job, staging: Path, stage: Callable[[str], None]) -> dict:
    options, seconds = job.options, {}
    export_dir = staging / "export"
    clock = time.perf_counter()
    stage("export")
    kvfuse.export(
        job.source,
        export_dir,
        exporter=options["exporter"],
        trust_remote_code=options["trust_remote_code"],
        quiet=True,
    )
    seconds["export"] = time.perf_counter() - clock
    stage("quantize + optimize" if options["quantize"] else "optimize")
    clock = time.perf_counter()
    output = staging / MODEL_DIR / "model.onnx"
    result = optimize_function()(export_dir, output, **optimize_arguments(options))
    seconds["optimize"] = time.perf_counter() - clock
    stage("report")
    _write_report(export_dir / "model.onnx", result, staging / "report")
    figures = _optimize_figures(result, staging)
    if not options["keep_export"]:
        shutil.rmtree(export_dir)
    if job.benchmark is not None:
        stage("benchmark")
        clock = time.perf_counter()
        figures["benchmark"] = benchmark(staging / MODEL_DIR, **job.benchmark)
        seconds["benchmark"] = time.perf_counter() - clock
    return {**figures, "seconds": seconds}


def optimize_arguments(options: dict) -> dict:
    """The keyword arguments for `kvfuse.optimize`; an option this kvfuse's optimize does not
    take is refused with its name (e.g. quantize before quantization exists)."""
    arguments = {
        "target": options["target"],
        "max_context": options["max_context"],
        "batch_size": options["batch_size"],
        "logits": options["logits"],
        "static": options["static"],
        "prefill_len": options["prefill_len"],
        "verify_numerics": options["verify"],
        "quiet": True,
        **({"quantize": options["quantize"]} if options["quantize"] else {}),
        **({"genai_config": True} if options["genai_config"] else {}),
        **options["optimize_options"],
    }
    accepted = inspect.signature(optimize_function()).parameters
    unknown = [name for name in arguments if name not in accepted]
    if unknown:
        raise KvfuseError(
            f"this kvfuse's optimize has no option {', '.join(map(repr, unknown))}; "
            "remove it from the models file or upgrade kvfuse"
        )
    return arguments


def optimize_function():
    """`kvfuse.optimize`, the function (the package attribute may be its module)."""
    from kvfuse.optimize import optimize

    return optimize


def _write_report(source_model: Path, result, stem: Path) -> None:
    from kvfuse import report as reports
    from kvfuse.report.diff import build_report

    reports.write_all(build_report(source_model, result.output, result), stem)


def _optimize_figures(result, staging: Path) -> dict:
    verification = result.verification
    model_files = sorted((staging / MODEL_DIR).iterdir())
    return {
        "layers_fused": result.fused_layers,
        "layers": len(result.layers),
        "nodes_before": result.nodes_before,
        "nodes_after": result.nodes_after,
        "bytes": sum(p.stat().st_size for p in model_files if _is_weights_or_graph(p)),
        "verification": None
        if verification is None
        else {
            "passed": verification.passed,
            "max_abs_diff": verification.max_abs_diff,
            "tokens_equal": verification.tokens_equal,
            "summary": verification.summary(),
        },
        "model": f"{MODEL_DIR}/{result.output.name}",
        "report": {"html": "report.html", "json": "report.json", "md": "report.md"},
    }


def _is_weights_or_graph(path: Path) -> bool:
    """A file kvfuse's runtime loads (graphs, weights), not genai's copy or the tokenizer."""
    return path.suffix in (".onnx", ".weights", ".data") and not path.name.endswith(".genai.onnx")


def benchmark(model: Path, prompt_tokens: int, new_tokens: int) -> dict:
    """A short run on kvfuse's runtime: `prompt_tokens` token ids (no chat template) and
    `new_tokens` greedy tokens past any eos; prefill ms and decode tokens/s."""
    generator = kvfuse.load(model)
    vocab = generator.spec.vocab_size
    prompt = [(7 + 31 * i) % vocab for i in range(prompt_tokens)]
    config = kvfuse.GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, chat=False)
    generator.generate(prompt[:4], kvfuse.GenerationConfig(max_new_tokens=2, chat=False))  # warm
    stats = generator.generate(prompt, config).stats
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "prefill_ms": stats.prefill_ms,
        "decode_tokens_per_s": stats.decode_tokens_per_s,
        "kv_bytes": stats.kv_bytes,
    }


def _keep_only(directory: Path, names: set[str]) -> None:
    for entry in directory.iterdir():
        if entry.name not in names:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send this process's stdout/stderr (Python's and native libraries') to `path`: the job
    runs in a process of its own, and the driver's terminal shows the live progress only."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("w") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
