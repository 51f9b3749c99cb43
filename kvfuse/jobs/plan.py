"""MODELS.json → one `Job` per model: validated against the shipped schema, defaults merged,
each job keyed by what it reads (its source's bytes) and what it is asked (its options).

    {"defaults": {"target": "ort", "max_context": 512},
     "models": ["default", {"source": "hf/qwen2", "exporter": "dynamo"}, "models/phi.gguf"]}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from importlib import resources
from pathlib import Path

from kvfuse import __version__
from kvfuse.errors import KvfuseError

SCHEMA_FILE = "models.schema.json"
DEFAULT_OPTIONS = {
    "exporter": "optimum",
    "target": "ort",
    "quantize": None,
    "max_context": None,
    "batch_size": None,
    "logits": "last",
    "static": False,
    "prefill_len": None,
    "verify": True,
    "trust_remote_code": False,
    "genai_config": False,
    "keep_export": False,
    "optimize_options": {},
    "benchmark": {"prompt_tokens": 32, "new_tokens": 16},
    "resources": {"cpus": 1, "memory_gb": 4},
}
# options that do not change what a job produces: a different value does not redo the job
NOT_KEYED = ("resources",)


@dataclasses.dataclass(frozen=True)
class Job:
    """One model to export, optimize and benchmark, with every option filled in."""

    name: str
    source: str  # "default", or an absolute path
    options: dict
    key: str  # sha256 of the source's bytes, the keyed options and kvfuse's version

    @property
    def benchmark(self) -> dict | None:
        bench = self.options["benchmark"]
        return None if bench is False else {**DEFAULT_OPTIONS["benchmark"], **bench}


def schema() -> dict:
    """The JSON schema of MODELS.json, shipped inside the package."""
    return json.loads(resources.files("kvfuse.jobs").joinpath(SCHEMA_FILE).read_text())


def load_jobs(path: str | Path) -> list[Job]:
    """Read and check MODELS.json; one `Job` per entry of "models", in order.

    Args:
        path: the JSON file. Relative sources are read from its directory.

    Returns:
        The jobs. A malformed file raises `KvfuseError` naming the bad field's path.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise KvfuseError(f"cannot read {path}: {error.strerror}") from error
    except ValueError as error:
        raise KvfuseError(f"{path} is not JSON: {error}") from error
    check_document(document, path)
    defaults = {**DEFAULT_OPTIONS, **document.get("defaults", {})}
    jobs = [_job(entry, defaults, path.parent.resolve()) for entry in document["models"]]
    _check_unique_names(jobs, path)
    return jobs


def check_document(document, path: Path) -> None:
    """Refuse a document the schema rejects, with the JSON path of the worst field."""
    try:
        import jsonschema
    except ImportError as error:
        raise KvfuseError("optimize-many needs jsonschema: pip install 'kvfuse[jobs]'") from error
    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        where = json_path(error.absolute_path)
        raise KvfuseError(f"{path}: {where}: {error.message}; see kvfuse/jobs/{SCHEMA_FILE}")


def json_path(parts) -> str:
    """`["models", 2, "max_context"]` → `models[2].max_context` (`$` for the document)."""
    text = "$"
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.removeprefix("$.") if len(text) > 1 else text


def _job(entry: str | dict, defaults: dict, base: Path) -> Job:
    entry = {"source": entry} if isinstance(entry, str) else dict(entry)
    source = entry.pop("source")
    name = entry.pop("name", None) or default_name(source)
    options = {**defaults, **entry}
    if source != "default":
        source = str((base / source).resolve())
    keyed = {k: v for k, v in options.items() if k not in NOT_KEYED}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode())
    digest.update(f"kvfuse {__version__}\0{source}\0".encode())
    digest.update(source_digest(source).encode())
    return Job(name, source, options, digest.hexdigest())


def default_name(source: str) -> str:
    """A directory name for a source: its file or directory name, made filesystem-safe."""
    stem = Path(source.rstrip("/")).name.removesuffix(".gguf") or "model"
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:100]


def source_digest(source: str) -> str:
    """sha256 over the source's files (names and contents); "default" is pinned by kvfuse's
    version; a missing source digests as missing (its job fails and says so)."""
    if source == "default":
        return "default"
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if not file.is_file():
            digest.update(f"missing {file}".encode())
            continue
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0".encode())
        with file.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _check_unique_names(jobs: list[Job], path: Path) -> None:
    seen: dict[str, int] = {}
    for index, job in enumerate(jobs):
        if job.name in seen:
            raise KvfuseError(
                f"{path}: models[{index}]: name {job.name!r} is also models[{seen[job.name]}]'s; "
                'give one of them a distinct "name"'
            )
        seen[job.name] = index
