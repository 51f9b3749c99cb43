"""A Llama whose layers may differ in KV heads and head dim: model code for a model directory.

No transformers family varies the attention's shape per layer, but real models do (OpenELM's
per-layer query and KV heads, DeciLM's and Nemotron-NAS's per-layer grouped-query attention),
and they ship their own modelling code (`trust_remote_code`). This file is such code, for tiny
test models: `tiny.build_layerwise_model` saves it into the model directory with the config's
`auto_map`, so transformers, the exporters and the tests load the model from the directory.

The config is a LlamaConfig plus `layer_attention`: per layer, None or the config fields that
layer's attention overrides (`num_key_value_heads`, `head_dim`). A layer with its own head dim
computes its own RoPE tables (Llama builds one set for the model, of the model's head dim).
transformers' DynamicCache keeps each layer's K/V as its own tensor, so generation needs no
change. The file imports only transformers (it runs from transformers' module cache).
"""

from __future__ import annotations

import copy

from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding


class LayerAttention(LlamaAttention):
    """Llama attention of one layer's own shape, rotating with tables of its own head dim."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, hidden_states, position_embeddings, attention_mask, **kwargs):
        position_embeddings = self.rotary_emb(hidden_states, kwargs["position_ids"])
        return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)


class LayerwiseLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with `config.layer_attention[i]` applied to layer i's attention."""

    def __init__(self, config) -> None:
        super().__init__(config)
        for index, overrides in enumerate(getattr(config, "layer_attention", None) or []):
            if overrides:
                layer_config = copy.deepcopy(config)
                for key, value in overrides.items():
                    setattr(layer_config, key, value)
                self.model.layers[index].self_attn = LayerAttention(layer_config, index)
        self.post_init()
