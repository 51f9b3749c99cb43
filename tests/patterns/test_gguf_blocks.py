"""A GGUF file's own blocks, found again for the weights dequantized from it, bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from kvfuse.patterns.blocks import Blocks, quantize_rtn
from kvfuse.patterns.gguf_blocks import DECODERS, GGUFBlocks

ROWS, COLS = 24, 256  # 256: a whole Q4_K super-block per row


def _random_k_blocks(rng, rows: int, qtype: T) -> np.ndarray:
    """Raw K-quant bytes with sane fp16 scales (gguf cannot quantize K-quants itself)."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(rows, size), dtype=np.uint8)
    raw[:, :4] = np.float16(rng.uniform(0.001, 0.01, size=(rows, 2))).view(np.uint8)
    return raw


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A GGUF with one tensor per mapped type, one unmapped (Q6_K), and their fp32 values."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "blocks.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    values = {}
    for qtype in (T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K):
        if qtype in (T.Q4_K, T.Q6_K):
            raw = _random_k_blocks(rng, ROWS, qtype)
        else:
            raw = gguf.quantize(rng.standard_normal((ROWS, COLS)).astype(np.float32), qtype)
        writer.add_tensor(qtype.name, raw, raw_dtype=qtype)
        values[qtype.name] = gguf.dequantize(raw, qtype).astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFBlocks(path), values


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_each_mapped_type_dequantizes_bit_for_bit(gguf_file, name):
    """Q4_0, Q4_1, Q8_0 and Q4_K blocks, as integer codes + scale (+ offset), give exactly
    what gguf.dequantize gives (what transformers exported)."""
    source, values = gguf_file
    blocks, reason = source.blocks_for(values[name])
    assert reason == "" and blocks is not None
    assert blocks.bits == (8 if name == "Q8_0" else 4) and blocks.block_size == 32
    assert (blocks.offsets is not None) == (name in ("Q4_1", "Q4_K"))
    assert np.array_equal(blocks.dequantize().view(np.uint32), values[name].view(np.uint32))


def test_rows_found_through_packing_and_permutation(gguf_file):
    """Rows of two tensors, re-ordered and stacked (a packed, un-permuted projection), still
    map onto the file's blocks exactly."""
    source, values = gguf_file
    order = np.random.default_rng(1).permutation(ROWS)
    weight = np.concatenate([values["Q4_1"][order], values["Q4_0"][::-1]])
    blocks, reason = source.blocks_for(weight)
    assert reason == "" and blocks.source == "Q4_0+Q4_1"
    assert np.array_equal(blocks.dequantize(), weight)


def test_unmapped_type_and_foreign_values_fall_back_with_a_reason(gguf_file):
    """Q6_K is not mapped; values found in no tensor are refused; mixed widths too."""
    source, values = gguf_file
    assert source.blocks_for(values["Q6_K"]) == (
        None,
        "GGUF type Q6_K is not mapped onto integer blocks",
    )
    blocks, reason = source.blocks_for(values["Q4_0"] + 1)
    assert blocks is None and reason == f"{ROWS} of {ROWS} rows are in no tensor of blocks.gguf"
    mixed = np.concatenate([values["Q8_0"], values["Q4_0"]])
    assert source.blocks_for(mixed)[1] == "rows mix bit widths (Q4_0, Q8_0)"


def test_symmetric_rtn_searches_the_scale_and_keeps_zeros():
    """Symmetric round-to-nearest (the default): every zero point 2^(bits−1), codes in range,
    exact zeros stay zero, and per block no more squared error than the plain max|w|/2^(bits−1)
    scale (one of the candidates searched) — strictly less over the whole weight."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((16, 128)).astype(np.float32)
    weight[0, :32] = 0
    for bits in (4, 8):
        blocks = quantize_rtn(weight, bits, 32)
        middle = 2 ** (bits - 1)
        assert blocks.symmetric and np.all(blocks.zero_points == middle)
        assert blocks.codes.max() < 2**bits
        assert np.all(blocks.dequantize()[0, :32] == 0)
        grouped = weight.reshape(16, -1, 32)
        plain = np.abs(grouped).max(axis=-1, keepdims=True) / middle
        plain = np.where(plain == 0, 1, plain)
        plain_error = np.square(
            np.clip(np.round(grouped / plain), -middle, middle - 1) * plain - grouped
        ).sum(-1)
        error = np.square(blocks.dequantize().reshape(16, -1, 32) - grouped).sum(-1)
        assert np.all(error <= plain_error + 1e-9) and error.sum() < plain_error.sum()


def test_asymmetric_rtn_blocks_bound_the_error_and_keep_zeros():
    """Round-to-nearest with zero points: error ≤ half a step per block, exact zeros stay
    zero, codes in range."""
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((16, 128)).astype(np.float32)
    weight[0, :32] = 0
    for bits in (4, 8):
        blocks = quantize_rtn(weight, bits, 32, zero_points=True)
        assert isinstance(blocks, Blocks) and blocks.codes.max() < 2**bits
        step = np.repeat(blocks.scales, 32, axis=1)
        assert np.all(np.abs(blocks.dequantize() - weight) <= step / 2 + 1e-6)
        assert np.all(blocks.dequantize()[0, :32] == 0)
