"""One copy of a static pair's weights in memory, handed to both onnxruntime sessions.

The prefill and decode graphs of `--target onnx --static` point every large initializer at the
same offset of one weights file. It is read once into memory; each initializer becomes an
OrtValue over its slice and is given to every session with `add_initializer`, so onnxruntime
neither reads the file again nor keeps a copy per session. MLAS pre-packing (a re-laid-out copy
of each MatMul weight, per session) is turned off for such sessions: with it, two sessions
would hold three copies of the weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from kvfuse.errors import KvfuseError

PACKED_4BIT = {
    np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)): t
    for t in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4)
}


class SharedWeights:
    """The weights file in memory and one OrtValue per external initializer of the pair."""

    def __init__(self, weights: Path, graphs: list[Path]) -> None:
        references = [_external_tensors(graph) for graph in graphs]
        first = references[0]
        for graph, other in zip(graphs[1:], references[1:], strict=True):
            if other != first:
                raise KvfuseError(
                    f"{graph.name} does not read the same weights as {graphs[0].name}; "
                    "re-run kvfuse optimize --static"
                )
        self.blob = np.fromfile(weights, dtype=np.uint8)  # the one copy
        self.values: dict[str, ort.OrtValue] = {}
        for name, (location, offset, length, dtype, dims) in first.items():
            if location != weights.name or offset + length > self.blob.size:
                raise KvfuseError(f"{graphs[0].name}: {name} lies outside {weights.name}")
            self.values[name] = self._value(offset, length, dtype, dims)

    def _value(self, offset: int, length: int, dtype, dims) -> ort.OrtValue:
        """An OrtValue over the blob's bytes of one tensor (no copy)."""
        if dtype in PACKED_4BIT:
            # numpy has no packed 4-bit type: onnxruntime takes the shape from a uint8 array of
            # one byte per element and reads the first ⌈count / 2⌉ bytes, the packed tensor
            count = int(np.prod(dims))
            end = offset + count
            view = self.blob[offset:end] if end <= self.blob.size else None
            if view is None:  # the last tensor of the file: pad a copy
                view = np.zeros(count, np.uint8)
                view[:length] = self.blob[offset : offset + length]
            array = view.reshape(dims)
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, PACKED_4BIT[dtype])
        array = self.blob[offset : offset + length].view(dtype).reshape(dims)
        return ort.OrtValue.ortvalue_from_numpy(array)

    @property
    def nbytes(self) -> int:
        return self.blob.nbytes

    def add_to(self, options: ort.SessionOptions) -> None:
        """Make a session read every shared initializer from this memory, not the file."""
        options.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in self.values.items():
            options.add_initializer(name, value)


def _external_tensors(graph: Path) -> dict[str, tuple]:
    """name → (location, offset, length, numpy dtype, dims) of a graph's external tensors."""
    proto = onnx.load(str(graph), load_external_data=False)
    tensors = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        tensors[tensor.name] = (
            entries["location"],
            int(entries.get("offset", 0)),
            int(entries["length"]),
            dtype,
            tuple(tensor.dims),
        )
    return tensors
