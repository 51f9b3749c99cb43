"""Shapes that only running a position-only subgraph reveals.

Some RoPE builders compute their tables through ops whose output shape no inference can see:
GLM's `repeat_interleave` of cos/sin, exported by TorchScript as Range, Less, NonZero and
GatherND over the rotary dims. The table's width is then unknown, and so is every Slice of
the head that reads it (`q[..., :cos.shape[-1]]`): the rotary rules see no static head dim.

Such a tensor depends on `position_ids` and on shapes only, so its shape can be measured: the
subgraph is run for two prompt sizes (rows × new tokens), and each dim that is the same in
both runs is static; a dim that follows the rows or the new tokens gets that input's name.
At a prompt's first step the total length equals the new tokens, so a third run after some
cached positions tells them apart: a dim that grows with the past (a mask's key axis,
Gemma 2's Optimum export) is left unnamed, never called the new tokens.
"""

from __future__ import annotations

import onnx_ir as ir

from kvfuse.errors import KvfuseError
from kvfuse.rewriter.rotary_cache import POSITIONS, evaluate_at_prompt

PROBES = ((1, 3), (2, 5))  # (rows, new tokens) of the two prompts measured
PAST = 4  # cached positions before a third run of the first prompt (rows, new tokens)


def probe_position_shapes(model: ir.Model) -> dict[str, int]:
    """Give position-only tensors read by a Shape op their measured shapes; returns how many
    got one (run the shape folding afterwards)."""
    graph = model.graph
    ids = next((v for v in graph.inputs if v.name in ("input_ids", POSITIONS)), None)
    if ids is None or ids.shape is None or len(ids.shape) != 2:
        return {"shape/probed": 0}
    candidates = [
        user.inputs[0]
        for user in graph
        if user.op_type == "Shape" and user.inputs[0] is not None and _unknown(user.inputs[0])
    ]
    probed = 0
    for value in dict.fromkeys(candidates):  # unique, in graph order
        if value.dtype is None or value.producer() is None:
            continue
        try:
            runs = [evaluate_at_prompt(graph, [value], new, rows)[0] for rows, new in PROBES]
            rows, new = PROBES[0]
            runs.append(evaluate_at_prompt(graph, [value], new, rows, past=PAST)[0])
        except KvfuseError:
            continue  # reads other inputs' values: not a position-only tensor
        if runs[0].ndim == runs[1].ndim == runs[2].ndim:
            value.shape = ir.Shape(_measured(runs, ids.shape))
            probed += 1
    return {"shape/probed": probed}


def _unknown(value: ir.Value) -> bool:
    """Whether some dim of `value` is unknown (no shape, no name, or inference's `unk__N`)."""
    if value.shape is None:
        return True
    return any(
        not isinstance(d, int) and (d.value is None or d.value.startswith("unk__"))
        for d in value.shape
    )


def _measured(runs, ids_shape) -> list:
    """Dims from the runs: equal → static; following rows or new tokens → that dim's name;
    following the new tokens and the past → unknown."""
    (rows_a, new_a), (rows_b, new_b) = PROBES
    names = {(rows_a, rows_b): ids_shape[0], (new_a, new_b): ids_shape[1]}
    dims = []
    for a, b, after_past in zip(*(run.shape for run in runs), strict=True):
        if a == b == after_past:
            dims.append(int(a))
        elif a != after_past and (a, b) == (new_a, new_b):
            dims.append(None)  # grows with the past too: a total length, not the new tokens
        else:
            name = names.get((a, b))
            dims.append(name.value if isinstance(name, ir.SymbolicDim) else None)
    return dims
