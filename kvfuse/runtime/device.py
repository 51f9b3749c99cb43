"""A retained-state model on the CUDA provider: KV in device memory, decode as a CUDA graph.

    one device allocation: the arena, layer buffer after layer buffer, each [B, Hkv,
              max_context, D] with its layer's own Hkv and D (float16)
    layer i's past and present ─ bound to the same address inside it (IOBinding, raw pointer)
    prefill ─ eager (`gpu_graph_id` -1): CPU inputs copied in by onnxruntime
    decode  ─ input_ids [B, 1] and seqlens_k [B] are device tensors at fixed addresses, updated
              in place each step (OrtValue.update_inplace); total_sequence_length is a host
              scalar (GroupQueryAttention reads it on the CPU); logits land in a device buffer.
              With `cuda_graph`, onnxruntime captures the step once per batch size (graph id =
              batch) and replays it; every bound address stays fixed, which capture requires.
              GroupQueryAttention sizes its work from total_sequence_length on the host, so a
              captured step would keep the capture's value: graph decode feeds the buffer length
              (max_context) instead, and the real lengths come from seqlens_k on the device (as
              onnxruntime-genai does with its static attention mask). Measured: feeding the real
              total froze every replay at the capture's positions.

One InferenceSession (one copy of the weights) serves every batch size; a `CudaSession` per
batch size holds that size's arena and bindings. Positions past a row's valid length hold
stale values from an earlier prompt; GroupQueryAttention masks them (they are finite), so the
arena is zeroed only once, when it is allocated.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from kvfuse.errors import KvfuseError
from kvfuse.runtime.spec import ModelSpec, arena_layout

CUDA = "CUDAExecutionProvider"
NO_DEVICE = "no CUDA device"
EAGER = "-1"  # gpu_graph_id: run without capturing


def cuda_available() -> bool:
    """Whether onnxruntime here has its CUDA provider (onnxruntime-gpu) and a device."""
    return CUDA in ort.get_available_providers() and _device_count() > 0


def _device_count() -> int:
    try:
        return ort.capi._pybind_state.get_cuda_device_count()  # noqa: SLF001
    except AttributeError:  # older builds: trust the provider list
        return 1


def open_cuda_session(
    spec: ModelSpec, cuda_graph: bool, device_id: int = 0, provider_options: dict | None = None
):
    """The one InferenceSession over the model's weights on the GPU.

    Args:
        spec: a `--target cuda` model (float16/bfloat16 GroupQueryAttention).
        cuda_graph: enable onnxruntime's CUDA-graph capture (`enable_cuda_graph`).
        device_id: which GPU.
        provider_options: more CUDA provider options (e.g. {"sdpa_kernel": "1"}).

    Returns:
        An `onnxruntime.InferenceSession` on the CUDA provider.
    """
    if spec.dtype == "float32":
        raise KvfuseError(
            f"{spec.path} is a float32 model (target ort); GroupQueryAttention on CUDA runs in "
            "float16/bfloat16 only: optimize with --target cuda for --device cuda"
        )
    if spec.logits_dtype != "float32":  # an export's own float16 graph (target ort)
        raise KvfuseError(
            f"{spec.path} is a {spec.dtype} export optimized for target ort (its logits are "
            f"{spec.logits_dtype}); the CUDA runtime runs --target cuda models: optimize with "
            "--target cuda for --device cuda"
        )
    if not cuda_available():
        raise KvfuseError(
            f"{NO_DEVICE}: onnxruntime here has providers {ort.get_available_providers()}; "
            "install onnxruntime-gpu on a machine with an NVIDIA GPU, or use --device cpu"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    provider = {"device_id": str(device_id), "enable_cuda_graph": "1" if cuda_graph else "0"}
    provider.update({key: str(value) for key, value in (provider_options or {}).items()})
    return ort.InferenceSession(
        str(spec.path), options, providers=[(CUDA, provider), "CPUExecutionProvider"]
    )


class CudaSession:
    """Steps of one batch size on the GPU: `run(input_ids, lengths_after)` → host logits."""

    def __init__(
        self, spec: ModelSpec, batch: int, session, cuda_graph: bool, device=("cuda", 0)
    ) -> None:
        if spec.batch_size is not None and batch != spec.batch_size:
            raise KvfuseError(f"this model was optimized for batch {spec.batch_size}, not {batch}")
        self.spec, self.batch, self.session, self.cuda_graph = spec, batch, session, cuda_graph
        if spec.dtype != "float16":
            raise KvfuseError(f"the CUDA runtime runs float16 models; this one is {spec.dtype}")
        self.device = device  # (onnxruntime device type, id); ("cpu", 0) tests the bindings
        self.kv_dtype = np.float16
        shapes = spec.buffer_shapes(batch)
        offsets, elements = arena_layout(shapes)
        zeros = np.zeros(elements, self.kv_dtype)
        self.arena = ort.OrtValue.ortvalue_from_numpy(zeros, *self.device)  # one allocation
        width = np.dtype(self.kv_dtype).itemsize
        self.kv_addresses = [self.arena.data_ptr() + offset * width for offset in offsets]
        self.kv_shapes = [list(shape) for shape in shapes]  # per layer buffer, [B, Hkv, T, D]
        width = 1 if spec.last_logits_only else None
        self._prefill = self._binding()
        self._decode = self._binding()
        self._ids = self._device(np.zeros((batch, 1), np.int64))
        self._seqlens = self._device(np.zeros([batch], np.int32))
        self._total = ort.OrtValue.ortvalue_from_numpy(np.zeros([], np.int32))
        self._decode.bind_ortvalue_input("input_ids", self._ids)
        self._decode.bind_ortvalue_input("seqlens_k", self._seqlens)
        self._decode.bind_ortvalue_input("total_sequence_length", self._total)
        self._decode_logits = self._device(np.zeros((batch, 1, spec.vocab_size), np.float32))
        self._decode.bind_ortvalue_output("logits", self._decode_logits)
        self._next = None  # the greedy token on the device, when the graph picks it
        if spec.greedy_output is not None:
            self._next = self._device(np.zeros((batch, 1), np.int64))
            self._decode.bind_ortvalue_output(spec.greedy_output, self._next)
            self._prefill.bind_ortvalue_output(spec.greedy_output, self._next)
        self._prefill_logits: dict[int, ort.OrtValue] = {}
        self._last_width = width
        self._decode_options = ort.RunOptions()
        self._decode_options.add_run_config_entry("gpu_graph_id", str(batch))
        self._eager_options = ort.RunOptions()
        self._eager_options.add_run_config_entry("gpu_graph_id", EAGER)
        self.decode_runs = 0
        self.held: list[int] = []  # tokens row 0 holds, left by the last single-prompt run

    def _device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, *self.device)

    def _binding(self) -> ort.IOBinding:
        """A binding with every layer's past and present at its arena slice."""
        binding = self.session.io_binding()
        buffers = zip(self.spec.pairs, self.kv_addresses, self.kv_shapes, strict=True)
        for (past, present), address, shape in buffers:
            binding.bind_input(past, *self.device, self.kv_dtype, shape, address)
            binding.bind_output(present, *self.device, self.kv_dtype, shape, address)
        return binding

    @property
    def kv_location(self) -> tuple[str, int]:
        return self.device

    def row_address(self, index: int, row: int) -> int:
        """The device address of layer-buffer `index`'s row `row` in the arena."""
        row_bytes = int(np.prod(self.kv_shapes[index][1:])) * np.dtype(self.kv_dtype).itemsize
        return self.kv_addresses[index] + row * row_bytes

    @property
    def kv_bytes(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.kv_shapes) * 2

    @property
    def prefill_len(self) -> int | None:
        return None

    def run(self, input_ids: np.ndarray, lengths_after: np.ndarray) -> np.ndarray:
        """One step: `input_ids` [B, S] at each row's end, `lengths_after` [B] the valid lengths
        once they are in. Returns logits [B, S or 1, vocab] (float32, a host copy)."""
        if int(lengths_after.max()) > self.spec.max_context:
            raise KvfuseError(f"context of {self.spec.max_context} positions is full")
        seqlens = np.ascontiguousarray(lengths_after - 1, np.int32)
        total = np.array(lengths_after.max(), np.int32)
        if input_ids.shape[1] == 1:
            return self._step(np.ascontiguousarray(input_ids, np.int64), seqlens, total)
        binding, steps = self._prefill, input_ids.shape[1]
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        binding.bind_cpu_input("seqlens_k", seqlens)
        binding.bind_cpu_input("total_sequence_length", total)
        width = self._last_width or steps
        if width not in self._prefill_logits:
            shape = (self.batch, width, self.spec.vocab_size)
            self._prefill_logits[width] = self._device(np.zeros(shape, np.float32))
        binding.bind_ortvalue_output("logits", self._prefill_logits[width])
        self.session.run_with_iobinding(binding, self._eager_options)
        return self._prefill_logits[width].numpy()

    @property
    def picks_greedy(self) -> bool:
        """Whether `next_tokens` can pick greedy tokens on the device."""
        return self._next is not None

    def next_tokens(self, input_ids: np.ndarray, lengths_after: np.ndarray) -> np.ndarray:
        """A decode step whose greedy pick is made on the device: returns the next token of
        each row [B] (8 bytes a row copied back, not the logits)."""
        if int(lengths_after.max()) > self.spec.max_context:
            raise KvfuseError(f"context of {self.spec.max_context} positions is full")
        seqlens = np.ascontiguousarray(lengths_after - 1, np.int32)
        self._launch(np.ascontiguousarray(input_ids, np.int64), seqlens, lengths_after.max())
        return self._next.numpy()[:, 0]

    def _step(self, ids: np.ndarray, seqlens: np.ndarray, total: np.ndarray) -> np.ndarray:
        """A decode step returning its logits (a host copy)."""
        self._launch(ids, seqlens, total)
        return self._decode_logits.numpy()

    def _launch(self, ids: np.ndarray, seqlens: np.ndarray, total) -> None:
        """A decode step: the per-step inputs rewritten in place, then run (or replayed)."""
        self._ids.update_inplace(ids)
        self._seqlens.update_inplace(seqlens)
        if self.cuda_graph:  # frozen into the captured graph: the bound of every row's length
            total = self.spec.max_context
        self._total.update_inplace(np.array(total, np.int32))
        options = self._decode_options if self.cuda_graph else self._eager_options
        self.session.run_with_iobinding(self._decode, options)
        self.decode_runs += 1

    def check_in_place(self) -> None:
        """Fail loudly if onnxruntime wrote a present output anywhere but its arena slice."""
        for binding in (self._prefill, self._decode):
            written = {value.data_ptr() for value in binding.get_outputs()}
            for address, (_, present) in zip(self.kv_addresses, self.spec.pairs, strict=True):
                if written and address not in written:
                    raise KvfuseError(
                        f"onnxruntime wrote {present} to new device memory instead of updating "
                        "the KV buffer in place; the cache would be copied every step"
                    )

    def reset(self) -> None:
        """Forget what the rows hold; the device memory needs no clearing: positions past each
        row's valid length are never attended to."""
        self.held = []
