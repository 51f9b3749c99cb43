"""The HTTP server: a batching engine over the KV rows, OpenAI and TGI routes, metrics.

    engine = Engine("model-dir", slots=8)       # one thread owns the session and the arena
    app = create_app(engine)                    # FastAPI: mount it, or give it to Ray Serve
    server = start(engine, port=8000)           # or serve it here, on a background thread
    server.stop(); engine.close()

`kvfuse serve MODEL` is `serve_forever`.
"""

from kvfuse.serve.app import create_app
from kvfuse.serve.engine import ContextTooLong, Engine, Event, Params, QueueFull, Request
from kvfuse.serve.server import Server, serve_forever, start

__all__ = [
    "ContextTooLong",
    "Engine",
    "Event",
    "Params",
    "QueueFull",
    "Request",
    "Server",
    "create_app",
    "serve_forever",
    "start",
]
