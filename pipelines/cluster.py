"""Connecting to Ray: a local instance by default, or an existing cluster (`ray.address`, RAY_ADDRESS)."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import warnings
from collections.abc import Iterator

from segshift.components.config import Params

CONNECT_TIMEOUT_S = 5.0
DEFAULT_GCS_PORT = 6379
LOOPBACK = "127.0.0.1"


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
    start_local_ray(params)


def start_local_ray(params: Params) -> None:
    """A Ray instance only this machine can reach: every server of it listens on loopback.

    The dashboard serves Ray's state API, which Ray Train uses to release the workers' resources
    when Tune stops a trial early (ASHA): without it every stopped trial would keep its CPUs until
    the instance shuts down.
    """
    import ray
    with loopback_node_address():
        # address="local": a new instance of our own, never one that another process on this
        # machine started (ray.init would attach to it and refuse num_cpus)
        ray.init(address="local", num_cpus=params.ray.local_num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1",
                 dashboard_port=None, _node_ip_address=LOOPBACK, ignore_reinit_error=True,
                 log_to_driver=True)
    node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip):
        # only a Ray release without the flag below gets here (and tests/pipelines/test_cluster.py fails)
        warnings.warn(f"the local Ray instance runs on {node_ip}, not {LOOPBACK}: its servers listen "
                      "on every interface; keep RAY_AUTH_MODE unset or 'token' so that Ray's token "
                      "authentication guards them", stacklevel=2)


@contextlib.contextmanager
def loopback_node_address() -> Iterator[None]:
    """Let `_node_ip_address=127.0.0.1` stand while ray.init starts the instance.

    Ray (2.5x on Linux) replaces a loopback node address with the machine's LAN address, so that
    other nodes could join; the node's address then decides where the GCS, raylet, workers and
    agents listen: on every interface. Ray keeps the loopback address where it supports no
    clusters (macOS, Windows), so its flag for that is switched for the duration of this one call
    and restored: no environment variable is set, and a later connection to a real cluster is as
    Ray would make it. If a future Ray drops the flag, the warning in start_local_ray says so.
    """
    from ray._private import ray_constants
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if saved is None:
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1); names are not resolved."""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


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
