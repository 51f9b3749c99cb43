"""Joining a Ray cluster (optimize-many --ray, serve --replicas): Ray is an optional extra."""

from __future__ import annotations

from kvfuse.errors import KvfuseError


def connect(address: str | None):
    """Join the Ray cluster at `address`, or start a local one when None (this process's
    cluster, if it already has one); returns the `ray` module.

    Args:
        address: "host:port" of a cluster's GCS, "auto", or None.

    Returns:
        `ray`, initialised.
    """
    try:
        import ray
    except ImportError as error:
        raise KvfuseError("this needs Ray: pip install 'kvfuse[ray]'") from error
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except ConnectionError as error:
            raise KvfuseError(f"cannot reach the Ray cluster at {address}: {error}") from error
    return ray
