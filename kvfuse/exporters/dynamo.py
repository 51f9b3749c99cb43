"""Export a causal LM with PyTorch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`).

    HF directory ─ from_pretrained ─ FlatCacheLM (flat past tensors → DynamicCache)
                 ─ torch.export (dynamic batch / new tokens / past) ─ ONNX, functions inlined
                 ─ model.onnx (+ model.onnx.data above 2 GB), tokenizer, config

The graph has the I/O contract of Optimum's `text-generation-with-past` export — inputs
`input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key|value` [B, Hkv, P, D];
outputs `logits`, `present.{i}.key|value` [B, Hkv, P + S, D] — so the rewriter, the reference
runner and the tests treat both exports alike. Only the graph inside differs: node order and
names, RMSNorm as Reciprocal(Sqrt), the key transposed through 3-D reshapes, the mask built
with GatherND.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from kvfuse.errors import KvfuseError
from kvfuse.progress import quiet_libraries

OPSET = 18
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# example sizes for tracing: each ≥ 2 and distinct, so torch.export keeps them symbolic
# (0 and 1 would be specialised) and does not mistake one dim for another
EXAMPLE_BATCH, EXAMPLE_NEW, EXAMPLE_PAST = 2, 3, 5
BATCH, NEW, PAST = "batch_size", "sequence_length", "past_sequence_length"


def dynamo_export(
    hf_dir: Path,
    out_dir: Path,
    facts: Any,
    trust_remote_code: bool,
    onnx_file: str,
    dtype: str = "float32",
) -> list[dict]:
    """Export the model in `hf_dir` to `out_dir/onnx_file` with the dynamo exporter, in `dtype`
    ("float32", "float16" or "bfloat16"), and save its config, generation config and tokenizer
    beside it (as Optimum does).

    Returns the module substitutions made before tracing (`kvfuse.models.substitutions`)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, trust_remote_code=trust_remote_code, dtype=torch_dtype, local_files_only=True
    ).eval()
    wrapper = FlatCacheLM(model, facts.num_layers).eval()
    arguments = _example_inputs(model, facts, torch_dtype)
    dynamic_shapes = _dynamic_shapes(facts.num_layers)
    substituted = _substitute_and_check(wrapper, arguments)
    try:
        with quiet_libraries(), _quiet_logger("torch.onnx"):
            program = _trace(wrapper, arguments, dynamic_shapes, facts.num_layers)
    except Exception as error:  # torch.export raises many types; report one line
        reason = (str(error).strip().splitlines() or [""])[0][:300]
        raise KvfuseError(
            f"the dynamo exporter failed on {hf_dir}: {type(error).__name__}: {reason}"
        ) from error
    _inline_functions(program.model)
    _name_mask_length(program.model)
    program.save(str(out_dir / onnx_file), external_data=_needs_external_data(model))
    _save_companions(model, hf_dir, out_dir)
    return substituted


SUBSTITUTION_TOLERANCE = 1e-4


def _substitute_and_check(wrapper: torch.nn.Module, arguments: tuple) -> list[dict]:
    """Swap modules torch.export cannot trace for export-friendly ones with the same outputs,
    and prove it on the example inputs (logits and presents within 1e-4 of the original)."""
    from kvfuse.models.substitutions import substitute_modules

    with torch.no_grad():
        before = wrapper(*arguments)
        substituted = substitute_modules(wrapper)
        if not substituted:
            return []
        after = wrapper(*arguments)
    worst = max(float((a - b).abs().max()) for a, b in zip(before, after, strict=True))
    if worst > SUBSTITUTION_TOLERANCE:
        names = ", ".join(entry["module"] for entry in substituted)
        raise KvfuseError(
            f"substituting {names} changed the model's outputs by {worst:.1e} "
            f"(> {SUBSTITUTION_TOLERANCE}); not exporting"
        )
    for entry in substituted:
        entry["max_abs_diff"] = worst
    return substituted


def _trace(wrapper, arguments, dynamic_shapes, num_layers: int):
    return torch.onnx.export(
        wrapper,
        arguments,
        dynamic_shapes=dynamic_shapes,
        input_names=input_names(num_layers),
        output_names=output_names(num_layers),
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )


@contextlib.contextmanager
def _quiet_logger(name: str):
    """torch.onnx logs warnings that concern no kvfuse user (e.g. torchvision ops it skips)."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


class FlatCacheLM(torch.nn.Module):
    """The causal LM with its cache as flat tensors, in and out: torch.export needs plain
    tensors at the boundary; inside, transformers gets the DynamicCache it expects."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model, self.num_layers = model, num_layers

    def forward(self, input_ids, attention_mask, position_ids, past):
        cache = DynamicCache()  # full-length layers (no sliding window), as Optimum's export
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        layers = output.past_key_values.layers
        return (output.logits, *[t for layer in layers for t in (layer.keys, layer.values)])


def input_names(num_layers: int) -> list[str]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(num_layers: int) -> list[str]:
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["logits", *present]


def _example_inputs(model: Any, facts: Any, dtype: torch.dtype = torch.float32) -> tuple:
    batch, new, past = EXAMPLE_BATCH, EXAMPLE_NEW, EXAMPLE_PAST
    input_ids = torch.randint(3, min(facts.vocab_size, 1000), (batch, new))
    attention_mask = torch.ones(batch, past + new, dtype=torch.int64)
    position_ids = torch.arange(past, past + new).expand(batch, new).contiguous()
    cache = tuple(
        torch.randn((batch, heads, past, dim), dtype=dtype)
        for heads, dim in _cache_shapes(model, facts)
        for _ in ("key", "value")
    )
    return (input_ids, attention_mask, position_ids, cache)


def _cache_shapes(model: Any, facts: Any) -> list[tuple[int, int]]:
    """Each layer's cached (KV heads, head dim), as the model itself caches them: layers may
    differ (models with their own code, e.g. per-layer KV heads), which no config field says.
    Read from one token run through the model (Falcon's new architecture, for one, caches
    every query head, not its config's KV heads)."""
    with torch.no_grad():
        output = model(input_ids=torch.tensor([[3]]), use_cache=True)
    cache = output.past_key_values
    cache = getattr(cache, "self_attention_cache", cache)  # GPTBigCode's EncoderDecoderCache
    layers = getattr(cache, "layers", None)
    if layers is None:  # a cache that does not list its layers: the config's shape for all
        return [(facts.cache_kv_heads, facts.head_dim)] * facts.num_layers
    shapes = [(int(layer.keys.shape[1]), int(layer.keys.shape[-1])) for layer in layers]
    if len(shapes) != facts.num_layers:
        raise KvfuseError(
            f"the model caches {len(shapes)} layers, its config says {facts.num_layers}; "
            "cannot export its cache"
        )
    return shapes


def _dynamic_shapes(num_layers: int) -> tuple:
    from torch.export import Dim

    batch, new, past = Dim(BATCH), Dim(NEW), Dim(PAST)
    # the mask spans past + new; torch.export accepts no sum of two dims, so the mask length
    # gets its own name here (renamed after the export, see `_name_mask_length`)
    tokens = {0: batch, 1: new}
    cache = tuple({0: batch, 2: past} for _ in range(2 * num_layers))
    return (tokens, {0: batch, 1: Dim("attention_length")}, tokens, cache)


def _name_mask_length(model: Any) -> None:
    """Name the mask's length as Optimum does (`past_sequence_length + sequence_length`)."""
    import onnx_ir as ir

    mask = next(v for v in model.graph.inputs if v.name == "attention_mask")
    mask.shape = ir.Shape([BATCH, f"{PAST} + {NEW}"])


def _inline_functions(model: Any) -> None:
    """Inline local functions (the exporter may emit some), so rules see plain nodes."""
    if model.functions:
        from onnx_ir.passes.common import InlinePass

        InlinePass()(model)


def _needs_external_data(model: Any) -> bool:
    """Weights above protobuf's 2 GB limit go to a `.data` file beside the model."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size >= 2**31 - 2**26  # leave room for the graph itself


def _save_companions(model: Any, hf_dir: Path, out_dir: Path) -> None:
    """Config, generation config and tokenizer beside the model, as Optimum saves them."""
    from transformers import AutoTokenizer

    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    if not any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
        return  # the tokenizer is optional: the export is complete without one
    try:
        AutoTokenizer.from_pretrained(hf_dir, local_files_only=True).save_pretrained(out_dir)
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass  # a tokenizer transformers cannot load: the export is still complete
