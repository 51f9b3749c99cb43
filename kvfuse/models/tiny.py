"""Tiny randomly initialised causal LMs for fast tests of many architectures.

Each entry is a transformers `model_type` and config overrides: two layers, widths of a few
dozen, a 256-token vocabulary, grouped KV heads wherever the architecture allows. Weights are
random (seeded), so these models prove structure and numerics, never text quality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_COMMON = {"vocab_size": 256, "max_position_embeddings": 512, "tie_word_embeddings": False}
_LLAMA_LIKE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **_LLAMA_LIKE},
    # a window shorter than the verification's 12 + 8 tokens, so it is exercised
    "mistral": {"model_type": "mistral", **_LLAMA_LIKE, "sliding_window": 8},
    "qwen2": {"model_type": "qwen2", **_LLAMA_LIKE, "use_sliding_window": False},
    "phi3": {"model_type": "phi3", **_LLAMA_LIKE, "pad_token_id": 0},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512},
    # head dim 64, as in Pythia: 16 of 64 dims rotated, which GroupQueryAttention's fused
    # rotary takes (gpt_neox_r4 below rotates 4 of 16, which it does not)
    "gpt_neox": {
        "model_type": "gpt_neox",
        "hidden_size": 256,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rotary_pct": 0.25,
    },
    "falcon": {
        "model_type": "falcon",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "multi_query": True,
        "new_decoder_architecture": False,
        "alibi": False,
        "parallel_attn": True,
        "bias": False,
    },
    # grouped KV heads: Optimum's own config cannot export this; kvfuse's exporter can
    "falcon_gqa": {
        "model_type": "falcon",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_kv_heads": 2,
        "new_decoder_architecture": True,
        "alibi": False,
        "parallel_attn": True,
        "bias": False,
    },
}

# --- positions, score modifiers and MoE (issue 11): ALiBi, learned positions, multi-query with
# one fused QKV projection, soft-capping and alternating windows, MoE MLPs
TINY_CONFIGS.update(
    {
        # ALiBi, LayerNorm without bias (no_bias), QKV clipped to ±clip_qkv
        "mpt": {
            "model_type": "mpt",
            "d_model": 64,
            "n_heads": 4,
            "n_layers": 2,
            "expansion_ratio": 2,
            "no_bias": True,
            "attn_config": {"alibi": True, "clip_qkv": 6.0},
        },
        # ALiBi, biased LayerNorm, QKV fused per head ([.., H, 3, D] columns)
        "bloom": {"model_type": "bloom", "hidden_size": 64, "n_head": 4, "n_layer": 2},
        # learned positions offset by 2, the query scaled before Q·Kᵀ
        "opt": {
            "model_type": "opt",
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 64,
            "pad_token_id": 0,
        },
        # multi-query: one KV head read from one fused c_attn projection
        "gpt_bigcode": {
            "model_type": "gpt_bigcode",
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 512,
            "multi_query": True,
        },
        # MoE MLP (8 experts, top 2) after grouped-query attention
        "mixtral": {
            "model_type": "mixtral",
            **_LLAMA_LIKE,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
        },
        # scores soft-capped by tanh, a query pre-attention scalar other than D, sliding and
        # global layers alternating (window shorter than the verification's 20 tokens)
        "gemma2": {
            "model_type": "gemma2",
            **_LLAMA_LIKE,
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "sliding_window": 6,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        # attention sinks (a learned logit per head), alternating windows, MoE MLP
        "gpt_oss": {
            "model_type": "gpt_oss",
            **_LLAMA_LIKE,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 6,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    }
)
# --- rotary coverage (issue 11): rotary widths and styles, Q/K norms, per-head-dim variation.
# Dims follow the real configs where the dim is what the rules must absorb.
ROTARY_CONFIGS: dict[str, dict[str, Any]] = {
    # Pythia's rotary_pct 0.25, on a 16-dim head: 4 rotated dims (GQA's fused rotary cannot)
    "gpt_neox_r4": {
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rotary_pct": 0.25,
    },
    # GPT-J-6B: interleaved (rotate_every_two) RoPE on 64 of 256 head dims; here 8 of 32
    "gptj": {
        "model_type": "gptj",
        "n_embd": 128,
        "n_layer": 2,
        "n_head": 4,
        "rotary_dim": 8,
        "n_positions": 512,
    },
    # CodeGen-350M: interleaved RoPE on 32 of 64 head dims, QKV packed in mp_num=4 groups
    "codegen": {
        "model_type": "codegen",
        "n_embd": 256,
        "n_layer": 2,
        "n_head": 4,
        "rotary_dim": 32,
        "n_positions": 512,
        "n_ctx": 512,
    },
    # phi-2: head dim 80, partial_rotary_factor 0.4 (32 dims), parallel attention + MLP,
    # LayerNorm with bias, Q/K/V biases
    "phi": {
        "model_type": "phi",
        "hidden_size": 160,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "partial_rotary_factor": 0.4,
    },
    # Gemma-2B: head dim 256 (wider than hidden / heads), one KV head
    "gemma": {
        "model_type": "gemma",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
    },
    # GLM-4: interleaved RoPE on half of each head (partial_rotary_factor 0.5), QKV biases
    "glm": {
        "model_type": "glm",
        **_LLAMA_LIKE,
        "head_dim": 32,
        "partial_rotary_factor": 0.5,
        "pad_token_id": 0,
    },
    # StarCoder2: LayerNorm with bias, biased projections, GQA
    "starcoder2": {"model_type": "starcoder2", **_LLAMA_LIKE, "sliding_window": None},
    # Qwen3: per-head RMSNorm on Q and K after the head reshape, before RoPE
    "qwen3": {"model_type": "qwen3", **_LLAMA_LIKE, "head_dim": 16},
    # OLMo2: RMSNorm over the whole Q and K projections, before the head reshape
    # (post-norms make the default 0.02-init random model repeat one token)
    "olmo2": {"model_type": "olmo2", **_LLAMA_LIKE, "pad_token_id": 0, "initializer_range": 0.1},
    # SmolLM3: every 4th layer without RoPE (NoPE); here layer 1 of 2
    "smollm3": {
        "model_type": "smollm3",
        **_LLAMA_LIKE,
        "no_rope_layers": [1, 0],
        "pad_token_id": 0,
    },
}
TINY_CONFIGS.update(ROTARY_CONFIGS)


# the embedding and the LM head one matrix, as SmolLM2 has them (quantization keeps one copy)
TINY_CONFIGS["llama_tied"] = {**TINY_CONFIGS["llama"], "tie_word_embeddings": True}


# not tiny: a random Llama of 2.49 GB in fp32 (623 M parameters, most in two wide layers and an
# untied 32k-token head), past protobuf's 2 GiB limit, to prove weights stay external end to end
LARGE_CONFIGS: dict[str, dict[str, Any]] = {
    "llama_2gb": {
        "model_type": "llama",
        "vocab_size": 32768,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}


def tiny_config(name: str) -> Any:
    """The transformers config of the test model `name` (a key of `TINY_CONFIGS` or
    `LARGE_CONFIGS`)."""
    from transformers import AutoConfig

    overrides = dict(TINY_CONFIGS.get(name) or LARGE_CONFIGS[name])
    model_type = overrides.pop("model_type")
    config = AutoConfig.for_model(model_type, **{**_COMMON, **overrides})
    config.bos_token_id, config.eos_token_id = 1, 2
    return config


def build_tiny_model(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Create the tiny model `name` with seeded random weights and save it to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name), dtype=torch.float32)
    with torch.no_grad():
        # norm weights initialise to all-ones, which the exporter deduplicates into one shared
        # tensor; perturb them so each layer's norm has its own weight, as a trained model does
        for parameter in model.parameters():
            if parameter.ndim == 1 and bool(torch.all(parameter == 1)):
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.eval()
    model.save_pretrained(out_dir)
    save_byte_tokenizer(Path(out_dir))
    return Path(out_dir)


def build_large_model(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Create the model `name` of `LARGE_CONFIGS` with seeded uniform random weights (fast to
    draw, unlike the default initialisers) and save it in bfloat16 (half the bytes to write and
    read back; the values export exactly in float32)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    generator = torch.Generator().manual_seed(seed)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(tiny_config(name), dtype=torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            bound = 1.0 / parameter.shape[-1] ** 0.5  # keeps activations of order one
            parameter.uniform_(-bound, bound, generator=generator)
            if parameter.ndim == 1:  # norm weights: around one
                parameter.add_(1.0)
    model.eval().save_pretrained(out_dir)
    save_byte_tokenizer(Path(out_dir))
    return Path(out_dir)


CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def save_byte_tokenizer(out_dir: Path) -> None:
    """A byte-level tokenizer whose 256 tokens are the 256 bytes (no merges): it fits the tiny
    vocabulary, and multi-byte characters span several tokens, as real text often does."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": alphabet[2],
        "bos_token": alphabet[1],
        "model_max_length": 512,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
