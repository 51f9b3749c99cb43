"""Run an exported model the way it was exported: a growing Concat KV cache fed back each step.

This is the reference every rewrite is checked against, and the way tests prove an Optimum
export matches PyTorch. Inputs are found by name (`input_ids`, `attention_mask`,
`position_ids`, `past_key_values.{i}.key|value`), and the past-length axis is the one whose
symbolic dim mentions "past", so GPT-2, Falcon and Llama-style exports all run the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from kvfuse.errors import KvfuseError

PAST_PREFIX = "past_key_values."


class ConcatCacheRunner:
    """Drive an ONNX causal LM with past KV: `prefill(ids)`, then `step(ids)` repeatedly."""

    def __init__(
        self, model_path: Path | None, threads: int = 2, session: ort.InferenceSession | None = None
    ) -> None:
        """Open `model_path` in onnxruntime (default optimisations), or drive `session`."""
        if session is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.log_severity_level = 4  # errors come back as exceptions
            session = ort.InferenceSession(
                str(model_path), options, providers=["CPUExecutionProvider"]
            )
        self.session = session
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith(PAST_PREFIX)]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.present_names = [n for n in self.output_names if n.startswith("present")]
        self.past: dict[str, np.ndarray] = {}
        self.mask: np.ndarray | None = None

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None
    ) -> np.ndarray:
        """Run the prompt with an empty cache; returns logits [B, S, vocab]."""
        batch = input_ids.shape[0]
        self.past = {name: self._empty_past(name, batch) for name in self.past_names}
        self.mask = np.zeros((batch, 0), dtype=np.int64)
        return self.step(input_ids, attention_mask)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Append `input_ids` [B, S] after the cached positions; returns logits [B, S, vocab]."""
        new_mask = np.ones(input_ids.shape, np.int64) if attention_mask is None else attention_mask
        self.mask = np.concatenate([self.mask, new_mask.astype(np.int64)], axis=1)
        feed = {"input_ids": input_ids.astype(np.int64), **self.past}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = self.mask
        if "position_ids" in self.inputs:
            # positions count the real tokens before each one (left padding gets position 1,
            # as transformers does), so padded rows see the same positions as unpadded ones
            positions = np.cumsum(self.mask, axis=1) - 1
            positions[self.mask == 0] = 1
            feed["position_ids"] = positions[:, -input_ids.shape[1] :]
        self.last_outputs = self.session.run(None, feed)
        outputs = dict(zip(self.output_names, self.last_outputs, strict=True))
        self.past = {
            past: outputs[present]
            for past, present in zip(self.past_names, self.present_names, strict=True)
        }
        return outputs["logits"]

    def _empty_past(self, name: str, batch: int) -> np.ndarray:
        dims = self.inputs[name].shape
        # symbolic dims: the past length starts empty; any other (the batch) is the batch size
        shape = [d if isinstance(d, int) else 0 if _is_past_dim(d) else batch for d in dims]
        return np.zeros(shape, dtype=numpy_type(self.inputs[name].type))


NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def numpy_type(ort_type: str) -> type:
    """The numpy type onnxruntime takes for an input of `ort_type` ("tensor(float16)" …)."""
    if ort_type not in NUMPY_TYPES:
        raise KvfuseError(
            f"onnxruntime's Python API cannot feed a {ort_type} input from numpy; export in "
            "float32 or float16 to run this model on CPU"
        )
    return NUMPY_TYPES[ort_type]


def _is_past_dim(dim: int | str | None) -> bool:
    return isinstance(dim, str) and "past" in dim
