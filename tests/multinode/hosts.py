"""Two simulated hosts on one machine: network namespaces joined by a veth pair.

:class:`SimulatedHosts` creates, for one test run,

* two network namespaces (names carry the pid, so runs never collide), each
  with its loopback up and one end of a veth pair;
* a private ``10.A.B.0/24`` picked at random, host ``.1`` in the first
  namespace and ``.2`` in the second; nothing else has an address in it, so
  ``.3`` and above reach nobody;
* a hosts file per namespace (``ip netns exec`` bind-mounts
  ``/etc/netns/<ns>/hosts`` over ``/etc/hosts``) naming the hosts, plus two
  names for addresses with nothing behind them: ``nodec`` (``.3``: address
  resolution fails, "No route to host") and ``noded`` (``.4``: a static
  neighbour entry with a MAC nobody has, so packets leave on the link and are
  dropped, like a host behind a firewall that drops them: "timed out");
* a JSON map address -> namespace for the rsh agent (``rsh_agent.py``).

:meth:`SimulatedHosts.close` removes all of it and kills what still runs in
the namespaces; it is safe to call twice and after a failed set-up.

Needs root, ``ip`` (iproute2) and ``unshare`` (util-linux).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
HOST_NAMES = ("nodea", "nodeb")
UNREACHABLE = "nodec"  # resolves to an address of the /24 with nothing behind it
SILENT = "noded"  # an address whose packets go out on the link and are never answered
SILENT_MAC = "02:00:00:00:00:01"
AGENT = Path(__file__).resolve().parent / "rsh_agent.py"
CMD_TIMEOUT = 20


class SetupError(RuntimeError):
    pass


def missing_requirements() -> str | None:
    """One line saying why simulated hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "the multinode tests need root (network namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"the multinode tests need `{tool}` on PATH"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=CMD_TIMEOUT)
    if check and res.returncode != 0:
        raise SetupError(f"`ip {' '.join(args)}` failed: {res.stderr.strip()}")
    return res


class SimulatedHosts:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        tag = f"{os.getpid()}{random.randrange(1000):03d}"
        self.namespaces = (f"hvdmn{tag}a", f"hvdmn{tag}b")
        # Interface names are at most 15 characters and live per namespace.
        self.ifnames = ("mnveth0", "mnveth1")
        net = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
        self.subnet = f"{net}.0/24"
        self.addresses = (f"{net}.1", f"{net}.2")
        self.unreachable_address = f"{net}.3"
        self.silent_address = f"{net}.4"
        self.names = HOST_NAMES
        self.map_file = self.workdir / "netns-map.json"
        self._made: list[str] = []

    # -- set-up --------------------------------------------------------------
    def open(self) -> "SimulatedHosts":
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> None:
        a, b = self.namespaces
        for ns in self.namespaces:
            _ip("netns", "add", ns)
            self._made.append(ns)
        tmp0, tmp1 = f"mn{os.getpid() % 100000}x", f"mn{os.getpid() % 100000}y"
        _ip("link", "add", tmp0, "type", "veth", "peer", "name", tmp1)
        for tmp, ns, name, addr in zip((tmp0, tmp1), self.namespaces, self.ifnames,
                                       self.addresses):
            _ip("link", "set", tmp, "netns", ns)
            _ip("-n", ns, "link", "set", tmp, "name", name)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", name)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", name, "up")
            _ip("-n", ns, "neigh", "add", self.silent_address, "lladdr", SILENT_MAC, "dev", name,
                "nud", "permanent")
        lines = ["127.0.0.1 localhost"]
        lines += [f"{addr} {name}" for addr, name in zip(self.addresses, self.names)]
        lines.append(f"{self.unreachable_address} {UNREACHABLE}")
        lines.append(f"{self.silent_address} {SILENT}")
        for ns in self.namespaces:
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text("\n".join(lines) + "\n")
        self.map_file.write_text(json.dumps(dict(zip(self.addresses, self.namespaces))))

    # -- use -----------------------------------------------------------------
    def hostfile(self, names: tuple[str, ...], slots: int) -> Path:
        path = self.workdir / ("hostfile-" + "-".join(names))
        path.write_text("".join(f"{name} slots={slots}\n" for name in names))
        return path

    def on_host(self, index: int, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``index``: its namespace and its own host name."""
        return ["ip", "netns", "exec", self.namespaces[index], "unshare", "--uts", "sh", "-c",
                f'hostname {self.names[index]} && exec "$@"', "sh", *argv]

    def mpi_args(self) -> list[str]:
        """mpirun options that launch through the agent and keep MPI on the veth link.

        ``--bind-to none``: the simulated hosts share this machine's cores, but
        Open MPI binds each host's ranks to cores 0, 1, ... as if each had its
        own, so a rank of each host lands on every core and their busy-polling
        waits starve each other (runs stalled for minutes).  On a real cluster
        each host has its own cores and the binding is harmless.
        """
        return ["--mca", "plm_rsh_agent", str(AGENT),
                "--mca", "oob_tcp_if_include", self.subnet,
                "--mca", "btl_tcp_if_include", self.subnet, "--bind-to", "none"]

    def agent_env(self) -> dict[str, str]:
        return {"HVDLLM_NETNS_MAP": str(self.map_file)}

    def link_bytes(self, index: int = 0) -> tuple[int, int]:
        """(rx, tx) byte counters of host ``index``'s end of the veth pair."""
        res = _ip("-n", self.namespaces[index], "-s", "-j", "link", "show", self.ifnames[index])
        stats = json.loads(res.stdout)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    # -- tear-down -----------------------------------------------------------
    def close(self) -> None:
        for ns in self._made:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "delete", ns, check=False)  # takes its veth end, and so the pair
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self._made = []
        try:
            NETNS_ETC.rmdir()  # only if no one else keeps files there
        except OSError:
            pass
