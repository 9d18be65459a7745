"""Connecting to Ray: a local instance by default, or an existing cluster (`ray.address`, RAY_ADDRESS)."""
from __future__ import annotations

import os

from segshift.components.config import Params


def connect_ray(params: Params) -> None:
    import ray
    if ray.is_initialized():
        return
    address = params.ray.address or os.environ.get("RAY_ADDRESS")
    # Tests and laptops keep Ray on loopback; a cluster address is used as given.
    kwargs = {} if address else {"num_cpus": params.ray.local_num_cpus, "include_dashboard": False,
                                 "_node_ip_address": "127.0.0.1"}
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=True, **kwargs)
