"""text-generation-inference routes: /generate, /generate_stream, POST / (a JSON list, or a
stream with `stream: true`, where huggingface_hub's InferenceClient posts), /info, /health.

As TGI does, sampling is on when `do_sample` is set or any of temperature (≠ 1), top_k, top_p
(< 1) is given; otherwise decoding is greedy. A sampled request without a seed gets one, and the
details report it. Stream events are one `data:` line each; the last carries `generated_text`
and `details`; there is no `[DONE]`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

import kvfuse
from kvfuse.runtime.sampling import Sampling
from kvfuse.serve.app import Stream, error_body, finish_text, raise_on_error, sse
from kvfuse.serve.engine import Event, Params

router = APIRouter()

FINISH = {"eos": "eos_token", "stop": "stop_sequence", "length": "length", "timeout": "length"}


class Parameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0.0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop: list[str] | None = None
    seed: int | None = Field(None, ge=0)
    do_sample: bool | None = False
    details: bool | None = False
    return_full_text: bool | None = False
    ignore_eos: bool = False


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    inputs: str = Field(min_length=1)
    parameters: Parameters = Parameters()
    stream: bool = False


def _params(parameters: Parameters) -> Params:
    p = parameters
    sample = (
        bool(p.do_sample)
        or p.temperature not in (None, 1.0)
        or bool(p.top_k)
        or (p.top_p is not None and p.top_p < 1.0)
    )
    seed = p.seed if p.seed is not None or not sample else secrets.randbits(63)
    sampling = Sampling(
        temperature=(p.temperature or 1.0) if sample else 0.0,
        top_k=p.top_k or 0,
        top_p=p.top_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        seed=seed,
    )
    return Params(p.max_new_tokens, sampling, tuple(p.stop or ()), p.ignore_eos)


def _submit(request: Request, body: GenerateBody) -> tuple[Stream, list[int]]:
    engine = request.app.state.engine
    prompt = engine.text.encode(body.inputs, chat=False)
    return Stream(engine, prompt, _params(body.parameters), openai=False), prompt


def _details(stream: Stream, prompt: list[int], events: list[Event]) -> dict:
    request = stream.request
    tokens = [_token(stream, event) for event in events if event.token is not None]
    return {
        "finish_reason": FINISH.get(events[-1].finish_reason, "length"),
        "generated_tokens": len(request.new),
        "seed": request.seed,
        "prefill": [],
        "tokens": tokens,
        "input_length": len(prompt),
    }


def _token(stream: Stream, event: Event) -> dict:
    text = stream.engine.text.decode([event.token])
    return {"id": event.token, "text": text, "logprob": event.logprob, "special": False}


async def _generated(request: Request, body: GenerateBody) -> dict:
    stream, prompt = _submit(request, body)
    events = await stream.collect(request)
    raise_on_error(events, openai=False)
    text = finish_text(events)
    answer = {"generated_text": body.inputs + text if body.parameters.return_full_text else text}
    if body.parameters.details:
        answer["details"] = _details(stream, prompt, events)
    return answer


@router.post("/generate")
async def generate(body: GenerateBody, request: Request) -> dict:
    return await _generated(request, body)


@router.post("/generate_stream")
async def generate_stream(body: GenerateBody, request: Request):
    stream, prompt = _submit(request, body)
    return sse(stream, _events(stream, prompt, body))


@router.post("/")
async def compat_generate(body: GenerateBody, request: Request):
    if body.stream:
        return await generate_stream(body, request)
    return [await _generated(request, body)]


async def _events(stream: Stream, prompt: list[int], body: GenerateBody) -> AsyncIterator[str]:
    seen: list[Event] = []
    index = 0
    async for event in stream:
        if event.kind == "error":
            yield json.dumps(error_body(False, event.text, "generation"))
            return
        seen.append(event)
        if event.kind == "token":
            index += 1
            frame = {"index": index, "token": _token(stream, event) | {"text": event.text}}
            yield json.dumps(frame | {"generated_text": None, "details": None})
        else:  # "done": the last token, the whole text and the details
            text = finish_text(seen)
            if body.parameters.return_full_text:
                text = body.inputs + text
            details = _details(stream, prompt, seen)
            details.pop("tokens"), details.pop("prefill")
            frame = {
                "index": index + 1,
                "token": _last_token(stream, event),
                "generated_text": text,
            }
            yield json.dumps(frame | {"details": details})


def _last_token(stream: Stream, event: Event) -> dict:
    """The final event's token: the one that ended the request, else its eos (special)."""
    if event.token is not None:
        return _token(stream, event) | {"text": event.text}
    eos = min(stream.engine.text.eos_ids, default=0)
    return {"id": eos, "text": event.text, "logprob": 0.0, "special": True}


@router.get("/info")
def info(request: Request) -> dict:
    engine = request.app.state.engine
    return {
        "model_id": engine.name,
        "model_dtype": "float32",
        "model_device_type": "cpu",
        "max_concurrent_requests": engine.slots + engine.max_queue,
        "max_best_of": 1,
        "max_stop_sequences": 8,
        "max_input_tokens": engine.max_context - 1,
        "max_total_tokens": engine.max_context,
        "max_client_batch_size": 1,
        "router": "kvfuse",
        "version": kvfuse.__version__,
        "slots": engine.slots,
    }


@router.get("/health")
def health(request: Request):
    engine = request.app.state.engine
    if not engine.alive():
        return JSONResponse(error_body(False, "the engine thread stopped", "unhealthy"), 503)
    return JSONResponse({})
