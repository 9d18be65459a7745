"""The local Ray instance segshift starts is reachable from this machine only.

From the attacker's side: anyone on the LAN who can reach a raylet, GCS, worker or agent port can
submit work to it. Every socket Ray's processes listen on must be bound to loopback.
"""
import os

import psutil
import pytest

from segshift.components.config import load_params
from segshift.pipelines.cluster import connect_ray, is_loopback, loopback_node_address
from tests.conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def listening_sockets(process: psutil.Process) -> list[tuple[str, int, str]]:
    """(ip, port, process name) of every LISTEN socket of the process and its descendants."""
    found = []
    for proc in [process, *process.children(recursive=True)]:
        try:
            name = " ".join(proc.cmdline()[:1]) or proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((conn.laddr.ip, conn.laddr.port, name))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue   # a worker that exited meanwhile listens nowhere
    return found


@pytest.fixture(scope="module")
def local_ray():
    """Ray started exactly as `segshift sweep` / `train` / `rank` do without a cluster address
    (once for the module: a start costs about 10 s here)."""
    import ray
    from ray._private import ray_constants
    if ray.is_initialized():
        ray.shutdown()
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)
        params = load_params(REPO / "params.yaml", {"ray.local_num_cpus": 2})
        assert params.ray.address is None
        flag_before = ray_constants.ENABLE_RAY_CLUSTER
        connect_ray(params)
        yield ray, flag_before
        ray.shutdown()
    # Ray exports RAY_AUTH_MODE=token into the driver for its local instance; later tests connect
    # to clusters of their own
    if auth_mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = auth_mode


@pytest.mark.integration
def test_every_socket_of_the_local_ray_instance_listens_on_loopback_only(local_ray):
    ray, _ = local_ray

    @ray.remote
    def plus_one(x: int) -> int:
        return x + 1

    @ray.remote
    class Pinger:
        def pid(self) -> int:
            return os.getpid()

    # a task and an actor: worker processes start and open their own servers
    assert ray.get(plus_one.remote(1)) == 2
    actor = Pinger.remote()
    assert ray.get(actor.pid.remote()) > 0
    sockets = listening_sockets(psutil.Process())
    names = " ".join(name for _, _, name in sockets)
    # not vacuous: the GCS, the raylet, the dashboard and a worker were all seen
    assert "gcs_server" in names and "raylet" in names and len(sockets) >= 6, sockets
    exposed = [s for s in sockets if not is_loopback(s[0])]
    assert not exposed, f"listening beyond loopback (ip, port, process): {exposed}"
    assert ray.util.get_node_ip_address() == "127.0.0.1"


@pytest.mark.integration
def test_starting_the_local_instance_leaves_no_global_switch_behind(local_ray):
    from ray._private import ray_constants
    _, flag_before = local_ray
    # a later connection to a real cluster (ray.address) must resolve addresses as Ray always does
    assert ray_constants.ENABLE_RAY_CLUSTER is flag_before
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


def test_loopback_node_address_restores_ray_flag_when_init_fails():
    from ray._private import ray_constants
    before = ray_constants.ENABLE_RAY_CLUSTER
    with pytest.raises(RuntimeError), loopback_node_address():
        assert ray_constants.ENABLE_RAY_CLUSTER is False
        raise RuntimeError("ray.init failed")
    assert ray_constants.ENABLE_RAY_CLUSTER is before


@pytest.mark.parametrize("host, expected", [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True),
                                            ("::ffff:127.0.0.1", True), ("localhost", True),
                                            ("0.0.0.0", False), ("::", False), ("192.0.2.2", False),
                                            ("::ffff:192.0.2.2", False), ("fe80::1%eth0", False)])
def test_is_loopback(host: str, expected: bool):
    assert is_loopback(host) is expected
