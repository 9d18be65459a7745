"""Connecting to Ray: a local instance by default, or an existing cluster (`ray.address`, RAY_ADDRESS)."""
from __future__ import annotations

import os
import socket

from segshift.components.config import Params

CONNECT_TIMEOUT_S = 5.0
DEFAULT_GCS_PORT = 6379


class ClusterError(RuntimeError):
    """A Ray cluster that cannot be reached; the message names the address and where it came from."""


def cluster_address(params: Params) -> tuple[str | None, str]:
    """(address, where it was set): `ray.address`, else $RAY_ADDRESS, else None (local)."""
    if params.ray.address:
        return params.ray.address, "ray.address in params"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    return None, "local"


def host_port(address: str) -> tuple[str, int] | None:
    """The (host, port) a GCS or Ray Client address points at; None for `auto`/`local`."""
    if address in ("auto", "local"):
        return None
    bare = address.split("://", 1)[-1].rstrip("/")
    host, _, port = bare.rpartition(":")
    if not host:
        return bare, DEFAULT_GCS_PORT
    if not port.isdigit():
        raise ClusterError(f"Ray address '{address}' is not host:port (e.g. 10.0.0.5:6379 or ray://head:10001)")
    return host, int(port)


def check_reachable(address: str, origin: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ClusterError within `timeout` seconds when nothing listens at the address: ray.init
    itself would keep retrying for minutes."""
    target = host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise ClusterError(f"cannot reach the Ray cluster at {address} (from {origin}): {reason} "
                           f"after at most {timeout:g}s; start it (`ray start --head`) or fix the "
                           "address, or unset it to run on a local Ray instance") from None


def connect_ray(params: Params) -> None:
    import ray
    if ray.is_initialized():
        return
    address, origin = cluster_address(params)
    if address:
        check_reachable(address, origin)
        # Inside a Ray job (`ray job submit`) the driver already belongs to the cluster.
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
        return
    # Tests and laptops keep Ray on loopback. The dashboard serves Ray's state API, which Ray
    # Train uses to release the workers' resources when Tune stops a trial early (ASHA):
    # without it every stopped trial would keep its CPUs until the instance shuts down.
    ray.init(num_cpus=params.ray.local_num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=None, _node_ip_address="127.0.0.1", ignore_reinit_error=True,
             log_to_driver=True)


def local_shortfall(params: Params, needs: dict[str, float]) -> tuple[str, float, float] | None:
    """(resource, needed, available) of the first of `needs` (e.g. {"CPU": 2}) that the *local*
    Ray instance cannot offer, else None; a cluster (ray.address) may autoscale, so never there."""
    import ray
    if params.ray.address or os.environ.get("RAY_ADDRESS"):
        return None
    total = ray.cluster_resources()
    for resource, need in needs.items():
        if need > total.get(resource, 0) + 1e-9:
            return resource, need, total.get(resource, 0)
    return None
