"""Weights as blocks of integer codes: the value every quantized kvfuse op carries.

A weight of N output features by K inputs is cut into blocks of `block_size` along K. Each
block b of row n holds codes q (0 … 2^bits − 1), a scale s, an integer zero point z and, for
formats that keep a real-valued minimum (GGUF Q4_1, the K-quants), an offset m:

    w[n, k] = (q[n, k] − z[n, b]) · s[n, b]  (+ m[n, b])        b = k // block_size

Everything is held unpacked (one uint8 per code) and row-major `[N, K]`, target-neutral; a
target's lowering packs nibbles or transposes as its ops want. Round-to-nearest quantization
is symmetric by default — every zero point 2^(bits−1), the scale per block searched for the
least squared error — or asymmetric, the block's range widened to include 0 so the zero point
is an integer in range and exact zeros stay exact. (Symmetric blocks need no zero-point input:
onnxruntime's MatMulNBits is ~30% faster without one on this CPU, benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kvfuse.errors import KvfuseError


@dataclasses.dataclass
class Blocks:
    """One weight as blocks: codes [N, K] uint8, scales/zero points/offsets [N, K // block]."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int
    offsets: np.ndarray | None = None
    source: str = "rtn"  # "rtn", or the GGUF type the blocks were taken from ("Q4_1", …)
    symmetric: bool = False  # RTN's symmetric scheme (every zero point 2^(bits−1))

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        """The fp32 weight [N, K] these blocks stand for, computed as the kernels do."""
        n, k = self.codes.shape
        blocks = self.codes.reshape(n, -1, self.block_size).astype(np.float32)
        centred = blocks - self.zero_points[..., None].astype(np.float32)
        values = centred * self.scales[..., None]
        if self.offsets is not None:  # (a zero offset is skipped: −0 + 0 would become +0)
            offsets = self.offsets[..., None]
            values = np.where(offsets != 0, values + offsets, values)
        return values.reshape(n, k)

    def nbytes(self) -> int:
        """Bytes these blocks take once packed (codes at `bits` each, fp32 scales/offsets)."""
        n, k = self.codes.shape
        blocks = n * (k // self.block_size)
        extra = 4 * blocks if self.offsets is not None else 0
        return n * k * self.bits // 8 + 4 * blocks + (blocks * self.bits + 7) // 8 + extra

    def rows(self, index: np.ndarray) -> Blocks:
        """The blocks of the rows `index` (in that order)."""
        offsets = None if self.offsets is None else self.offsets[index]
        return dataclasses.replace(
            self,
            codes=self.codes[index],
            scales=self.scales[index],
            zero_points=self.zero_points[index],
            offsets=offsets,
        )


# symmetric scales tried per block: max|w| / (2^(bits−1) · t), the one of least squared error
SCALE_SEARCH = np.linspace(0.80, 1.00, 11, dtype=np.float32)


def quantize_rtn(
    weight_NK: np.ndarray, bits: int, block_size: int, zero_points: bool = False
) -> Blocks:
    """Round-to-nearest per block of `block_size` along K (the last axis).

    Args:
        weight_NK: fp32 [N, K], K a multiple of `block_size`.
        bits: 4 or 8.
        block_size: a power of two ≥ 16.
        zero_points: False: symmetric (every zero point 2^(bits−1), the scale searched);
            True: asymmetric (an integer zero point per block, the scale from its range).

    Returns:
        The blocks; their `dequantize()` is the value the quantized model computes with.
    """
    n, k = weight_NK.shape
    if k % block_size:
        raise KvfuseError(f"K = {k} is not a multiple of the block size {block_size}")
    blocks = weight_NK.astype(np.float32).reshape(n, -1, block_size)
    if not zero_points:
        return _symmetric(blocks, bits, block_size)
    top = np.float32(2**bits - 1)
    low = np.minimum(blocks.min(axis=-1), 0)
    high = np.maximum(blocks.max(axis=-1), 0)
    scales = ((high - low) / top).astype(np.float32)
    safe = np.where(scales == 0, np.float32(1), scales)
    zero_points = np.clip(np.round(-low / safe), 0, top).astype(np.uint8)
    codes = np.round(blocks / safe[..., None]) + zero_points[..., None]
    codes = np.clip(codes, 0, top).astype(np.uint8).reshape(n, k)
    return Blocks(codes, scales, zero_points, bits, block_size)


def _symmetric(blocks: np.ndarray, bits: int, block_size: int) -> Blocks:
    """Codes q = round(w / s) + 2^(bits−1) clipped to [0, 2^bits − 1], s per block the
    candidate of least squared error (the extreme of either sign may land on −2^(bits−1))."""
    n, kb, _ = blocks.shape
    middle = 2 ** (bits - 1)
    low, high = np.float32(-middle), np.float32(middle - 1)
    amax = np.abs(blocks).max(axis=-1)
    best_scale = np.zeros((n, kb), np.float32)
    best_error = np.full((n, kb), np.inf, np.float32)
    for fraction in SCALE_SEARCH:
        scale = amax / np.float32(middle * fraction)
        safe = np.where(scale == 0, np.float32(1), scale)
        q = np.clip(np.round(blocks / safe[..., None]), low, high)
        error = np.square(q * safe[..., None] - blocks).sum(axis=-1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, scale, best_scale)
    safe = np.where(best_scale == 0, np.float32(1), best_scale)
    q = np.clip(np.round(blocks / safe[..., None]), low, high) + middle
    codes = q.astype(np.uint8).reshape(n, -1)
    zero_points = np.full((n, kb), middle, np.uint8)
    scales = best_scale.astype(np.float32)
    return Blocks(codes, scales, zero_points, bits, block_size, symmetric=True)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte along the last axis, the first in the low nibble (an odd
    count is padded with a zero code)."""
    if codes.shape[-1] % 2:
        codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def check_block_size(block_size: int) -> None:
    """MatMulNBits' kernels exist for powers of two from 16 to 256."""
    if block_size not in (16, 32, 64, 128, 256):
        raise KvfuseError(f"--block-size {block_size}: use 16, 32, 64, 128 or 256")
