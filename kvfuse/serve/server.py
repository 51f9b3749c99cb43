"""Run the app on uvicorn: in the foreground (`kvfuse serve`) or on a background thread of
this process (`start`: tests, notebooks, an embedding program)."""

from __future__ import annotations

import threading
import time

import uvicorn

from kvfuse.errors import KvfuseError
from kvfuse.serve.app import create_app
from kvfuse.serve.engine import Engine


class Server:
    """A server running on a thread of this process; `url` is where it listens."""

    def __init__(self, engine: Engine, host: str, port: int, owns_engine: bool) -> None:
        self.engine, self._owns_engine = engine, owns_engine
        config = uvicorn.Config(
            create_app(engine), host=host, port=port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="kvfuse-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise KvfuseError(
                    f"the server could not listen on {host}:{port}; pick another --port"
                )
            time.sleep(0.02)
        bound = self._server.servers[0].sockets[0].getsockname()
        self.host, self.port = bound[0], bound[1]
        self.url = f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop listening, then stop the engine if this server created it."""
        self._server.should_exit = True
        self._thread.join(timeout=30)
        if self._owns_engine:
            self.engine.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(model, host: str = "127.0.0.1", port: int = 0, **engine_options) -> Server:
    """Start serving in this process, on a background thread.

    Args:
        model: an Engine, or an optimized model path (an Engine is made with `engine_options`:
            slots, max_queue, threads, prefill_chunk, chunk_while_decoding,
            default_max_new_tokens, request_timeout_s, name).
        host: the address to listen on.
        port: the port (0: any free one; read `Server.port`).

    Returns:
        the running Server (`.url`, `.stop()`; usable as a context manager).
    """
    owns = not isinstance(model, Engine)
    engine = Engine(model, **engine_options) if owns else model
    try:
        return Server(engine, host, port, owns)
    except BaseException:
        if owns:
            engine.close()
        raise


def serve_forever(model, host: str = "127.0.0.1", port: int = 8000, **engine_options) -> None:
    """Serve in the foreground until interrupted (Ctrl-C); the `kvfuse serve` command."""
    engine = Engine(model, **engine_options)
    try:
        config = uvicorn.Config(create_app(engine), host=host, port=port, log_level="info")
        server = uvicorn.Server(config)
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            return
        if not server.started:
            raise KvfuseError(f"the server could not listen on {host}:{port}; pick another --port")
    finally:
        engine.close()
