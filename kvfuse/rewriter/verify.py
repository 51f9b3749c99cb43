"""Numerical verification: the rewritten model against the original, on the same tokens.

The original runs with its growing Concat cache (as exported); the rewritten one with its fixed
buffers (present fed back as past, `seqlens_k`/`total_sequence_length` advanced each step).
Both run with onnxruntime's own graph optimisations off, so what is compared is the graphs as
written. Prefill, then greedy decode steps driven by the original's tokens; every step's logits
must agree within explicit tolerances and every greedy token must be equal.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kvfuse.errors import KvfuseError
from kvfuse.exporters.reference import ConcatCacheRunner, numpy_type

# fp32 logits through different kernels (fused GQA vs decomposed MatMul/Softmax): the
# difference is summation order only. Absolute on logits, scaled by their magnitude.
ATOL = 1e-4
RTOL = 1e-4
# (atol, rtol) by the logits' type: fp16 keeps 11 significant bits (a step of ~1e-3 relative,
# 0.016 at a logit of 30) and each kernel rounds its intermediates at its own points, so the
# bound is ten steps. bf16 models are checked widened to fp32 (`kvfuse.rewriter.widen`): both
# graphs then run in fp32 arithmetic over the same (exactly widened) weights, at fp32's bound.
TOLERANCES = {np.dtype(np.float32): (ATOL, RTOL), np.dtype(np.float16): (1e-2, 1e-2)}
# a float16 graph against the float32 original: each stored tensor is rounded to 11 bits
# (relative 4.9e-4) and 30 layers of that reach ~1e-2 of a logit; bfloat16 keeps 8 bits
HALF_TOLERANCE = {"float16": (0.15, 0.03), "bfloat16": (1.0, 0.1)}
WIDENED = (
    "run in float32 arithmetic: the bfloat16 weights and types of both graphs widened to "
    "float32 (onnxruntime's CPU provider has no bfloat16 MatMul/GroupQueryAttention kernels); "
    "the bfloat16 model itself runs on onnxruntime's CUDA provider"
)


@dataclasses.dataclass
class StepCheck:
    step: str  # "prefill" or "decode 1", ...
    max_abs_diff: float
    tolerance_used: float  # max over logits of |Δ| / (atol + rtol·|expected|); ≤ 1 passes
    token_original: int
    token_rewritten: int


@dataclasses.dataclass
class Verification:
    """The figures of one verification run."""

    passed: bool
    atol: float
    rtol: float
    prompt_tokens: int
    steps: list[StepCheck]
    # how the two graphs were run when not as written (bfloat16 models: `WIDENED`)
    arithmetic: str | None = None

    @property
    def max_abs_diff(self) -> float:
        return max(s.max_abs_diff for s in self.steps)

    @property
    def tokens_equal(self) -> bool:
        return all(s.token_original == s.token_rewritten for s in self.steps)

    def summary(self) -> str:
        first_bad = next((s for s in self.steps if not _step_ok(s)), None)
        verdict = "passed" if self.passed else f"FAILED first at {first_bad.step}"
        return (
            f"verification {verdict}: max |Δlogits| {self.max_abs_diff:.2e} over prefill of "
            f"{self.prompt_tokens} tokens + {len(self.steps) - 1} decode steps, greedy tokens "
            f"{'equal' if self.tokens_equal else 'DIFFER'} (atol {self.atol}, rtol {self.rtol})"
            + (f"; {self.arithmetic}" if self.arithmetic else "")
        )


class FixedCacheRunner:
    """Drive a retained-state model: fixed [B, Hkv, max_context, D] buffers fed back each step.

    `kv_shape` is one [B, Hkv, max_context, D] for every layer, or a mapping past input → its
    own (layers that differ in KV heads or head dim; `KVSignature.kv_shapes`); B is replaced by
    each prompt's batch.

    `model` is one graph, or a static pair {prefill length: graph, 1: graph}: a step of one
    token runs the decode graph, a longer one (up to the prefill length) the prefill graph,
    right-padded — the padding's cache slots lie past the valid length and are never read."""

    def __init__(self, model, pairs, kv_shape: list | dict[str, list], optimized: bool = False):
        """`optimized`: onnxruntime's own graph optimisations on (as a deployed model runs)."""
        graphs = model if isinstance(model, dict) else {None: model}
        self.sessions = {
            length: graph
            if isinstance(graph, ort.InferenceSession)
            else _session(graph, optimized=optimized)
            for length, graph in graphs.items()
        }
        self.session = next(iter(self.sessions.values()))
        self.input_names = {i.name for i in self.session.get_inputs()}
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.kv_type = numpy_type(types[pairs[0][0]]) if pairs else np.float32
        self.pairs, self.kv_shape = pairs, kv_shape
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.cache_dtype = self.kv_type

    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        batch = input_ids.shape[0]
        self.cache = {
            past: np.zeros([batch, *shape[1:]], self.kv_type)
            for past, shape in cache_shapes(self.pairs, self.kv_shape).items()
        }
        self.length = 0
        return self.step(input_ids)

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        batch, new = input_ids.shape
        total = self.length + new
        feed = {
            "input_ids": input_ids.astype(np.int64),
            "seqlens_k": np.full([batch], total - 1, np.int32),
            "total_sequence_length": np.array(total, np.int32),
            **self.cache,
        }
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.tile(np.arange(self.length, total), (batch, 1))
        feed = {name: array for name, array in feed.items() if name in self.input_names}
        session, padded = self._session_for(new)
        for name in ("input_ids", "position_ids"):
            if name in feed and padded > new:
                feed[name] = np.pad(feed[name], [(0, 0), (0, padded - new)], mode="edge")
        self.last_outputs = session.run(None, feed)
        outputs = dict(zip(self.output_names, self.last_outputs, strict=True))
        self.cache = {past: outputs[present] for past, present in self.pairs}
        self.length = total
        return outputs["logits"][:, :new]

    def _session_for(self, new: int) -> tuple[ort.InferenceSession, int]:
        """The session for a step of `new` tokens and the length it is padded to."""
        if None in self.sessions:
            return self.sessions[None], new
        fits = sorted(length for length in self.sessions if length >= new)
        if not fits:
            raise ValueError(f"no static graph takes {new} new tokens")
        return self.sessions[fits[0]], fits[0]


def cache_shapes(pairs, kv_shape: list | dict[str, list]) -> dict[str, list]:
    """Each past input's buffer shape: `kv_shape` is one shape for every layer, or a mapping
    past input → its own."""
    if isinstance(kv_shape, dict):
        return {past: list(kv_shape[past]) for past, _ in pairs}
    return {past: list(kv_shape) for past, _ in pairs}


def verify(
    original: Path | bytes,
    rewritten,
    pairs,
    kv_shape,
    *,
    batch: int = 1,
    prompt_tokens: int = 12,
    decode_steps: int = 8,
    seed: int = 0,
    tolerance: tuple[float, float] | None = None,
) -> Verification:
    """Compare logits and greedy tokens of `rewritten` (a model file, or a static pair) against
    `original` (a file, or a model's bytes) step by step, within `tolerance` (atol, rtol;
    default: by the original's logits type, `TOLERANCES`). The two run one after the other —
    the original's logits and greedy tokens are recorded, its session closed, then the
    rewritten model replays those tokens — so only one model's weights are in memory at a time."""
    if isinstance(rewritten, dict):  # a static pair: the prompt is one step of its prefill graph
        prompt_tokens = min(prompt_tokens, max(rewritten))
    original = original if isinstance(original, bytes) else Path(original)
    with _onnxruntime_errors("the original model", "re-export it"):
        reference = ConcatCacheRunner(None, session=_session(original))
        vocab = _vocab_size(reference.session)
        ids = np.random.default_rng(seed).integers(3, min(vocab, 1000), (batch, prompt_tokens))
        expected, feeds = [reference.prefill(ids)], [ids]
        for _ in range(decode_steps):
            feeds.append(expected[-1][:, -1].argmax(-1)[:, None])
            expected.append(reference.step(feeds[-1]))
    del reference
    steps = []
    atol, rtol = tolerance or TOLERANCES[expected[0].dtype]
    with _onnxruntime_errors("the rewritten model", "please report this kvfuse bug"):
        candidate = FixedCacheRunner(rewritten, pairs, kv_shape)
        for index, (tokens, logits) in enumerate(zip(feeds, expected, strict=True)):
            found = candidate.prefill(tokens) if index == 0 else candidate.step(tokens)
            name = "prefill" if index == 0 else f"decode {index}"
            steps.append(_compare(name, logits, found, (atol, rtol)))
    passed = all(_step_ok(s) for s in steps)
    return Verification(passed, atol, rtol, prompt_tokens, steps)


@contextlib.contextmanager
def _onnxruntime_errors(what: str, advice: str):
    """onnxruntime refusing or failing a model → one line (its errors share no base class)."""
    try:
        yield
    except KvfuseError:
        raise
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise KvfuseError(
            f"onnxruntime cannot run {what}: {reason.split(' : ')[-1][:300]}; {advice}"
        ) from error


def prefill_outputs(
    model: bytes, pairs, kv_shape, *, prompt_tokens: int = 12, seed: int = 0
) -> dict[str, np.ndarray]:
    """Every output of `model` (a fixed-cache graph) after a prefill of the verification prompt."""
    runner = FixedCacheRunner(model, pairs, kv_shape)
    vocab = _vocab_size(runner.session)
    ids = np.random.default_rng(seed).integers(3, min(vocab, 1000), size=(1, prompt_tokens))
    runner.prefill(ids)
    return dict(zip(runner.output_names, runner.last_outputs, strict=True))


def _vocab_size(session: ort.InferenceSession) -> int:
    logits = next(o for o in session.get_outputs() if o.name == "logits")
    vocab = logits.shape[-1]
    return vocab if isinstance(vocab, int) else 256


def _compare(step: str, expected: np.ndarray, found: np.ndarray, tolerance) -> StepCheck:
    if found.shape[1] == 1 and expected.shape[1] > 1:  # logits kept for the last position
        expected = expected[:, -1:]
    expected, found = expected.astype(np.float32), found.astype(np.float32)
    diff = np.abs(expected - found)
    atol, rtol = tolerance
    used = diff / (atol + rtol * np.abs(expected))
    return StepCheck(
        step,
        float(diff.max()),
        float(used.max()),
        int(expected[0, -1].argmax()),
        int(found[0, -1].argmax()),
    )


def _step_ok(step: StepCheck) -> bool:
    """Within atol + rtol·|expected| everywhere (tolerance_used ≤ 1) and the same token."""
    return step.tolerance_used <= 1.0 and step.token_original == step.token_rewritten


def _session(
    model, data_folder: Path | None = None, optimized: bool = False
) -> ort.InferenceSession:
    """A session with onnxruntime's graph optimisations and weight pre-packing off (what is
    compared is the graphs as written, and no second copy of the weights is made), from bytes,
    a proto or a path; `data_folder` is where a model given as bytes has its external data.
    `optimized`: both on, as a deployed model runs (MatMulNBits' fast kernels pre-pack)."""
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # errors come back as exceptions
    if not optimized:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if data_folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(data_folder)
        )
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def locate_divergence(
    original: Path, rewritten, pairs, kv_shape, *, prompt_tokens: int = 12, seed: int = 0
) -> str | None:
    """On a failed check: the first tensor both graphs still share by name (projections, MLP
    outputs — per layer, in graph order) whose prefill values differ beyond tolerance.
    `rewritten` is a model file or a static pair {length: proto}; weights stay in their files."""
    import onnx

    from kvfuse.rewriter.pipeline import MODULE_PATH, layer_of

    graphs = rewritten if isinstance(rewritten, dict) else {None: Path(rewritten)}
    protos = {key: _header(graph) for key, graph in graphs.items()}
    original_proto = _header(Path(original))
    candidate_proto = next(iter(protos.values()))
    produced = {out for node in candidate_proto.graph.node for out in node.output}
    produced -= {out.name for out in original_proto.graph.output}  # compared already
    layers = {}  # output → layer, from its name or (dynamo exports) its node's module path
    for node in original_proto.graph.node:
        path = next((p.value for p in node.metadata_props if p.key == MODULE_PATH), None)
        for out in node.output:
            layer = layer_of(out) or layer_of(path)
            if out in produced and layer is not None:
                layers[out] = layer
    shared = list(layers)
    if not shared:
        return None
    for proto in (original_proto, *protos.values()):
        proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in shared)
    reference = ConcatCacheRunner(None, session=_session(original_proto, Path(original).parent))
    vocab = _vocab_size(reference.session)
    ids = np.random.default_rng(seed).integers(3, min(vocab, 1000), size=(1, prompt_tokens))
    reference.prefill(ids)
    expected = dict(zip(reference.output_names, reference.last_outputs, strict=True))
    del reference
    folder = None if isinstance(rewritten, dict) else Path(rewritten).parent
    sessions = {key: _session(proto, folder) for key, proto in protos.items()}
    candidate = FixedCacheRunner(sessions, pairs, kv_shape)
    candidate.prefill(ids)
    found = dict(zip(candidate.output_names, candidate.last_outputs, strict=True))
    for name in shared:
        a, b = expected[name], found[name]
        atol, rtol = TOLERANCES.get(a.dtype, (ATOL, RTOL))
        if a.shape != b.shape or not np.allclose(a, b, atol=atol, rtol=rtol):
            diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
            return f"first divergence at layer {layers[name]}: {name} (max |Δ| {diff:.2e})"
    return None


def _header(model):
    """The graph of a model file without its external weights (or a copy of a proto)."""
    import onnx

    if isinstance(model, Path):
        return onnx.load(str(model), load_external_data=False)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
