"""The facts about an exported model that the rewriter and the runtime need, read from its config.

Written next to the ONNX model as `kvfuse-export.json`. Transformers names the same fact
differently per architecture (`n_head`, `num_kv_heads`, `rotary_pct`, ...); this module is the
one place that knows those spellings, so everything downstream reads one schema.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from kvfuse.errors import KvfuseError

EXPORT_METADATA = "kvfuse-export.json"
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """Architecture facts of a causal LM, independent of how transformers spells them."""

    architecture: str  # transformers model_type, e.g. "llama"
    num_layers: int
    num_heads: int
    num_kv_heads: int
    cache_kv_heads: int  # heads the exported KV cache holds (Falcon's new arch: all of them)
    head_dim: int
    hidden_size: int
    vocab_size: int
    positions: str  # "rope" or "learned"
    rope_theta: float | None
    rotary_dim: int | None  # < head_dim for partial rotary (GPT-NeoX, Phi)
    rope_scaling: dict[str, Any] | None
    sliding_window: int | None
    max_positions: int | None
    bos_token_id: int | None
    eos_token_ids: list[int]

    @classmethod
    def from_config(cls, config: Any, eos_token_ids: list[int] | None = None) -> ModelFacts:
        """Read the facts from a `transformers.PretrainedConfig`."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rotary = _rotary(config, head_dim)
        return cls(
            architecture=config.model_type,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=_kv_heads(config),
            cache_kv_heads=heads
            if getattr(config, "new_decoder_architecture", False)
            else _kv_heads(config),
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            positions="rope" if rotary else "learned",
            rope_theta=rotary[0] if rotary else None,
            rotary_dim=rotary[1] if rotary else None,
            rope_scaling=getattr(config, "rope_scaling", None) if rotary else None,
            sliding_window=_sliding_window(config),
            max_positions=getattr(config, "max_position_embeddings", None),
            bos_token_id=getattr(config, "bos_token_id", None),
            eos_token_ids=eos_token_ids if eos_token_ids is not None else _eos(config),
        )


def _kv_heads(config: Any) -> int:
    if config.model_type == "falcon":
        if config.new_decoder_architecture:
            return config.num_kv_heads
        return 1 if config.multi_query else config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _rotary(config: Any, head_dim: int) -> tuple[float, int] | None:
    """(theta, rotary_dim), or None for learned absolute positions (GPT-2)."""
    if config.model_type in ("gpt2",) or getattr(config, "alibi", False):
        return None
    theta = getattr(config, "rope_theta", None) or getattr(config, "rotary_emb_base", 10000.0)
    fraction = getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", 1.0)
    return float(theta), int(head_dim * fraction)


def _sliding_window(config: Any) -> int | None:
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


def _eos(config: Any) -> list[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def write_metadata(path: Path, facts: ModelFacts, extra: dict[str, Any]) -> None:
    """Write `kvfuse-export.json`: the facts plus provenance (source, versions, files)."""
    record = {"schema": SCHEMA_VERSION, "model": dataclasses.asdict(facts), **extra}
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")


def read_metadata(directory: Path) -> dict[str, Any] | None:
    """The export metadata of a directory written by `kvfuse export`, or None."""
    path = Path(directory) / EXPORT_METADATA
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise KvfuseError(
            f"{path} is not readable JSON ({type(error).__name__}); re-export the model or "
            "delete the file"
        ) from error
    model = record.get("model", {}) if isinstance(record, dict) else None
    numbers = ("max_positions", "sliding_window", "num_layers", "head_dim")
    if not isinstance(model, dict) or any(
        not isinstance(model.get(key), (int, type(None))) or isinstance(model.get(key), bool)
        for key in numbers
    ):
        raise KvfuseError(
            f"{path} is not a kvfuse export record (edited by hand?); re-export the model or "
            "delete the file"
        )
    return record
