"""The FastAPI application over one Engine: `create_app(engine)`.

Routes live in `openai_api` (/v1/...) and `tgi_api` (/generate, /generate_stream, POST /,
/info, /health); /metrics is Prometheus text. Everything a request can be refused for (bad
body, prompt + max_new_tokens over the context, a full queue) is decided before a stream
opens, so errors keep their status codes; a stream then pings from its first byte. A client
that goes away cancels its generation: streaming, through the stream's cancellation;
otherwise, through a watcher polling the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from kvfuse.errors import KvfuseError
from kvfuse.serve.engine import ContextTooLong, Engine, Event, Params, QueueFull

PING_S = 10.0  # keep-alive comment interval of a silent stream (proxies cut at ~30-60 s)
DISCONNECT_POLL_S = 0.2


class ApiError(Exception):
    """An error answered with `status`; shaped per API by the exception handler."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers: dict[str, str] = {}


def create_app(engine: Engine) -> FastAPI:
    """The HTTP app for `engine` (OpenAI and TGI routes, /metrics), for uvicorn, Ray Serve
    (`@serve.ingress(create_app(engine))`) or any ASGI server.

    Args:
        engine: a running Engine; the app neither starts nor closes it.

    Returns:
        the FastAPI application.
    """
    from kvfuse.serve import openai_api, tgi_api

    app = FastAPI(title="kvfuse", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.started = int(time.time())
    app.include_router(openai_api.router)
    app.include_router(tgi_api.router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(engine.metrics.exposition(), media_type="text/plain; version=0.0.4")

    return app


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def error_body(openai: bool, message: str, kind: str, param: str | None = None) -> dict:
    """An error in the caller's API shape (OpenAI's nested object, or TGI's flat one)."""
    if openai:
        return {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return {"error": message, "error_type": kind}


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    body = error_body(_is_openai(request), error.message, error.kind, error.param)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
    message = f"{where}: {first.get('msg', 'invalid value')}"
    openai = _is_openai(request)
    body = error_body(openai, message, "invalid_request_error" if openai else "validation", where)
    return JSONResponse(body, status_code=400 if openai else 422)


class Stream:
    """One submitted request's Events as an async iterator (fed from the engine thread)."""

    def __init__(self, engine: Engine, prompt: list[int], params: Params, openai: bool) -> None:
        loop = asyncio.get_running_loop()
        self.engine, self.events = engine, asyncio.Queue()

        def sink(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shut down): nobody listens
                pass

        try:
            self.request = engine.submit(prompt, params, sink)
        except ContextTooLong as error:
            raise ApiError(400 if openai else 422, str(error), _kind(openai), "messages") from error
        except QueueFull as error:
            kind = "rate_limit_exceeded" if openai else "overloaded"
            api_error = ApiError(429, str(error), kind)
            api_error.headers["Retry-After"] = str(error.retry_after)
            raise api_error from error
        except KvfuseError as error:
            raise ApiError(400 if openai else 422, str(error), _kind(openai)) from error

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.events.get()
            yield event
            if event.kind != "token":
                return

    def cancel(self) -> None:
        self.engine.cancel(self.request)

    async def collect(self, http: Request) -> list[Event]:
        """All events, cancelling the generation if the client disconnects meanwhile."""
        watcher = asyncio.create_task(self._watch(http))
        try:
            return [event async for event in self]
        finally:
            watcher.cancel()

    async def _watch(self, http: Request) -> None:
        while True:
            if await http.is_disconnected():
                self.cancel()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)


def _kind(openai: bool) -> str:
    return "invalid_request_error" if openai else "validation"


def sse(stream: Stream, events: AsyncIterator[dict | str]) -> EventSourceResponse:
    """An SSE response of `events` (dicts become one `data:` line of JSON each), opened with a
    comment so proxies see a byte at once, pinged while silent, cancelling `stream` when the
    client goes away."""

    async def body():
        yield ServerSentEvent(comment="kvfuse")
        try:
            async for item in events:
                yield ServerSentEvent(data=item)
        finally:  # finished, or cancelled because the client left
            if stream.request.state != "done":
                stream.cancel()

    return EventSourceResponse(body(), ping=PING_S, sep="\n")


def finish_text(events: list[Event]) -> str:
    return "".join(event.text for event in events if event.kind != "error")


def raise_on_error(events: list[Event], openai: bool) -> None:
    """A generation that failed after admission: 500 (OpenAI) or 424 (TGI), with the reason."""
    if events and events[-1].kind == "error":
        raise ApiError(
            500 if openai else 424, events[-1].text, "server_error" if openai else "generation"
        )
