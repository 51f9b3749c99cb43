"""A GGUF file's own quantized blocks, found again for the fp32 weights exported from it.

transformers dequantizes a GGUF with `gguf.dequantize` (and un-permutes Llama's Q/K rows), and
kvfuse packs Q/K/V and re-orders projection columns; every one of these moves whole rows of
Wᵀ (output features), never values inside a row. So a weight of the rewritten graph is found
row by row: each of its rows must equal, bit for bit, a dequantized row of some GGUF tensor,
and that row's raw blocks become its blocks. Which file rows those are is found by hashing.

| type | value per block of 32 | as Blocks |
|---|---|---|
| Q4_0 | d·(q − 8) | 4 bits, zero point 8, scale d |
| Q8_0 | d·q (int8) | 8 bits, codes q + 128, zero point 128, scale d |
| Q4_1 | d·q + m | 4 bits, zero point 0, scale d, offset m |
| Q4_K | (d·sc_j)·q − dmin·m_j, 8 × 32 | 4 bits, zero point 0, scale d·sc_j, offset −dmin·m_j |

Any other type (Q5_K, Q6_K, …) is reported as not mapped and the weight is quantized by
round-to-nearest instead. The blocks found are accepted only if they dequantize bit for bit to
the exported weight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvfuse.patterns.blocks import Blocks

BLOCK = 32


def _halves(data: np.ndarray) -> np.ndarray:
    """ggml nibbles of 16 bytes → 32 codes: byte j holds element j (low) and j + 16 (high)."""
    return np.concatenate([data & 0x0F, data >> 4], axis=-1)


def _q4_0(raw: np.ndarray):
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)
    codes = _halves(raw[:, 2:18])
    return codes, d[:, 0], np.full(len(raw), 8, np.uint8), None, 4


def _q4_1(raw: np.ndarray):
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)
    m = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
    codes = _halves(raw[:, 4:20])
    return codes, d[:, 0], np.zeros(len(raw), np.uint8), m[:, 0], 4


def _q8_0(raw: np.ndarray):
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)
    q = raw[:, 2:34].copy().view(np.int8).astype(np.int16) + 128
    return q.astype(np.uint8), d[:, 0], np.full(len(raw), 128, np.uint8), None, 8


def _q4_k(raw: np.ndarray):
    from gguf.quants import Q4_K

    n = len(raw)
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)
    dmin = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mins = Q4_K.get_scale_min(raw[:, 4:16].copy())
    scales = (d * sc.astype(np.float32)).reshape(-1)
    offsets = -(dmin * mins.astype(np.float32)).reshape(-1)
    chunks = raw[:, 16:144].reshape(n, 4, 32)  # chunk c: sub-block 2c low, 2c + 1 high nibbles
    codes = np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(n * 8, 32)
    return codes, scales, np.zeros(n * 8, np.uint8), offsets, 4


DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k}


class GGUFBlocks:
    """Index of a GGUF file's 2-D tensors by their dequantized rows (a `BlockSource`)."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(path))
        self.tensors = [t for t in self.reader.tensors if len(t.shape) == 2]
        self.rows: dict[int, tuple[int, int]] = {}  # hash of a row's fp32 bytes → (tensor, row)
        for index, tensor in enumerate(self.tensors):
            values = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            for row, data in enumerate(values.reshape(values.shape[0], -1)):
                self.rows.setdefault(hash(data.tobytes()), (index, row))

    def blocks_for(self, weight_NK: np.ndarray) -> tuple[Blocks | None, str]:
        """The file's blocks for `weight_NK` [N, K] fp32, or (None, why not)."""
        weight_NK = np.ascontiguousarray(weight_NK, dtype=np.float32)
        found = [self.rows.get(hash(row.tobytes())) for row in weight_NK]
        if any(hit is None for hit in found):
            missing = sum(hit is None for hit in found)
            return None, f"{missing} of {len(found)} rows are in no tensor of {self.path.name}"
        types = {self.tensors[t].tensor_type.name for t, _ in found}
        unmapped = sorted(types - DECODERS.keys())
        if unmapped:
            return None, f"GGUF type {', '.join(unmapped)} is not mapped onto integer blocks"
        blocks = self._assemble(found, weight_NK.shape)
        if blocks is None:
            return None, f"rows mix bit widths ({', '.join(sorted(types))})"
        blocks.source = "+".join(sorted(types))
        values = blocks.dequantize()
        if not np.array_equal(values.view(np.uint32), weight_NK.view(np.uint32)):
            worst = float(np.abs(values - weight_NK).max())
            return None, f"{blocks.source} blocks differ from the export (max |Δ| {worst:.2e})"
        return blocks, ""

    def _assemble(self, found: list[tuple[int, int]], shape: tuple[int, int]) -> Blocks | None:
        """One Blocks of the file rows `found` (in order), decoded tensor by tensor."""
        n, k = shape
        codes = np.empty((n, k), np.uint8)
        scales = np.empty((n, k // BLOCK), np.float32)
        zero_points = np.empty((n, k // BLOCK), np.uint8)
        offsets = np.zeros((n, k // BLOCK), np.float32)
        by_tensor: dict[int, list[tuple[int, int]]] = {}
        for position, (tensor, row) in enumerate(found):
            by_tensor.setdefault(tensor, []).append((position, row))
        widths, with_offsets = set(), False
        for tensor, pairs in by_tensor.items():
            positions = np.array([p for p, _ in pairs])
            rows = np.array([r for _, r in pairs])
            c, s, z, o, bits = self._decode(tensor, rows)
            codes[positions] = c.reshape(len(rows), k)
            scales[positions] = s.reshape(len(rows), -1)
            zero_points[positions] = z.reshape(len(rows), -1)
            if o is not None:
                offsets[positions] = o.reshape(len(rows), -1)
                with_offsets = True
            widths.add(bits)
        if len(widths) != 1:
            return None
        return Blocks(
            codes, scales, zero_points, widths.pop(), BLOCK, offsets if with_offsets else None
        )

    def _decode(self, tensor_index: int, rows: np.ndarray):
        tensor = self.tensors[tensor_index]
        name = tensor.tensor_type.name
        data = np.asarray(tensor.data)
        raw = data.reshape(data.shape[0], -1)[rows]
        block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144}[name]
        return DECODERS[name](raw.reshape(-1, block_bytes))
