"""The same HTTP API served by N replicas behind Ray Serve's proxy: `kvfuse serve MODEL
--replicas N [--autoscale MIN MAX]`.

    client ─▶ Ray Serve proxy (HTTP, routes whole requests) ─▶ replica 1: Engine + create_app
                                                          └─▶ replica 2: Engine + create_app …

Each replica is a Ray actor holding its own `Engine` (its own onnxruntime session, KV arena
and continuous batching thread) and the app `create_app` makes over it, so token-level
batching stays kvfuse's inside every replica; Ray Serve only spreads requests over replicas
(`max_ongoing_requests` = the engine's rows + queue, so a full replica's 429 still means
"full") and, with `--autoscale`, adds or removes replicas to keep each one's rows busy. Every
answer carries `x-kvfuse-replica`, the replica that produced it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kvfuse.errors import KvfuseError

APP_NAME = "kvfuse"
REPLICA_HEADER = "x-kvfuse-replica"


@dataclasses.dataclass(frozen=True)
class ReplicaPlan:
    """How many replicas, what each needs, and what each engine is given."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas
    cpus: float = 1.0  # declared to Ray per replica
    engine_options: dict = dataclasses.field(default_factory=dict)  # Engine(**options)

    def deployment_options(self) -> dict:
        slots = self.engine_options.get("slots", 4)
        capacity = slots + self.engine_options.get("max_queue", 64)
        options = {
            "name": "kvfuse-engine",
            "max_ongoing_requests": capacity,
            "ray_actor_options": {"num_cpus": self.cpus},
        }
        if self.autoscale is None:
            return {**options, "num_replicas": self.replicas}
        low, high = self.autoscale
        if not 0 <= low <= high or high < 1:
            raise KvfuseError(f"--autoscale {low} {high}: need 0 ≤ MIN ≤ MAX and MAX ≥ 1")
        scaling = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(low, 1),
            "target_ongoing_requests": slots,  # a replica with every row busy is at target
        }
        return {**options, "autoscaling_config": scaling}


def application(model: str | Path, plan: ReplicaPlan):
    """The Ray Serve application (`Deployment.bind()`) serving `model` as `plan` says.

    Args:
        model: an optimized model (`.onnx` or its directory), readable on every node.
        plan: replicas, autoscaling, CPUs per replica and the engine's options.

    Returns:
        The bound application, for `serve.run`.
    """
    if plan.replicas < 1:
        raise KvfuseError(f"--replicas must be at least 1, not {plan.replicas}")
    from ray import serve

    replica = serve.deployment(**plan.deployment_options())(serve.ingress()(EngineReplica))
    return replica.bind(str(Path(model).resolve()), plan.engine_options)


class EngineReplica:
    """One replica: an Engine of its own and the app over it (built after the engine)."""

    def __init__(self, model: str, engine_options: dict) -> None:
        from ray import serve

        from kvfuse.serve.engine import Engine

        self.engine = Engine(model, **engine_options)
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self):
        from kvfuse.serve.app import create_app

        return ReplicaHeader(create_app(self.engine), self.replica)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


class ReplicaHeader:
    """Pure ASGI middleware (streams and disconnects pass through untouched) naming the
    replica in every response's headers."""

    def __init__(self, app, replica: str) -> None:
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


def start_replicas(
    model: str | Path,
    plan: ReplicaPlan,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
) -> str:
    """Start (or update) the application on Ray Serve and return its URL; returns once every
    replica is up. Serve keeps running until `stop_replicas` (or the cluster ends).

    Args:
        model: the optimized model.
        plan: the replicas.
        host, port: where Ray Serve's HTTP proxy listens.
        address: the Ray cluster to join (None: this process's, or a new local one).

    Returns:
        The base URL, e.g. "http://127.0.0.1:8000".
    """
    from kvfuse.cluster import connect

    connect(address)
    from ray import serve
    from ray.exceptions import RayError

    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(model, plan), name=APP_NAME, route_prefix="/")
    except RayError as error:  # a proxy or replica that died starting: one line, not Ray's trace
        reason = str(error).strip().splitlines()[0][:300]
        raise KvfuseError(
            f"Ray Serve could not start on {host}:{port} ({type(error).__name__}: {reason}); "
            "check the cluster (`ray status`) and the port, then run again"
        ) from error
    return f"http://{host}:{port}"


def stop_replicas() -> None:
    """Remove the application (its replicas close their engines)."""
    from ray import serve

    serve.delete(APP_NAME)


def serve_replicas_forever(
    model: str | Path,
    plan: ReplicaPlan,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
) -> None:
    """`kvfuse serve --replicas N`: start the replicas, say so once every one is up, and keep
    them until interrupted (Ctrl-C, also while they start, removes the application)."""
    import sys
    import time

    try:
        url = start_replicas(model, plan, host, port, address)
        count = plan.replicas if plan.autoscale is None else "{}–{}".format(*plan.autoscale)
        print(f"serving {model} on {url}: {count} replicas up (Ctrl-C stops)", file=sys.stderr)
        sys.stderr.flush()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        _stop_if_started()


def _stop_if_started() -> None:
    import ray
    from ray import serve

    if ray.is_initialized() and APP_NAME in serve.status().applications:
        stop_replicas()
