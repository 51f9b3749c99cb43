"""Greedy traces of an optimized model, for comparing devices: tokens, logits, margins.

`python -m tests.runtime.cuda_trace MODEL OUT.npz` records the CPU trace that the GPU tests
compare against (the float32 `ort` model of SmolLM2 on the README's question): the GPU machine
has no exporter, so the float32 reference travels there as this file.
"""

from __future__ import annotations

import sys

import numpy as np

QUESTION = "What is the capital of France?"
STEPS = 32  # greedy tokens compared
LOGIT_STEPS = 9  # prefill + 8 decode steps whose full logits are kept (as verification does)


def greedy_trace(generator, prompt: str = QUESTION, steps: int = STEPS) -> dict[str, np.ndarray]:
    """Prefill `prompt` (chat template), then `steps` greedy tokens on a batch-1 session.

    Returns:
        tokens [steps], margins [steps] (top-1 minus top-2 logit of each step), logits
        [LOGIT_STEPS, vocab] of the first steps, and the prompt's ids.
    """
    ids = generator.text.encode(prompt, True)
    session = generator.session(1)
    session.reset()
    logits = session.run(np.array([ids]), np.array([len(ids)]))[0, -1].copy()
    tokens, margins, kept = [], [], []
    for step in range(steps):
        if step < LOGIT_STEPS:
            kept.append(logits.astype(np.float32))
        top2 = np.sort(logits)[-2:]
        tokens.append(int(logits.argmax()))
        margins.append(float(top2[1] - top2[0]))
        length = np.array([len(ids) + step + 1])
        logits = session.run(np.array([[tokens[-1]]]), length)[0, -1].copy()
    return {
        "prompt": np.array(ids),
        "tokens": np.array(tokens),
        "margins": np.array(margins),
        "logits": np.stack(kept),
    }


if __name__ == "__main__":
    from kvfuse.runtime.generate import load

    np.savez_compressed(sys.argv[2], **greedy_trace(load(sys.argv[1])))
