"""What onnxruntime-genai needs to run a kvfuse model with its own C++ generation loop.

genai's "decoder" model type feeds `input_ids`, an `attention_mask` int64 [batch, total]
(ones for the valid positions so far, longer by the new tokens each step), `position_ids` when
the graph has that input, and `past_key_values.%d.key|value` → `present.%d.key|value` on one
shared buffer per layer (`past_present_share_buffer`), sized from the graph's fixed
max_context. kvfuse's `ort` graph takes `seqlens_k` (valid positions − 1 per row) and
`total_sequence_length` (the batch maximum) instead, so the genai graph derives both from the
mask inside the graph, as genai's own builder does for GroupQueryAttention:

    attention_mask ─ ReduceSum(axis 1) ─ Sub 1 ─ Cast int32 ─▶ seqlens_k
                   └ Shape ─ Gather 1 ─ Cast int32 ───────────▶ total_sequence_length

Everything else is the verified kvfuse graph, unchanged (its external weights file, if it has
one, is read by both graphs). `OUT.genai.onnx` and
`genai_config.json` are written beside `OUT.onnx` and its tokenizer files, so
`onnxruntime_genai.Model(directory)` loads them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from kvfuse.errors import KvfuseError
from kvfuse.files import staged_file

CONFIG_FILE = "genai_config.json"
LENGTH_INPUTS = ("seqlens_k", "total_sequence_length")
EXPORT_FACTS = "kvfuse-export.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)


def genai_filename(output_stem: str) -> str:
    """The genai graph's file name beside `OUT.onnx`."""
    return f"{output_stem}.genai.onnx"


def genai_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a kvfuse `ort` model whose valid lengths come from an `attention_mask` input.

    Args:
        model: the optimized model (inputs `seqlens_k`, `total_sequence_length`).

    Returns:
        The same graph with `attention_mask` int64 [batch, total] in their place.
    """
    names = [i.name for i in model.graph.input]
    if not all(name in names for name in LENGTH_INPUTS):
        raise KvfuseError(
            "--genai-config needs the ort target's seqlens_k/total_sequence_length inputs; "
            "optimize with --target ort"
        )
    genai = onnx.ModelProto()
    genai.CopyFrom(model)
    graph = genai.graph
    batch = next(i for i in graph.input if i.name == "input_ids").type.tensor_type.shape.dim[0]
    kept = [i for i in graph.input if i.name not in LENGTH_INPUTS]
    mask = helper.make_tensor_value_info(
        "attention_mask",
        TensorProto.INT64,
        [batch.dim_param or batch.dim_value or "batch", "total"],
    )
    del graph.input[:]
    graph.input.extend([kept[0], mask, *kept[1:]])
    prefix = "kvfuse.genai/"
    derive = [
        helper.make_node("Constant", [], [prefix + "axis1"], value_ints=[1]),
        helper.make_node("Constant", [], [prefix + "one"], value_int=1),
        helper.make_node(
            "ReduceSum", ["attention_mask", prefix + "axis1"], [prefix + "valid"], keepdims=0
        ),
        helper.make_node("Sub", [prefix + "valid", prefix + "one"], [prefix + "last"]),
        helper.make_node("Cast", [prefix + "last"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], [prefix + "shape"], start=1, end=2),
        helper.make_node("Squeeze", [prefix + "shape"], [prefix + "total"]),
        helper.make_node(
            "Cast", [prefix + "total"], ["total_sequence_length"], to=TensorProto.INT32
        ),
    ]
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(derive + nodes)
    return genai


def genai_config(record: dict, facts: dict, graph: onnx.ModelProto, filename: str) -> dict:
    """genai_config.json for the genai graph: the "decoder" model type, its I/O names, and a
    search over the whole fixed KV buffer (max_length = max_context)."""
    model = facts.get("model") or {}
    if not model:
        raise KvfuseError(
            "--genai-config needs the export's kvfuse-export.json beside the input (layers, "
            "heads, vocab, eos); optimize a `kvfuse export` directory"
        )
    if "kv_heads" not in record or "head_dim" not in record:  # written where layers share them
        raise KvfuseError(
            "--genai-config: this model's layers differ in KV heads or head dim, and "
            "onnxruntime-genai's config takes one of each; run it with kvfuse's runtime"
        )
    inputs = {i.name for i in graph.graph.input}
    decoder_inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in inputs:
        decoder_inputs["position_ids"] = "position_ids"
    eos = model.get("eos_token_ids") or []
    context = record["max_context"]
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": model.get("bos_token_id")
            if model.get("bos_token_id") is not None
            else 1,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": eos[0] if eos else 0,
            "context_length": context,
            "vocab_size": model["vocab_size"],
            "decoder": {
                "filename": filename,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": record["head_dim"],
                "hidden_size": model["hidden_size"],
                "num_attention_heads": model["num_heads"],
                "num_hidden_layers": len(record["kv_pairs"]) // 2,
                "num_key_value_heads": record["kv_heads"],
                "inputs": {
                    **decoder_inputs,
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "early_stopping": True,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_files(model_path: Path, record: dict, facts: dict, directory: Path, stem: str):
    """Write `stem`.genai.onnx and genai_config.json into `directory`.

    Args:
        model_path: the verified kvfuse model (weights inline, or in a file beside it that
            the genai graph then reads too: external weights are not copied).
        record: its kvfuse metadata record (max_context, kv heads, head dim, KV pairs).
        facts: the export's kvfuse-export.json.
        directory: where to write (beside `model_path`, or a directory holding its weights).
        stem: OUT.onnx's stem.

    Returns:
        The names written.
    """
    graph = genai_graph(onnx.load(str(model_path), load_external_data=False))
    filename = genai_filename(stem)
    onnx.save(graph, str(directory / filename))
    config = genai_config(record, facts, graph, filename)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return [filename, CONFIG_FILE]


def _weight_files(model: onnx.ModelProto) -> set[str]:
    """The external-data files a model's initializers point at (relative to its directory)."""
    return {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }


def add_genai_files(model: str | Path, directory: str | Path | None = None) -> Path:
    """Make onnxruntime-genai's files for a model `kvfuse optimize` already wrote.

    Args:
        model: the optimized `OUT.onnx` (target ort), with its OUT.kvfuse.json and the
            export's kvfuse-export.json beside it.
        directory: where to write them (default: beside the model); the tokenizer files are
            copied there when it is another directory.

    Returns:
        The directory to give `onnxruntime_genai.Model`.
    """
    model = Path(model)
    directory = Path(directory) if directory is not None else model.parent
    try:
        record = json.loads(model.with_suffix(".kvfuse.json").read_text())
        facts = json.loads((model.parent / EXPORT_FACTS).read_text())
        weights = _weight_files(onnx.load(str(model), load_external_data=False))
    except (OSError, ValueError) as error:
        raise KvfuseError(
            f"{model} is not a kvfuse-optimized model with its records beside it ({error}); "
            "run kvfuse optimize on a `kvfuse export` directory"
        ) from error
    if record.get("target") != "ort" or record.get("static"):
        raise KvfuseError(f"{model} is not an `ort` target model; onnxruntime-genai runs those")
    with staged_file(directory / CONFIG_FILE, overwrite=True, inputs=[model]) as staging:
        write_genai_files(model, record, facts, staging, model.stem)
        if directory.resolve() != model.parent.resolve():
            for name in TOKENIZER_FILES:
                if (model.parent / name).is_file():
                    shutil.copyfile(model.parent / name, staging / name)
            for name in weights:  # the genai graph reads them by the same relative name
                _link_or_copy(model.parent / name, staging / name)
    return directory


def _link_or_copy(source: Path, destination: Path) -> None:
    """A hard link where the filesystem allows one (no second copy of the weights)."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)
