"""Which transport Horovod's own thread uses, and Gloo's start-up under ``mpirun``.

hvdllm always needs MPI (its groups, point-to-point traffic and watchdog use
mpi4py).  Horovod's background thread can run its coordination and its
allreduces either over the same MPI or over Gloo's TCP sockets:

* ``mpi`` (the default): one transport for everything; the fastest here.
* ``gloo``: Horovod's thread makes no MPI calls at all, for an MPI whose
  multi-threaded support is poor, or to keep Horovod's traffic on a network
  of its own (``HOROVOD_GLOO_IFACE``).

``HVDLLM_HOROVOD_BACKEND`` = ``auto`` (the default: an exported
``HOROVOD_CONTROLLER``, else ``mpi``), ``mpi`` or ``gloo``.

Gloo needs a rendezvous, which ``horovodrun --gloo`` provides but ``mpirun``
does not: rank 0 starts Horovod's own rendezvous server
(:class:`horovod.runner.http.http_server.RendezvousServer`), publishes its
addresses over MPI, and every rank sets the ``HOROVOD_*`` variables that
``horovodrun`` would have set (rank, sizes, host, interface) before
``hvd.init``.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Sequence

from .errors import EnvironmentSetupError

BACKEND_ENV = "HVDLLM_HOROVOD_BACKEND"
BACKENDS = ("auto", "mpi", "gloo")
# How long a rank tries each published address of the rendezvous server.
CONNECT_TIMEOUT_SEC = 3.0


def choose_backend() -> str:
    """``"mpi"`` or ``"gloo"``, from the environment."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise EnvironmentSetupError(
            f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r} is not one of {', '.join(BACKENDS)}")
    if choice != "auto":
        return choice
    controller = os.environ.get("HOROVOD_CONTROLLER", "").strip().lower()
    return controller if controller in ("mpi", "gloo") else "mpi"


def slot_plan(hostnames: Sequence[str]) -> list:
    """Horovod's ``SlotInfo`` of every rank, as ``horovodrun`` would compute it.

    Local ranks count the ranks of a host in rank order; the cross group of
    local rank ``l`` is the hosts that have an ``l``-th rank, in order of
    their first rank.
    """
    from horovod.runner.common.util.hosts import SlotInfo

    hosts = list(dict.fromkeys(hostnames))
    members = {h: [r for r, name in enumerate(hostnames) if name == h] for h in hosts}
    plan = []
    for rank, host in enumerate(hostnames):
        local_rank = members[host].index(rank)
        cross = [h for h in hosts if len(members[h]) > local_rank]
        plan.append(SlotInfo(hostname=host, rank=rank, local_rank=local_rank,
                             cross_rank=cross.index(host), size=len(hostnames),
                             local_size=len(members[host]), cross_size=len(cross)))
    return plan


def _ipv4_addresses(iface: str | None = None) -> list[str]:
    """This host's IPv4 addresses (of ``iface`` only, if given), loopback last."""
    import psutil

    found = []
    for name, addrs in psutil.net_if_addrs().items():
        if iface and name != iface:
            continue
        found += [(a.address.startswith("127."), a.address) for a in addrs
                  if a.family == socket.AF_INET]
    return [address for _, address in sorted(found, key=lambda item: item[0])]


def _iface_of(address: str) -> str | None:
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addrs):
            return name
    return None


def _reach(addresses: Sequence[str], port: int) -> tuple[str, str] | None:
    """The first of ``addresses`` whose ``port`` accepts a connection, and our end's address."""
    for address in addresses:
        try:
            with socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_SEC) as sock:
                return address, sock.getsockname()[0]
        except OSError:
            continue
    return None


_server = None


def start_gloo(comm: Any, hostnames: Sequence[str], timeout_sec: float) -> None:
    """Rendezvous for Horovod over Gloo under ``mpirun``; sets this rank's ``HOROVOD_*`` env.

    Collective over ``comm`` (the whole job); call before ``hvd.init``.
    """
    global _server
    rank, size = comm.Get_rank(), comm.Get_size()
    plan = slot_plan(hostnames)
    published = None
    if rank == 0:
        try:
            from horovod.runner.http.http_server import RendezvousServer

            if _server is None:
                _server = RendezvousServer()
                _server.port = _server.start()
            _server.init(plan)
            addresses = _ipv4_addresses(os.environ.get("HOROVOD_GLOO_IFACE") or None)
            published = (addresses, _server.port) if addresses else \
                "rank 0 has no IPv4 address to offer the other ranks"
        except Exception as exc:  # every rank must learn of the failure
            published = f"rank 0 could not start Horovod's Gloo rendezvous server: {exc}"
    published = comm.bcast(published, root=0)
    if isinstance(published, str):
        raise EnvironmentSetupError(published)
    addresses, port = published
    reached = _reach(addresses, port)
    failures = comm.allgather(None if reached else hostnames[rank])
    missing = sorted({h for h in failures if h is not None})
    if missing:
        raise EnvironmentSetupError(
            f"Horovod over Gloo: ranks on {', '.join(missing)} cannot reach rank 0's rendezvous "
            f"server (port {port} of {', '.join(addresses)}); open the port, name the network "
            f"with HOROVOD_GLOO_IFACE, or set {BACKEND_ENV}=mpi")
    server_address, own_address = reached
    iface = os.environ.get("HOROVOD_GLOO_IFACE") or _iface_of(own_address) or "lo"
    slot = plan[rank]
    os.environ.update({
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": server_address,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_GLOO_IFACE": iface,
        "HOROVOD_HOSTNAME": slot.hostname,
        "HOROVOD_RANK": str(slot.rank),
        "HOROVOD_SIZE": str(size),
        "HOROVOD_LOCAL_RANK": str(slot.local_rank),
        "HOROVOD_LOCAL_SIZE": str(slot.local_size),
        "HOROVOD_CROSS_RANK": str(slot.cross_rank),
        "HOROVOD_CROSS_SIZE": str(slot.cross_size),
    })
    os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(max(30, int(timeout_sec))))


def use_mpi() -> None:
    """Horovod over MPI: its coordination always; its allreduces unless the user chose."""
    os.environ["HOROVOD_CONTROLLER"] = "mpi"
    os.environ.setdefault("HOROVOD_CPU_OPERATIONS", "mpi")


def init(hvd: Any, comm: Any, process_sets: Any, timeout_sec: float) -> str:
    """``hvd.init`` over the backend :func:`choose_backend` picks; returns it.

    ``comm`` is mpi4py's communicator of the job (``None``: the world).  Gloo
    only runs over the whole world.
    """
    from mpi4py import MPI

    backend = choose_backend()
    if backend == "gloo":
        world = comm if comm is not None else MPI.COMM_WORLD
        if world.Get_size() != MPI.COMM_WORLD.Get_size():
            raise EnvironmentSetupError(
                f"Horovod over Gloo needs the whole MPI world ({MPI.COMM_WORLD.Get_size()} "
                f"ranks), not a communicator of {world.Get_size()}; set {BACKEND_ENV}=mpi")
        if not os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"):
            # horovodrun --gloo has set up a rendezvous already; mpirun has not.
            start_gloo(world, world.allgather(MPI.Get_processor_name()), timeout_sec)
        hvd.init(process_sets=process_sets)
    else:
        use_mpi()
        if comm is None:
            hvd.init(process_sets=process_sets)
        else:
            hvd.init(comm=comm, process_sets=process_sets)
    return backend
