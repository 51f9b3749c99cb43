"""The `kvfuse` command line: export (more commands arrive with the rewriter and runtime)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from kvfuse import summaries
from kvfuse.errors import KvfuseError

app = typer.Typer(
    name="kvfuse",
    help="Export, rewrite and run ONNX LLMs with fused attention and in-place KV caches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = summaries.console


@app.callback()
def _group() -> None:
    """Export, rewrite and run ONNX LLMs with fused attention and in-place KV caches."""


@app.command()
def export(
    source: Annotated[str, typer.Argument(help="HF model directory, .gguf file, or 'default'.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to create for the ONNX export.")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT_DIR if it exists.")
    ] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow the model's own Python code to run.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no summary.")] = False,
    exporter: Annotated[
        str, typer.Option(help="optimum (TorchScript via Optimum) or dynamo (torch.onnx).")
    ] = "optimum",
    dtype: Annotated[
        str, typer.Option(help="float32, float16 or bfloat16 (bfloat16 needs --exporter dynamo).")
    ] = "float32",
) -> None:
    """Export a causal LM to ONNX with past KV (text-generation-with-past I/O)."""
    from kvfuse.exporters.export import export as run_export

    result = run_export(
        source,
        out_dir,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        quiet=quiet,
        exporter=exporter,
        dtype=dtype,
    )
    if not quiet:
        summaries.print_export_summary(result)


@app.command()
def optimize(
    source: Annotated[Path, typer.Argument(help="An .onnx file or a `kvfuse export` directory.")],
    output: Annotated[Path, typer.Argument(help="The optimized .onnx file to write.")],
    target: Annotated[
        str,
        typer.Option(
            help="'ort': onnxruntime's fused ops; 'onnx': standard ops only; 'cuda': the ort "
            "ops in half precision for onnxruntime's CUDA provider."
        ),
    ] = "ort",
    dtype: Annotated[
        str | None,
        typer.Option(help="(--target cuda) float16 (default) or bfloat16."),
    ] = None,
    max_context: Annotated[
        int | None, typer.Option(help="KV buffer length (default: min(model, 2048)).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Make the batch dim static.")] = None,
    logits: Annotated[
        str, typer.Option(help="'last': logits of each row's last position only; 'all'.")
    ] = "last",
    static: Annotated[
        bool,
        typer.Option(
            "--static",
            help="(--target onnx) Write a prefill and a decode graph with every dim fixed, "
            "sharing one weights file: OUTPUT.prefill.onnx, OUTPUT.decode.onnx, OUTPUT.weights.",
        ),
    ] = False,
    prefill_len: Annotated[
        int | None, typer.Option(help="New tokens per prefill step of --static (default 128).")
    ] = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Show every layer and each near miss.")
    ] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the numerical check (not advised).")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT.")] = False,
    report: Annotated[
        Path | None,
        typer.Option(help="Write the graph diff report as REPORT.json, .md and .html."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no summary.")] = False,
    genai_config: Annotated[
        bool,
        typer.Option(
            "--genai-config",
            help="Also write OUTPUT.genai.onnx and genai_config.json so onnxruntime-genai's "
            "own loop runs the model (target ort).",
        ),
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="Weight-only block quantization: int4, int8, or gguf (the source GGUF's own "
            "blocks, kept exactly)."
        ),
    ] = None,
    block_size: Annotated[int, typer.Option(help="--quantize: block length along K.")] = 32,
    accuracy_level: Annotated[
        int, typer.Option(help="--quantize: MatMulNBits accuracy level (4: int8 activations).")
    ] = 4,
    head: Annotated[
        str, typer.Option(help="--quantize: LM head and embedding bits: int8, int4 or float.")
    ] = "int8",
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="--quantize: keep MatMuls whose node name matches this glob in fp32."),
    ] = None,
    max_kld: Annotated[
        float,
        typer.Option(help="--quantize: refuse to write above this mean KL divergence."),
    ] = 0.5,
    force: Annotated[
        bool, typer.Option("--force", help="--quantize: write even above --max-kld.")
    ] = False,
    zero_points: Annotated[
        bool,
        typer.Option(
            "--zero-points/--symmetric",
            help="--quantize int4/int8: asymmetric blocks with a zero point each (default), or "
            "symmetric ones (MatMulNBits ~20-30% faster on x86, a little less accurate).",
        ),
    ] = True,
) -> None:
    """Fuse attention + KV cache into fixed, in-place KV buffers (GroupQueryAttention for
    --target ort; TensorScatter + Attention for --target onnx)."""
    from kvfuse.optimize import PartialFusion
    from kvfuse.optimize import optimize as run_optimize
    from kvfuse.quantization import Quantize

    quant = None
    if quantize is not None:
        quant = Quantize(
            quantize,
            block_size,
            accuracy_level,
            head,
            tuple(exclude or ()),
            max_kld,
            force,
            zero_points=zero_points,
        )

    try:
        result = run_optimize(
            source,
            output,
            target=target,
            max_context=max_context,
            batch_size=batch_size,
            logits=logits,
            static=static,
            prefill_len=prefill_len,
            dtype=dtype,
            verify_numerics=not no_verify,
            overwrite=overwrite,
            quiet=quiet,
            genai_config=genai_config,
            quantize=quant,
        )
    except PartialFusion as error:
        if explain:
            summaries.print_layers(error.result)
        if report is not None:  # why not fused, in the report too (no model was written)
            _write_optimize_report(source, None, error.result, report, quiet)
        raise
    if not quiet:
        summaries.print_optimize_summary(result, explain)
        if genai_config:
            console.print(
                f"onnxruntime-genai: {escape(str(output.parent / 'genai_config.json'))} → "
                f"{escape(output.stem)}.genai.onnx (onnxruntime_genai.Model"
                f"({escape(str(output.parent))!r}))"
            )
        if result.quantization is not None:
            from kvfuse.report.quantization import summary_lines

            for line in summary_lines(result.quantization):
                console.print(escape(line))
    if result.warning:
        console.print(f"[yellow]warning:[/yellow] {escape(result.warning)}")
    if report is not None:
        _write_optimize_report(source, result.output, result, report, quiet)


def _write_optimize_report(source: Path, output: Path | None, result, stem: Path, quiet: bool):
    """STEM.json/.md/.html for an optimize run; a partial fusion compares the input with
    itself, so the report carries the layers and their near misses."""
    from kvfuse import report as reports
    from kvfuse.report.diff import build_report

    source_model = source / "model.onnx" if source.is_dir() else source
    built = build_report(source_model, output or source_model, result)
    written = reports.write_all(built, stem)
    if not quiet:
        console.print("report: " + ", ".join(str(p) for p in written))


@app.command()
def run(
    model: Annotated[Path, typer.Argument(help="An optimized .onnx file or its directory.")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Text to answer.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Interactive chat session.")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="No chat template around the prompt.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many tokens.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    threads: Annotated[int | None, typer.Option(help="Threads (default: physical cores).")] = None,
    prepack: Annotated[
        bool,
        typer.Option(
            "--prepack",
            help="Static pair: each graph pre-packs its own copy of the weights (faster decode, "
            "twice the weight memory) instead of both sharing one copy.",
        ),
    ] = False,
    device: Annotated[
        str,
        typer.Option(help="'cpu', or 'cuda' (a --target cuda model; decode as a CUDA graph)."),
    ] = "cpu",
    cuda_graph: Annotated[
        bool, typer.Option(help="(--device cuda) Replay decode steps as a CUDA graph.")
    ] = True,
) -> None:
    """Generate with an optimized model, streaming text; prints prefill ms, decode tokens/s
    and KV memory at the end."""
    from kvfuse.runtime.generate import GenerationConfig, load
    from kvfuse.runtime.sampling import Sampling

    if prompt is None and not chat:
        raise KvfuseError("give --prompt TEXT, or --chat for an interactive session")
    generator = load(model, threads, prepack, device=device, cuda_graph=cuda_graph)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        stop=tuple(stop or ()),
        chat=not raw,
        sampling=Sampling(temperature, top_k, top_p, repetition_penalty, seed),
        on_full_context="stop",
    )
    history: list[dict] = []  # --chat: the conversation so far, re-rendered each turn
    for text in [prompt] if prompt is not None else _chat_turns():
        turn = text
        if chat and generator.text.chat_template is not None:
            history.append({"role": "user", "content": text})
            turn = generator.text.encode_conversation(history)
        for delta in generator.stream(turn, config):
            console.out(delta, end="", highlight=False)
        history.append({"role": "assistant", "content": generator.last.texts[0]})
        stats = generator.last.stats
        reused = f", {stats.reused_tokens} prompt tokens reused" if stats.reused_tokens else ""
        console.print()
        Console(stderr=True).print(
            f"[dim]prefill {stats.prefill_ms:.0f} ms ({stats.prompt_tokens[0]} tokens) · decode "
            f"{stats.decode_tokens_per_s:.1f} tokens/s ({stats.new_tokens[0]} tokens) · KV "
            f"{stats.kv_bytes / 2**20:.1f} MiB ({generator.last.finish_reasons[0]}{reused})[/dim]"
        )


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help="An optimized .onnx file or its directory.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    slots: Annotated[int, typer.Option(help="KV rows: requests generating at once.")] = 4,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a row.")] = 64,
    threads: Annotated[int | None, typer.Option(help="Threads (default: physical cores).")] = None,
    prefill_chunk: Annotated[
        int, typer.Option(help="Prompt tokens per step while no other row decodes.")
    ] = 256,
    chunk_while_decoding: Annotated[
        int,
        typer.Option(
            help="Prompt tokens per step between the other rows' decode steps (0: prompts "
            "ride along in the decode step, one token each).",
        ),
    ] = 16,
    max_new_tokens: Annotated[
        int, typer.Option(help="Default max new tokens of a request that gives none.")
    ] = 256,
    request_timeout: Annotated[
        float, typer.Option(help="End a request running longer than this many seconds.")
    ] = 600.0,
    device: Annotated[
        str, typer.Option(help="'cpu', or 'cuda' (a --target cuda model, KV in device memory).")
    ] = "cpu",
    replicas: Annotated[
        int | None,
        typer.Option(
            help="Serve on Ray Serve with N replicas, each its own engine (kvfuse\\[ray])."
        ),
    ] = None,
    autoscale: Annotated[
        tuple[int, int] | None,
        typer.Option(metavar="MIN MAX", help="Ray Serve: keep between MIN and MAX replicas."),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="[ADDRESS]",
            help="The Ray cluster for --replicas (default: a local one).",
        ),
    ] = None,
    replica_cpus: Annotated[float, typer.Option(help="CPUs Ray reserves per replica.")] = 1.0,
) -> None:
    """Serve the model over HTTP: OpenAI /v1/chat/completions, /v1/completions, /v1/models;
    TGI /generate, /generate_stream, /, /info, /health; Prometheus /metrics."""
    engine_options = dict(
        slots=slots,
        max_queue=max_queue,
        threads=threads,
        prefill_chunk=prefill_chunk,
        chunk_while_decoding=chunk_while_decoding,
        default_max_new_tokens=max_new_tokens,
        request_timeout_s=request_timeout,
        device=device,
    )
    if replicas is not None or autoscale is not None:
        from kvfuse.serve.replicas import ReplicaPlan, serve_replicas_forever

        plan = ReplicaPlan(replicas or 1, autoscale, replica_cpus, engine_options)
        address = None if ray in (None, "local") else ray
        serve_replicas_forever(model, plan, host, port, address)
        return
    try:
        from kvfuse.serve import serve_forever
    except ImportError as error:  # the server's libraries are an extra
        raise KvfuseError(
            f"kvfuse serve needs {error.name}: pip install 'kvfuse[serve]'"
        ) from error
    serve_forever(model, host, port, **engine_options)


def _chat_turns():
    """Prompts typed at the terminal, until an empty line or end of input."""
    while True:
        try:
            line = console.input("[bold]you>[/bold] ")
        except EOFError:
            return
        if not line.strip():
            return
        yield line


@app.command()
def diff(
    before: Annotated[Path, typer.Argument(help="The first ONNX model.")],
    after: Annotated[Path, typer.Argument(help="The second ONNX model.")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write .html, .json or .md instead.")
    ] = None,
) -> None:
    """Compare two ONNX models: ops, I/O, rewrites with provenance, structural changes."""
    from kvfuse import report as reports
    from kvfuse.report.diff import build_report

    built = build_report(before, after)
    if output is None:
        from rich.markdown import Markdown

        console.print(Markdown(reports.render(built, ".md")))
        return
    reports.write(built, output)
    console.print(f"report: {output}")


@app.command("optimize-many")
def optimize_many(
    models: Annotated[Path, typer.Argument(help="MODELS.json: the models and their options.")],
    out_root: Annotated[Path, typer.Argument(help="Directory for every model's results.")],
    jobs: Annotated[int, typer.Option(help="Jobs at a time on this machine.")] = 1,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="[ADDRESS]",
            help="Run each job as a Ray task: on the cluster at ADDRESS, or a local Ray "
            "cluster when no address is given (needs kvfuse[ray]).",
        ),
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Run again the models whose last run failed.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress.")] = False,
) -> None:
    """Export, optimize and benchmark many models, one isolated job each; writes
    OUT_ROOT/index.json and index.html; a rerun redoes only what changed."""
    from kvfuse.jobs.run import LOCAL, run_many

    address = LOCAL if ray is None else (None if ray == "local" else ray)
    try:
        rows = run_many(
            models, out_root, jobs=jobs, ray=address, retry_failed=retry_failed, quiet=quiet
        )
    except KeyboardInterrupt:
        Console(stderr=True).print(
            f"interrupted; finished models are kept in {escape(str(out_root))}: run the same "
            "command again to go on"
        )
        raise typer.Exit(130) from None
    ok = sum(row.get("status") == "ok" for row in rows)
    reused = sum(bool(row.get("reused")) for row in rows)
    console.print(
        f"{ok} of {len(rows)} models optimized ({reused} reused from an earlier run): "
        f"{escape(str(out_root / 'index.html'))}"
    )
    for row in rows:
        if row.get("status") != "ok":
            console.print(f"[red]{escape(row['name'])}[/red]: {escape(row.get('reason', ''))}")


def optional_value(args: list[str], option: str, bare: str) -> list[str]:
    """`option` given with no value (last, or before another option) becomes `option=bare`:
    `--ray` alone starts a local Ray cluster, `--ray ADDRESS` joins one (typer has no options
    with an optional value)."""
    return [
        f"{option}={bare}"
        if arg == option and (i + 1 == len(args) or args[i + 1][:1] == "-")
        else arg
        for i, arg in enumerate(args)
    ]


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit status 1."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.argv[1:] = optional_value(sys.argv[1:], "--ray", "local")
    try:
        app()
    except KvfuseError as error:
        Console(stderr=True).print(
            f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True
        )
        sys.exit(1)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; nothing was written")
        sys.exit(130)
