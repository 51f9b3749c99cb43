"""GGUF file → ordinary Hugging Face model directory (weights dequantised to fp32).

transformers reads GGUF natively (with `accelerate` installed). The GGUF-derived tokenizer of
SmolLM2 names `<|im_start|>` as its eos token while the model config says `<|im_end|>` (id 2),
which is what generation must stop on; the config wins, and the tokenizer is corrected to match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvfuse.errors import KvfuseError
from kvfuse.progress import quiet_libraries


def gguf_to_hf_directory(gguf: Path, out_dir: Path) -> None:
    """Dequantise `gguf` with transformers and save model, tokenizer and config in `out_dir`."""
    gguf = Path(gguf)
    with quiet_libraries():
        tokenizer, model = _load(gguf)
    eos = model.config.eos_token_id
    if isinstance(eos, int) and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if model.generation_config is not None and isinstance(eos, int):
        model.generation_config.eos_token_id = eos
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _load(gguf: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KvfuseError(
            f"could not load {gguf} as a GGUF causal LM: {reason}; "
            "check the file is a complete GGUF of an architecture transformers supports"
        ) from error
    return tokenizer, model
