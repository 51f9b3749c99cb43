"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Bodies follow OpenAI's API; `top_k`, `repetition_penalty` and `ignore_eos` are accepted as the
extra fields other servers take (`extra_body` in the openai client). Streams are
`chat.completion.chunk` / `text_completion` chunks ended by `data: [DONE]`; with
`stream_options.include_usage` a last chunk carries `usage` and no choices.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from kvfuse.runtime.sampling import Sampling
from kvfuse.serve.app import ApiError, Stream, error_body, finish_text, raise_on_error, sse
from kvfuse.serve.engine import Event, Params

router = APIRouter()

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "timeout": "length"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_Common):
    prompt: str | list[int] | list[str]


def _params(body: _Common, max_tokens: int | None) -> Params:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    sampling = Sampling(
        body.temperature, body.top_k, body.top_p, body.repetition_penalty, body.seed
    )
    return Params(max_tokens, sampling, stop, body.ignore_eos)


def _text_of(content: str | list[dict] | None) -> str:
    if isinstance(content, list):  # content parts: only text parts are understood
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content or ""


@router.get("/v1/models")
def models(request: Request) -> dict:
    engine = request.app.state.engine
    card = {
        "id": engine.name,
        "object": "model",
        "created": request.app.state.started,
        "owned_by": "kvfuse",
        "max_model_len": engine.max_context,
    }
    return {"object": "list", "data": [card]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, request: Request):
    engine = request.app.state.engine
    if engine.text.chat_template is None:
        raise ApiError(
            400, "this model has no chat template; use /v1/completions", "invalid_request_error"
        )
    messages = [{"role": m.role, "content": _text_of(m.content)} for m in body.messages]
    prompt = engine.text.encode_conversation(messages)
    params = _params(body, body.max_completion_tokens or body.max_tokens)
    return await _respond(request, body, prompt, params, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request):
    engine = request.app.state.engine
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(
                400, "one prompt per request is supported", "invalid_request_error", "prompt"
            )
        prompt = prompt[0]
    ids = engine.text.encode(prompt, chat=False) if isinstance(prompt, str) else list(prompt)
    if any(not 0 <= token < engine.spec.vocab_size for token in ids):
        raise ApiError(
            400,
            f"token ids must lie in 0..{engine.spec.vocab_size - 1}",
            "invalid_request_error",
            "prompt",
        )
    return await _respond(request, body, ids, _params(body, body.max_tokens), chat=False)


async def _respond(request: Request, body: _Common, prompt: list[int], params: Params, chat: bool):
    engine = request.app.state.engine
    stream = Stream(engine, prompt, params, openai=True)  # refuses before anything is sent
    shape = _Shape(engine.name, chat, len(prompt), stream)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse(stream, shape.chunks(usage))
    events = await stream.collect(request)
    raise_on_error(events, openai=True)
    return shape.whole(events)


class _Shape:
    """Builds one request's response bodies (whole, or as stream chunks)."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int, stream: Stream) -> None:
        self.model, self.chat, self.stream = model, chat, stream
        self.prompt_tokens = prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self) -> dict:
        request = self.stream.request
        new = len(request.new)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": new,
            "total_tokens": self.prompt_tokens + new,
            "prompt_tokens_details": {"cached_tokens": request.cached_tokens},
        }

    def _choice(self, text: str | None, finish: str | None, delta: bool) -> dict:
        reason = FINISH.get(finish, finish) if finish else None
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        if delta:
            content = {} if text is None else {"content": text}
            return {"index": 0, "delta": content, "logprobs": None, "finish_reason": reason}
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}

    def _frame(self, choices: list[dict], **extra) -> dict:
        kind = self.object + (".chunk" if self.chat else "")
        frame = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return {**frame, "choices": choices, **extra}

    def whole(self, events: list[Event]) -> dict:
        frame = self._frame([self._choice(finish_text(events), events[-1].finish_reason, False)])
        return {**frame, "object": self.object, "usage": self.usage()}

    async def chunks(self, include_usage: bool) -> AsyncIterator[str]:
        if self.chat:
            opening = self._choice(None, None, True) | {
                "delta": {"role": "assistant", "content": ""}
            }
            yield json.dumps(self._frame([opening]))
        async for event in self.stream:
            if event.kind == "error":
                yield json.dumps(error_body(True, event.text, "server_error"))
                return
            if event.text:
                yield json.dumps(self._frame([self._choice(event.text, None, True)]))
            if event.kind == "done":
                yield json.dumps(self._frame([self._choice(None, event.finish_reason, True)]))
        if include_usage:
            yield json.dumps(self._frame([], usage=self.usage()))
        yield "[DONE]"
