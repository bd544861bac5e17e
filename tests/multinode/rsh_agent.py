#!/usr/bin/env python3
"""An ssh stand-in for Open MPI's rsh launcher: ``rsh_agent.py HOST CMD...``.

Open MPI (``--mca plm_rsh_agent``) calls it to start its daemon on HOST.  It
behaves as ssh would between two machines:

1. resolves HOST with the caller's resolver (inside a simulated host that is
   the namespace's hosts file);
2. connects to port 22 of that address over the network, from the caller's
   namespace: a refused connection proves the host is up (nothing listens
   there); no route or no answer within ``CONNECT_TIMEOUT`` is ssh's
   "connect to host ... port 22" error, exit status 255;
3. runs CMD through ``sh -c`` inside the namespace that owns the address
   (``HVDLLM_NETNS_MAP``: JSON address -> namespace), with its own host
   name and a clean environment, as a login over ssh gets.
"""
import json
import os
import socket
import sys

CONNECT_TIMEOUT = 10.0
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def fail(message: str) -> None:
    print(f"ssh: {message}", file=sys.stderr, flush=True)
    sys.exit(255)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        fail("usage: rsh_agent.py HOST CMD...")
    host, cmd = argv[0], " ".join(argv[1:])
    if not host.replace("-", "").replace(".", "").isalnum():
        fail(f"bad host name {host!r}")
    try:
        address = socket.gethostbyname(host)
    except OSError:
        fail(f"Could not resolve hostname {host}: Name or service not known")
    try:
        socket.create_connection((address, 22), timeout=CONNECT_TIMEOUT).close()
    except ConnectionRefusedError:
        pass  # the host answered
    except TimeoutError:
        fail(f"connect to host {host} port 22: Connection timed out")
    except OSError as exc:
        fail(f"connect to host {host} port 22: {exc.strerror or exc}")
    with open(os.environ["HVDLLM_NETNS_MAP"]) as fh:
        namespace = json.load(fh).get(address)
    if namespace is None:
        fail(f"connect to host {host} port 22: no simulated host owns {address}")
    env = {"PATH": BASE_PATH, "HOME": os.environ.get("HOME", "/")}
    os.execvpe("ip", ["ip", "netns", "exec", namespace, "unshare", "--uts", "sh", "-c",
                      f"hostname {host} && {cmd}"], env)


if __name__ == "__main__":
    main(sys.argv[1:])
